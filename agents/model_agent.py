"""The generic model agent: serves any model file that has a card beside it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agents.model_card import ModelCard
from agents.runtimes import ModelRuntime, load_runtime
from schemas import ConfigError, InputSpec, ModelError, ModelRef
from schemas.limits import check_name


class ModelAgent:
    """An agent backed by a ``.tflite`` (LiteRT) or ``.keras`` (TensorFlow) model.

    Args:
        model_path: the model file; ``<name>.json`` beside it is its card.
        type_name: the subtask type to serve; defaults to the card's.
    """

    def __init__(
        self,
        model_path: Path,
        *,
        type_name: str | None = None,
        buckets: tuple[int, ...] | None = None,
    ) -> None:
        if not model_path.exists():
            raise ConfigError(f"model file {model_path} does not exist")
        self.card = ModelCard.for_model(model_path)
        self.type = check_name(type_name or self.card.type, "type")
        self.model = ModelRef(self.card.name, self.card.version)
        self.inputs: tuple[InputSpec, ...] = self.card.inputs
        self.labels = self.card.labels
        self.weight = self.card.weight
        self._runtime: ModelRuntime = load_runtime(model_path, buckets=buckets)
        self.runtime = self._runtime.name

    def __repr__(self) -> str:
        return f"ModelAgent(type={self.type!r}, model={self.model.name}@{self.model.version}, runtime={self.runtime})"

    def warm_up(self) -> None:
        """Prepare every batch bucket of the runtime."""
        self._runtime.warm_up()

    def predict(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Run the model; checks it answers one score per label per row."""
        rows = len(next(iter(batch.values())))
        output = self._runtime.predict([batch[spec.sensor] for spec in self.inputs])
        if output.shape != (rows, len(self.labels)):
            raise ModelError(
                f"{self.model.name} returned shape {output.shape}, expected ({rows}, {len(self.labels)})"
            )
        return output
