"""Recorded sensor datasets shipped in ``data/``, as arrays split by sensor."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusebus.paths import data_dir
from schemas import ConfigError


@dataclass(frozen=True)
class SensorDataset:
    """A labelled multivariate dataset whose channels belong to named sensors.

    ``x_*`` arrays are ``(cases, samples, channels)``; ``sensors`` maps each sensor to the
    channel indexes it owns.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    labels: tuple[str, ...]
    sensors: dict[str, tuple[int, ...]]
    sample_rate_hz: float

    @property
    def period_ns(self) -> int:
        """Nanoseconds between two samples."""
        return round(1e9 / self.sample_rate_hz)

    def sensor_view(self, x: np.ndarray, sensor: str) -> np.ndarray:
        """The channels of ``sensor`` from an ``x`` array (one case or many)."""
        return x[..., list(self.sensors[sensor])]


def load_basicmotions(path: Path | None = None) -> SensorDataset:
    """Load BasicMotions (UEA archive): a smartwatch's accelerometer and gyroscope at 10 Hz."""
    source = path or data_dir() / "basicmotions.npz"
    if not source.exists():
        raise ConfigError(f"dataset file {source} does not exist")
    with np.load(source) as npz:
        return SensorDataset(
            name="basicmotions",
            x_train=npz["x_train"],
            y_train=npz["y_train"],
            x_test=npz["x_test"],
            y_test=npz["y_test"],
            labels=tuple(str(label) for label in npz["label_names"]),
            sensors={"accel": (0, 1, 2), "gyro": (3, 4, 5)},
            sample_rate_hz=float(npz["sample_rate_hz"]),
        )


DATASETS = {"basicmotions": load_basicmotions}


def load_dataset(name: str) -> SensorDataset:
    """Load a shipped dataset by name; raises :class:`ConfigError` for an unknown one."""
    loader = DATASETS.get(name)
    if loader is None:
        raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return loader()
