"""Which model answers which subtask: the pure core of rollouts and model selection.

A replica holds a :class:`Lineup`: one or more :class:`Choice` of model for its type, most
accurate first. Each choice has a current version and may have a canary (answering a
share of subtasks, chosen by task id so a redelivered subtask meets the same version) and a
shadow (run beside the current version, its outputs never fused). :func:`choose` picks,
per batch, the most accurate choice whose measured cost still answers before the deadline
and drains the backlog in time. Nothing here touches the bus or a clock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from agents.base import Agent, Interface, stand_in_problem
from schemas import ConfigError

#: The share of the time left that a model's estimated work may fill: the rest is room for
#: the hop back to fusion and for estimates that are a little low.
TIME_MARGIN = 0.8
#: Resolution of the canary split: a share is honoured to 1 in this many task ids.
CANARY_BUCKETS = 10_000


@dataclass(frozen=True)
class Choice:
    """One model a replica can answer with: its registry name (or file stem, what a plan
    pins), the current version, and optionally a canary and a shadow version."""

    name: str
    current: Agent
    canary: Agent | None = None
    canary_share: float = 0.0
    shadow: Agent | None = None

    @classmethod
    def of(cls, agent: Agent, name: str | None = None) -> Choice:
        """A choice of one model, named ``name`` (default: its model's name)."""
        return cls(name or agent.model.name, agent)

    @property
    def agents(self) -> tuple[Agent, ...]:
        """Every version this choice holds loaded."""
        return tuple(a for a in (self.current, self.canary, self.shadow) if a is not None)

    def describe(self) -> dict[str, str]:
        """The versions it serves, as ``fusebus status`` shows them."""
        out = {"model": model_label(self.current)}
        if self.canary is not None:
            out["canary"] = f"{model_label(self.canary)} {share_text(self.canary_share)}"
        if self.shadow is not None:
            out["shadow"] = model_label(self.shadow)
        return out


@dataclass(frozen=True)
class Lineup:
    """The models a replica serves its type with, the preferred (most accurate) first."""

    choices: tuple[Choice, ...]

    def __post_init__(self) -> None:
        if not self.choices:
            raise ConfigError("an agent needs at least one model")
        names = [c.name for c in self.choices]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"model {twice[0]!r} is named twice: each model serves once")
        first = self.choices[0].current
        for choice in self.choices:
            for agent in choice.agents:
                problem = incompatibility(first, agent)
                if problem:
                    raise ConfigError(
                        f"model {choice.name!r} cannot serve beside {self.choices[0].name!r} "
                        f"in one replica: {problem}"
                    )

    @classmethod
    def single(cls, agent: Agent, name: str | None = None) -> Lineup:
        """A lineup of one model and no rollout."""
        return cls((Choice.of(agent, name),))

    @classmethod
    def ranked(cls, choices: Sequence[Choice]) -> Lineup:
        """``choices`` ordered most accurate first (by :func:`accuracy`, ties in the order
        given)."""
        return cls(tuple(sorted(choices, key=lambda c: -accuracy(c.current))))

    @property
    def preferred(self) -> Agent:
        """The model answering when time allows."""
        return self.choices[0].current

    def index(self, name: str) -> int | None:
        """The position of the choice named ``name`` (a pin), or None."""
        for i, choice in enumerate(self.choices):
            if name in (choice.name, choice.current.model.name):
                return i
        return None

    def with_choice(self, choice: Choice) -> Lineup:
        """This lineup with the choice of ``choice.name`` replaced (its place kept)."""
        return Lineup(tuple(choice if c.name == choice.name else c for c in self.choices))

    def agents(self) -> list[Agent]:
        """Every model version loaded, once each."""
        return list({id(a): a for c in self.choices for a in c.agents}.values())


def share_text(share: float) -> str:
    """A share as a percent, as precise as it was given (``10%``, ``0.5%``, ``33.33%``)."""
    return f"{share * 100:.4g}%"


def model_label(agent: Agent) -> str:
    """``name@version`` of an agent's model."""
    return agent.model.label


def accuracy(agent: Agent) -> float:
    """An agent's validation accuracy as its card reports it, else its fusion weight."""
    card = getattr(agent, "card", None)
    metrics = getattr(card, "metrics", {}) or {}
    return float(metrics.get("val_accuracy", agent.weight))


def card_row_seconds(agent: Agent) -> float | None:
    """The inference time per row its card reports (``metrics.infer_ms_per_row``), if any."""
    card = getattr(agent, "card", None)
    metrics = getattr(card, "metrics", {}) or {}
    value = metrics.get("infer_ms_per_row")
    return float(value) / 1e3 if value is not None and value > 0 else None


def incompatibility(serving: Agent, candidate: Agent) -> str:
    """Why ``candidate`` cannot answer for ``serving``'s type in its place or beside it
    ("" if it can); see :func:`~agents.base.stand_in_problem`."""
    return stand_in_problem(Interface.of(serving), Interface.of(candidate))


def choose(
    row_seconds: Sequence[float | None],
    *,
    rows: int,
    backlog_rows: int,
    time_left_s: float,
) -> tuple[int, str]:
    """Which of several models (most accurate first) answers a batch of ``rows``, and why.

    A model fits when its estimated time for the batch, and for the batch plus the
    ``backlog_rows`` waiting behind it, stays within :data:`TIME_MARGIN` of the earliest
    deadline's ``time_left_s``; an unmeasured model (None) is taken to fit. Returns the
    first that fits, else the fastest, with the reason: ``""`` for the first, else
    ``"deadline"`` (the batch alone would finish late with the first) or ``"backlog"``.
    """
    budget = time_left_s * TIME_MARGIN
    first = row_seconds[0] or 0.0
    reason = "deadline" if rows * first > budget else "backlog"
    for i, cost in enumerate(row_seconds):
        if cost is None or (rows + backlog_rows) * cost <= budget:
            return i, "" if i == 0 else reason
    fastest = min(range(len(row_seconds)), key=lambda i: row_seconds[i] or 0.0)
    return fastest, "" if fastest == 0 else reason


def canary_rows(task_ids: Sequence[str], share: float) -> np.ndarray:
    """Which rows a canary of ``share`` answers: a fixed share of task ids by hash, so a
    subtask delivered again meets the same version."""
    if share <= 0:
        return np.zeros(len(task_ids), np.bool_)
    cut = round(share * CANARY_BUCKETS)
    return np.fromiter(
        (_bucket(task_id) < cut for task_id in task_ids), np.bool_, count=len(task_ids)
    )


def _bucket(task_id: str) -> int:
    digest = hashlib.blake2b(task_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % CANARY_BUCKETS
