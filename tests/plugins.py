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


class LevelAgent:
    """Tells ``high`` from ``low`` by the sign of one sensor's mean: the kind of model a user
    brings for their own dataset (see ``tests/test_byo_data.py``)."""

    runtime = "test"
    sensor = "imu"
    channels = 3
    samples = 20

    def __init__(self, *, type: str | None = None) -> None:
        self.type = type or self.sensor
        self.labels: tuple[str, ...] = ("high", "low")
        self.inputs: tuple[InputSpec, ...] = (InputSpec(self.sensor, self.samples, self.channels),)
        self.model = ModelRef(f"level-{self.sensor}", "1.0.0")
        self.weight = 1.0

    def warm_up(self) -> None:
        """Nothing to load."""

    def predict(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """``[p(high), p(low)]`` from a squashed mean, so fusion has scores to weigh."""
        mean = batch[self.sensor].mean(axis=(1, 2))
        high = 1.0 / (1.0 + np.exp(-4.0 * mean))
        return np.stack([high, 1.0 - high], axis=1).astype(np.float32)


class ImuLevelAgent(LevelAgent):
    """:class:`LevelAgent` on the three-channel ``imu`` sensor."""


class MicLevelAgent(LevelAgent):
    """:class:`LevelAgent` on the one-channel ``mic`` sensor."""

    sensor = "mic"
    channels = 1
