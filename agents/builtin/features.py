"""Rule-based stages for model chains: plain numpy, no model file.

:class:`SmoothingStage` is a preprocessing step (a moving average over each channel) and
:class:`WindowStatsStage` a feature step (per-channel summary statistics and the motion
energy). Each answers ``features`` that other subtask types of the same window read, so a
chain may mix rules and trained models: ``smooth -> stats -> head``, or encoders beside
``stats`` feeding one head. :class:`EnergyBandsHead` closes such a chain with class scores
from the motion energy that ``stats`` computes, as :class:`~agents.builtin.motion
.MotionEnergyAgent` does from raw data.
"""

from __future__ import annotations

import numpy as np

from agents.base import check_weight
from agents.builtin.motion import DEFAULT_BANDS, band_scores
from schemas import ConfigError, InputSpec, ModelRef

#: The statistics :class:`WindowStatsStage` gives per channel, in order; the motion energy
#: (the standard deviation of the magnitude over the window) follows them.
STATS = ("mean", "std", "min", "max")


def _positive_int(value: int | str, what: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be an integer, got {value!r}") from None
    if number < 1:
        raise ConfigError(f"{what} must be >= 1, got {value!r}")
    return number


def _flag(value: bool | str) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise ConfigError(f"expected true or false, got {value!r}")


class SmoothingStage:
    """A moving average of ``width`` samples over each channel of a window, same shape out.

    Args:
        type: the subtask type to serve (default ``smooth``).
        sensor: the sensor it reads.
        samples, channels: the window's shape (the output shape is declared up front).
        width: samples averaged; the edges average what the window has.
    """

    runtime = "rules"
    output = "features"
    labels: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        type: str = "smooth",
        sensor: str = "accel",
        samples: int | str = 100,
        channels: int | str = 3,
        width: int | str = 5,
        weight: float | str = 1.0,
    ) -> None:
        self.type = type
        self.width = _positive_int(width, "smoothing stage: width")
        samples_n = _positive_int(samples, "smoothing stage: samples")
        channels_n = _positive_int(channels, "smoothing stage: channels")
        self.inputs: tuple[InputSpec, ...] = (InputSpec(sensor, samples_n, channels_n),)
        self.output_shape = (samples_n, channels_n)
        self.weight = check_weight(weight, owner="smoothing stage")
        self.model = ModelRef("moving-average", "1.0.0")

    def __repr__(self) -> str:
        return f"SmoothingStage(type={self.type!r}, width={self.width})"

    def warm_up(self) -> None:
        """Nothing to load."""

    def predict(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """``[rows, samples, channels]`` in, the same shape out, each channel averaged."""
        x = batch[self.inputs[0].sensor].astype(np.float64)
        n = x.shape[1]
        # Sample i averages [i - width//2, i - width//2 + width), cut to the window: a
        # difference of running sums, one pass whatever the width.
        running = np.cumsum(np.pad(x, ((0, 0), (1, 0), (0, 0))), axis=1)
        start = np.clip(np.arange(n) - self.width // 2, 0, n)
        end = np.clip(np.arange(n) - self.width // 2 + self.width, 0, n)
        sums = running[:, end, :] - running[:, start, :]
        return np.asarray(sums / (end - start)[None, :, None], np.float32)


class WindowStatsStage:
    """Per-channel mean, standard deviation, minimum and maximum of a window, then its
    motion energy (the standard deviation of the magnitude): ``4 * channels + 1`` features.

    Args:
        type: the subtask type to serve (default ``stats``).
        source: what it reads: a sensor, or with ``stage`` the subtask type whose output
            (``[samples, channels]``, e.g. :class:`SmoothingStage`'s) it reads.
        channels: channels of that input.
    """

    runtime = "rules"
    output = "features"
    labels: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        type: str = "stats",
        source: str = "accel",
        stage: bool | str = False,
        channels: int | str = 3,
        weight: float | str = 1.0,
    ) -> None:
        self.type = type
        self.channels = _positive_int(channels, "stats stage: channels")
        from_stage = _flag(stage)
        self.inputs: tuple[InputSpec, ...] = (
            (InputSpec(source, stage=True, shape=(0, self.channels)),)
            if from_stage
            else (InputSpec(source, 0, self.channels),)
        )
        self.output_shape = (len(STATS) * self.channels + 1,)
        self.weight = check_weight(weight, owner="stats stage")
        self.model = ModelRef("window-stats", "1.0.0")

    def __repr__(self) -> str:
        return f"WindowStatsStage(type={self.type!r}, reads={self.inputs[0].sensor!r})"

    def warm_up(self) -> None:
        """Nothing to load."""

    def predict(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """``[rows, samples, channels]`` in, ``[rows, 4 * channels + 1]`` features out."""
        x = batch[self.inputs[0].sensor].astype(np.float64)
        stats = [x.mean(axis=1), x.std(axis=1), x.min(axis=1), x.max(axis=1)]
        energy = np.linalg.norm(x, axis=-1).std(axis=1, keepdims=True)
        return np.concatenate([*stats, energy], axis=1).astype(np.float32)


class EnergyBandsHead:
    """Class scores from the motion energy a :class:`WindowStatsStage` computed: the last
    of its features. The bands are :data:`~agents.builtin.motion.DEFAULT_BANDS`.

    Args:
        type: the subtask type to serve (default ``energy``).
        stage: the stats stage it reads.
        features: that stage's feature count (``4 * channels + 1``).
    """

    runtime = "rules"

    def __init__(
        self,
        *,
        type: str = "energy",
        stage: str = "stats",
        features: int | str = 4 * 3 + 1,
        softness: float | str = 0.5,
        weight: float | str = 0.5,
    ) -> None:
        self.type = type
        count = _positive_int(features, "energy head: features")
        self.inputs: tuple[InputSpec, ...] = (InputSpec(stage, stage=True, shape=(count,)),)
        self.softness = float(softness)
        if not self.softness > 0:
            raise ConfigError(f"energy head: softness must be > 0, got {softness!r}")
        self.labels = tuple(DEFAULT_BANDS)
        self.weight = check_weight(weight, owner="energy head")
        self.model = ModelRef("energy-bands", "1.0.0")

    def __repr__(self) -> str:
        return f"EnergyBandsHead(type={self.type!r}, reads={self.inputs[0].sensor!r})"

    def warm_up(self) -> None:
        """Nothing to load."""

    def predict(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Scores per label from the last feature of each row."""
        energy = batch[self.inputs[0].sensor][:, -1:].astype(np.float64)
        return band_scores(energy, DEFAULT_BANDS, self.softness)
