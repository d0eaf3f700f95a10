"""The metadata file that sits beside every model: what it reads, what it answers, how good."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from schemas import ConfigError, InputSpec


@dataclass(frozen=True)
class ModelCard:
    """A model's card, stored as ``<model>.json`` beside ``<model>.tflite`` / ``.keras``.

    ``inputs`` are in the order the model takes them; ``labels`` name its outputs in order;
    ``weight`` is its default fusion weight (its validation accuracy for trained models).
    """

    type: str
    name: str
    version: str
    labels: tuple[str, ...]
    inputs: tuple[InputSpec, ...]
    weight: float = 1.0
    metrics: dict[str, float] = field(default_factory=dict)
    notes: str = ""

    def __post_init__(self) -> None:
        if not self.labels:
            raise ConfigError(f"model card {self.name!r}: labels must not be empty")
        if not self.inputs:
            raise ConfigError(f"model card {self.name!r}: inputs must not be empty")
        if not self.weight > 0:
            raise ConfigError(f"model card {self.name!r}: weight must be > 0, got {self.weight}")

    @classmethod
    def for_model(cls, model_path: Path) -> ModelCard:
        """Read the card beside ``model_path`` (same name, ``.json``)."""
        return cls.from_file(model_path.with_suffix(".json"))

    @classmethod
    def from_file(cls, path: Path) -> ModelCard:
        """Read and validate a card; raises :class:`ConfigError` naming the problem."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"model card {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"model card {path}: not JSON ({exc})") from None
        try:
            return cls(
                type=str(raw["type"]),
                name=str(raw["name"]),
                version=str(raw.get("version", "0.0.0")),
                labels=tuple(str(label) for label in raw["labels"]),
                inputs=tuple(
                    InputSpec(str(i["sensor"]), int(i.get("samples", 0)), int(i.get("channels", 0)))
                    for i in raw["inputs"]
                ),
                weight=float(raw.get("weight", 1.0)),
                metrics={str(k): float(v) for k, v in raw.get("metrics", {}).items()},
                notes=str(raw.get("notes", "")),
            )
        except KeyError as exc:
            raise ConfigError(f"model card {path}: missing key {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model card {path}: {exc}") from None

    def to_json(self) -> str:
        """The card as pretty JSON."""
        data: dict[str, Any] = asdict(self)
        data["labels"] = list(self.labels)
        data["inputs"] = [asdict(spec) for spec in self.inputs]
        return json.dumps(data, indent=2) + "\n"
