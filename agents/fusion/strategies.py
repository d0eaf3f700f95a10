"""Fusion strategies: pure functions from the agents' answers for one task to one decision.

Each agent answers with probabilities (or scores) over its own label list; strategies align
labels by name, so agents need not share an order. Weights come from the plan when it names
one for a type, else from the agent's declared weight (its validation accuracy).
A partial answer set is re-normalised over the agents present.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    model: str = ""  # name@version of the model that answered


@dataclass(frozen=True)
class Fused:
    """A strategy's verdict: the winning label, a score per label, and whether a rule alarmed."""

    label: str
    scores: dict[str, float]
    alarm: bool = False


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
    first = votes[0].labels
    if all(v.labels == first and len(v.probs) == len(first) for v in votes):
        return first, np.array([v.probs for v in votes], dtype=np.float64)  # the usual case
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
        return _verdict(labels, weights @ matrix / weights.sum())


@dataclass(frozen=True)
class Mean:
    """Unweighted mean of the agents' probabilities."""

    name: str = "mean"

    def fuse(self, votes: Sequence[Vote]) -> Fused:
        """Plain mean of the votes' scores."""
        labels, matrix = aligned(votes)
        return _verdict(labels, matrix.mean(axis=0))


def _verdict(labels: tuple[str, ...], scores: np.ndarray) -> Fused:
    best = int(np.argmax(scores))
    return Fused(labels[best], {label: float(x) for label, x in zip(labels, scores, strict=True)})


@dataclass(frozen=True)
class MajorityVote:
    """Each agent votes for its top label; most votes wins, a tie goes to the tied label with
    the higher mean score, and a tie in both to the label first seen (the first vote's order).

    The scores show the tie-break: a label's score is ``(votes + mean score) / (agents + 1)``.
    The vote count always dominates (a label with one vote more scores higher whatever the
    means), the mean separates tied counts, and with probability outputs the scores add up
    to 1. The label with the highest score is the decision's.
    """

    name: str = "majority_vote"

    def fuse(self, votes: Sequence[Vote]) -> Fused:
        """Count the agents' top labels, breaking ties by mean score."""
        labels, matrix = aligned(votes)
        counts = np.bincount(matrix.argmax(axis=1), minlength=len(labels)).astype(np.float64)
        # With probabilities a voted label's mean is > 0 and every mean <= 1 (1 only for a
        # label every agent voted for), so adding the mean never lifts a label past one with
        # more votes. Other scores are first squeezed into [0, 0.5] to keep that true.
        means = matrix.mean(axis=0)
        if means.min() < 0 or means.max() > 1:
            means = (means - means.min()) / (float(np.ptp(means)) or 1.0) / 2
        scores = (counts + means) / (len(votes) + 1)
        return _verdict(labels, scores)


@dataclass(frozen=True)
class MaxConfidence:
    """The single most confident agent decides; its scores are the decision's."""

    name: str = "max_confidence"

    def fuse(self, votes: Sequence[Vote]) -> Fused:
        """Follow the agent whose top score is highest."""
        labels, matrix = aligned(votes)
        return _verdict(labels, matrix[int(matrix.max(axis=1).argmax())])


@dataclass(frozen=True)
class ThresholdAlarm:
    """Alarm when the fused score of ``target`` reaches ``threshold``; label from ``base``."""

    target: str
    threshold: float
    base: Strategy = field(default_factory=lambda: WeightedMean())
    name: str = "threshold"

    def fuse(self, votes: Sequence[Vote]) -> Fused:
        """Fuse with the base strategy, then apply the rule."""
        fused = self.base.fuse(votes)
        return Fused(
            fused.label, fused.scores, fused.scores.get(self.target, 0.0) >= self.threshold
        )


@dataclass(frozen=True)
class KOfN:
    """Alarm when at least ``k`` of the agents present score ``target`` at ``threshold`` or more."""

    target: str
    threshold: float
    k: int
    base: Strategy = field(default_factory=lambda: WeightedMean())
    name: str = "k_of_n"

    def fuse(self, votes: Sequence[Vote]) -> Fused:
        """Fuse with the base strategy, then count the agents past the threshold."""
        fused = self.base.fuse(votes)
        passing = sum(
            1
            for v in votes
            if self.target in v.labels
            and float(v.probs[v.labels.index(self.target)]) >= self.threshold
        )
        return Fused(fused.label, fused.scores, passing >= self.k)


@dataclass(frozen=True)
class StrategyEntry:
    """One row of :data:`STRATEGY_TABLE`: how to build a strategy from its spec, and what it is.

    ``alarm_rule`` marks the rules that add an alarm on top of a classifying strategy (they
    need a ``target``); the others classify on their own.
    """

    build: Callable[[FusionSpec], Strategy]
    summary: str
    alarm_rule: bool = False


#: Every fusion strategy by name. The spec's validation, the CLI's choices and help, and
#: ``fusebus eval`` all read this table, so a strategy added here is known everywhere.
STRATEGY_TABLE: dict[str, StrategyEntry] = {
    "weighted_mean": StrategyEntry(
        lambda spec: WeightedMean(weights=dict(spec.weights)),
        "mean of the agents' probabilities weighted by their cards or the plan (default)",
    ),
    "mean": StrategyEntry(lambda spec: Mean(), "unweighted mean of the agents' probabilities"),
    "majority_vote": StrategyEntry(
        lambda spec: MajorityVote(), "each agent votes its top label; ties go to the higher mean"
    ),
    "max_confidence": StrategyEntry(
        lambda spec: MaxConfidence(), "the agent with the highest top score decides"
    ),
    "threshold": StrategyEntry(
        lambda spec: ThresholdAlarm(
            str(spec.target), spec.threshold, WeightedMean(weights=dict(spec.weights))
        ),
        "weighted mean, alarm when the fused score of --target reaches --threshold",
        alarm_rule=True,
    ),
    "k_of_n": StrategyEntry(
        lambda spec: KOfN(
            str(spec.target), spec.threshold, spec.k, WeightedMean(weights=dict(spec.weights))
        ),
        "weighted mean, alarm when --k agents score --target at --threshold or more",
        alarm_rule=True,
    ),
}

STRATEGIES = tuple(STRATEGY_TABLE)
DEFAULT_STRATEGY = "weighted_mean"
#: The strategies that classify on their own (no alarm rule), in table order.
CLASSIFYING_STRATEGIES = tuple(n for n, e in STRATEGY_TABLE.items() if not e.alarm_rule)


@dataclass(frozen=True)
class FusionSpec:
    """Which strategy fuses a stream, and its parameters.

    ``weights`` (by type) override the agents' own weights in ``weighted_mean`` (also the base
    of the rules); ``target``, ``threshold`` and ``k`` parameterise ``threshold`` and ``k_of_n``.
    """

    strategy: str = DEFAULT_STRATEGY
    weights: dict[str, float] = field(default_factory=dict)
    target: str | None = None
    threshold: float = 0.5
    k: int = 1

    def __post_init__(self) -> None:
        entry = STRATEGY_TABLE.get(self.strategy)
        if entry is None:
            raise ConfigError(
                f"unknown fusion strategy {self.strategy!r}; known: {', '.join(STRATEGIES)}"
            )
        if entry.alarm_rule and not self.target:
            raise ConfigError(f"fusion strategy {self.strategy!r} needs a target label")
        if not 0 <= self.threshold <= 1:
            raise ConfigError(f"fusion threshold must be within [0, 1], got {self.threshold}")
        if self.k < 1:
            raise ConfigError(f"fusion k must be >= 1, got {self.k}")
        for type_name, weight in self.weights.items():
            if not weight > 0:
                raise ConfigError(f"fusion weight of {type_name!r} must be > 0, got {weight}")

    def build(self) -> Strategy:
        """The strategy this spec describes."""
        return STRATEGY_TABLE[self.strategy].build(self)


def make_strategy(
    name: str, *, weights: dict[str, float] | None = None, **params: object
) -> Strategy:
    """A strategy by name (see :data:`STRATEGIES`); raises :class:`ConfigError` for a bad one."""
    return FusionSpec(strategy=name, weights=dict(weights or {}), **params).build()  # type: ignore[arg-type]
