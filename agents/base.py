"""What an agent is: a declared subtask type plus one function from a batch of inputs to a
batch of outputs. The runtime around it (:mod:`agents.runtime`) owns everything else."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from schemas import OUTPUT_KINDS, ConfigError, InputSpec, ModelRef, OutputKind


@runtime_checkable
class Agent(Protocol):
    """An agent serving one subtask type.

    ``inputs`` names the sensors it reads (with their expected samples and channels, 0 for
    any), and the other subtask types whose outputs it reads (``InputSpec(type, stage=True,
    shape=...)``); ``labels`` names its outputs in order; ``weight`` is its default fusion
    weight (finite and > 0). An agent may also give ``input_dtypes``, the dtype each input
    is cast to; inputs that cannot be cast to it are answered with an ``input_mismatch``
    error.

    An agent that answers features rather than class scores (a stage of a model chain,
    read by other types) sets ``output = "features"``, ``output_shape`` to its per-row
    shape and ``labels = ()``; see :func:`output_of`.
    """

    type: str
    model: ModelRef
    runtime: str
    inputs: tuple[InputSpec, ...]
    labels: tuple[str, ...]
    weight: float

    def warm_up(self) -> None:
        """Load and prepare the model; called once before the first batch."""
        ...

    def predict(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Map ``{input: [batch, ...]}`` (a sensor's ``[batch, samples, channels]``, an
        upstream type's ``[batch, *its output shape]``) to ``[batch, len(labels)]`` scores,
        or ``[batch, *output_shape]`` features."""
        ...


def output_of(agent: Agent) -> tuple[OutputKind, tuple[int, ...]]:
    """What ``agent`` answers and its per-row shape: ``("scores", (len(labels),))`` unless
    it declares ``output = "features"`` with an ``output_shape``.

    Raises:
        ConfigError: the declaration is not one fusebus can carry.
    """
    kind = getattr(agent, "output", "scores")
    if kind == "scores":
        if not agent.labels:
            raise ConfigError(f"agent {agent.type!r}: a scores agent needs labels")
        return "scores", (len(agent.labels),)
    if kind != "features":
        raise ConfigError(
            f"agent {agent.type!r}: output must be one of {OUTPUT_KINDS}, got {kind!r}"
        )
    shape = tuple(getattr(agent, "output_shape", ()))
    if not shape or not all(isinstance(n, int) and n >= 1 for n in shape):
        raise ConfigError(
            f"agent {agent.type!r}: a features agent needs output_shape (sizes >= 1), got {shape!r}"
        )
    return "features", shape


def check_weight(weight: object, *, owner: str) -> float:
    """``weight`` as a fusion weight: a finite number > 0.

    Args:
        weight: the value given (a number, or text such as a ``--param``).
        owner: who declares it, for the error (``model card m.json``, ``agent motion``).

    Raises:
        ConfigError: it is not a number, not finite, or not > 0.
    """
    try:
        value = float(weight)  # type: ignore[arg-type]  # text and numbers both welcome
    except (TypeError, ValueError):
        raise ConfigError(f"{owner}: weight must be a number, got {weight!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{owner}: weight must be finite and > 0, got {weight!r}")
    return value


@dataclass(frozen=True)
class Interface:
    """What the rest of the bus is told of a model: the type it serves, the inputs it
    reads, the labels and output it answers. Versions of one model, and the models one
    replica chooses among, share it."""

    type: str
    inputs: tuple[InputSpec, ...]
    labels: tuple[str, ...]
    output: tuple[OutputKind, tuple[int, ...]]  # kind and per-row shape (see output_of)

    @classmethod
    def of(cls, agent: Agent) -> Interface:
        """An agent's interface."""
        return cls(agent.type, tuple(agent.inputs), tuple(agent.labels), output_of(agent))


def stand_in_problem(serving: Interface, candidate: Interface) -> str:
    """Why a model of interface ``candidate`` cannot answer in place of (or beside) one of
    ``serving`` ("" if it can): the coordinator and fusion would be told one thing and given
    another."""
    if candidate.type != serving.type:
        return f"it serves type {candidate.type!r}, not {serving.type!r}"
    if candidate.inputs != serving.inputs:
        return "it reads other inputs"
    if candidate.labels != serving.labels:
        return f"it answers labels {list(candidate.labels)}, not {list(serving.labels)}"
    if candidate.output != serving.output:
        return "it answers another output kind or shape"
    return ""
