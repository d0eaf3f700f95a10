"""Fusion strategies: pure functions from the agents' answers for one task to one decision.

Each agent answers with probabilities (or scores) over its own label list; strategies align
labels by name, so agents need not share an order. Weights come from the plan when it names
one for a type, else from the agent's declared weight (its validation accuracy).
A partial answer set is re-normalised over the agents present.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from schemas import ConfigError


@dataclass(frozen=True)
class Vote:
    """One agent's answer to one task."""

    type: str
    labels: tuple[str, ...]
    probs: np.ndarray  # one score per label
    weight: float = 1.0


@dataclass(frozen=True)
class Fused:
    """A strategy's verdict: the winning label and a score per label."""

    label: str
    scores: dict[str, float]


class Strategy(Protocol):
    """Turns the votes of one task into a verdict."""

    @property
    def name(self) -> str:
        """The strategy's name, as written in decisions."""
        ...

    def fuse(self, votes: Sequence[Vote]) -> Fused:
        """Fuse at least one vote."""
        ...


def aligned(votes: Sequence[Vote]) -> tuple[tuple[str, ...], np.ndarray]:
    """Every label seen (first-seen order) and a ``[votes, labels]`` matrix of scores."""
    if not votes:
        raise ValueError("cannot fuse zero votes")
    labels: dict[str, int] = {}
    for vote in votes:
        if len(vote.labels) != len(vote.probs):
            raise ValueError(f"{vote.type}: {len(vote.probs)} scores for {len(vote.labels)} labels")
        for label in vote.labels:
            labels.setdefault(label, len(labels))
    matrix = np.zeros((len(votes), len(labels)), dtype=np.float64)
    for row, vote in enumerate(votes):
        matrix[row, [labels[label] for label in vote.labels]] = vote.probs
    return tuple(labels), matrix


@dataclass(frozen=True)
class WeightedMean:
    """Weighted mean of the agents' probabilities; ``weights`` by type override the agents'."""

    weights: dict[str, float] = field(default_factory=dict)
    name: str = "weighted_mean"

    def __post_init__(self) -> None:
        for type_name, weight in self.weights.items():
            if not weight > 0:
                raise ConfigError(f"fusion weight of {type_name!r} must be > 0, got {weight}")

    def fuse(self, votes: Sequence[Vote]) -> Fused:
        """Mean of the votes' scores weighted by type, normalised over the votes present."""
        labels, matrix = aligned(votes)
        weights = np.array([self.weights.get(v.type, v.weight) for v in votes], dtype=np.float64)
        scores = weights @ matrix / weights.sum()
        best = int(np.argmax(scores))
        return Fused(
            labels[best], {label: float(s) for label, s in zip(labels, scores, strict=True)}
        )


@dataclass(frozen=True)
class Mean:
    """Unweighted mean of the agents' probabilities."""

    name: str = "mean"

    def fuse(self, votes: Sequence[Vote]) -> Fused:
        """Plain mean of the votes' scores."""
        labels, matrix = aligned(votes)
        scores = matrix.mean(axis=0)
        best = int(np.argmax(scores))
        return Fused(
            labels[best], {label: float(s) for label, s in zip(labels, scores, strict=True)}
        )


def make_strategy(name: str, *, weights: dict[str, float] | None = None) -> Strategy:
    """A strategy by name; raises :class:`ConfigError` for an unknown one."""
    if name == "weighted_mean":
        return WeightedMean(weights=dict(weights or {}))
    if name == "mean":
        return Mean()
    raise ConfigError(f"unknown fusion strategy {name!r}; known: mean, weighted_mean")
