"""What an agent is: a declared subtask type plus one function from a batch of inputs to a
batch of outputs. The runtime around it (:mod:`agents.runtime`) owns everything else."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from schemas import InputSpec, ModelRef


@runtime_checkable
class Agent(Protocol):
    """An agent serving one subtask type.

    ``inputs`` names the sensors it reads (with their expected samples and channels, 0 for
    any); ``labels`` names its outputs in order; ``weight`` is its default fusion weight.
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
        """Map ``{sensor: [batch, samples, channels]}`` to ``[batch, len(labels)]`` scores."""
        ...
