"""A rule-based agent: activity from the motion energy of the accelerometer.

Motion energy is the standard deviation of the acceleration magnitude over the window. On
BasicMotions (TRAIN split) it is about 0.2-1.2 standing, 1.0-2.0 walking, 3-5.3 running and
6.2-10.7 playing badminton, so four bands with soft edges make a usable, explainable
classifier that needs no training, and a useful independent voice in fusion.
"""

from __future__ import annotations

import numpy as np

from agents.base import check_weight
from schemas import ConfigError, InputSpec, ModelRef

#: Default bands of motion energy per label, lower and upper edge (from BasicMotions TRAIN).
DEFAULT_BANDS = {
    "standing": (0.0, 1.0),
    "walking": (1.0, 2.5),
    "running": (2.5, 6.0),
    "badminton": (6.0, float("inf")),
}


class MotionEnergyAgent:
    """Scores each label by how close the window's motion energy is to the label's band.

    Args:
        type: the subtask type to serve (default ``motion``).
        sensor: the accelerometer's sensor name (3 channels).
        softness: how fast a label's score falls outside its band, in energy units.
        weight: the agent's fusion weight.
        bands: ``label -> (low, high)`` energy bands; default :data:`DEFAULT_BANDS`.

    String arguments (as given by ``--param key=value`` on the command line) are converted.
    """

    runtime = "rules"

    def __init__(
        self,
        *,
        type: str = "motion",
        sensor: str = "accel",
        softness: float | str = 0.5,
        weight: float | str = 0.5,
        bands: dict[str, tuple[float, float]] | None = None,
    ) -> None:
        self.type = type
        self.bands = dict(bands or DEFAULT_BANDS)
        self.softness = float(softness)
        self.weight = check_weight(weight, owner="motion agent")
        if not self.softness > 0:
            raise ConfigError(f"motion agent: softness must be > 0, got {softness!r}")
        for label, (low, high) in self.bands.items():
            if not low < high:
                raise ConfigError(f"motion agent: band of {label!r} must have low < high")
        self.labels = tuple(self.bands)
        self.inputs: tuple[InputSpec, ...] = (InputSpec(sensor, 0, 3),)
        self.model = ModelRef("motion-energy-rules", "1.0.0")

    def __repr__(self) -> str:
        return f"MotionEnergyAgent(type={self.type!r}, bands={self.bands})"

    def warm_up(self) -> None:
        """Nothing to load."""

    def energy(self, accel: np.ndarray) -> np.ndarray:
        """Motion energy of each window of a ``[batch, samples, 3]`` accelerometer batch."""
        magnitude: np.ndarray = np.linalg.norm(accel.astype(np.float64), axis=-1)
        return np.asarray(magnitude.std(axis=1))

    def predict(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Scores per label, summing to one per row."""
        energy = self.energy(batch[self.inputs[0].sensor])[:, None]
        return band_scores(energy, self.bands, self.softness)


def band_scores(
    energy: np.ndarray, bands: dict[str, tuple[float, float]], softness: float
) -> np.ndarray:
    """Scores per label (summing to one per row) for ``[rows, 1]`` motion energies: 1 inside
    a label's band, falling as ``exp(-distance / softness)`` outside it."""
    low = np.array([b[0] for b in bands.values()])
    high = np.array([b[1] for b in bands.values()])
    outside = np.maximum(low - energy, 0) + np.maximum(energy - high, 0)
    scores = np.exp(-outside / softness)
    normalised: np.ndarray = scores / scores.sum(axis=1, keepdims=True)
    return normalised.astype(np.float32)
