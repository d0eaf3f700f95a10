"""Agent classes used by the tests as plug-ins (loaded by module:Class)."""

from __future__ import annotations

import numpy as np

from schemas import InputSpec, ModelRef


class ConstantAgent:
    """Always answers the same scores; ``scores`` is a comma-separated list."""

    runtime = "test"

    def __init__(self, *, type: str = "constant", scores: str = "0.7,0.3") -> None:
        self.type = type
        self.scores = np.array([float(s) for s in scores.split(",")], np.float32)
        self.labels: tuple[str, ...] = tuple(f"label{i}" for i in range(len(self.scores)))
        self.inputs: tuple[InputSpec, ...] = (InputSpec("accel", 0, 3),)
        self.model = ModelRef("constant", "1.0.0")
        self.weight = 1.0
        self.calls: list[int] = []

    def warm_up(self) -> None:
        """Nothing to load."""

    def predict(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """The same scores for every row."""
        rows = len(batch["accel"])
        self.calls.append(rows)
        return np.tile(self.scores, (rows, 1))


class BrokenAgent(ConstantAgent):
    """A model that always raises."""

    def predict(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Fail."""
        raise RuntimeError("the model is broken")
