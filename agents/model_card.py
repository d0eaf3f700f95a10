"""The metadata file that sits beside every model: what it reads, what it answers, how good."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agents.base import Interface, check_weight
from schemas import OUTPUT_KINDS, ConfigError, FusebusError, InputSpec, OutputKind
from schemas.limits import check_name

#: The metric a trained model's card reports, whose value is its default fusion weight.
WEIGHT_METRIC = "val_accuracy"


@dataclass(frozen=True)
class ModelCard:
    """A model's card, stored as ``<model>.json`` beside ``<model>.tflite`` / ``.keras``.

    ``inputs`` are in the order the model takes them; ``labels`` name its outputs in order;
    ``weight`` is its default fusion weight: in the JSON file, an explicit ``weight`` key,
    else ``metrics.val_accuracy``, else 1.0 (see :func:`card_weight`).
    """

    type: str
    name: str
    version: str
    labels: tuple[str, ...]
    inputs: tuple[InputSpec, ...]
    weight: float = 1.0
    metrics: dict[str, float] = field(default_factory=dict)
    notes: str = ""
    output: OutputKind = "scores"  # or "features": an array of ``output_shape`` per row
    output_shape: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        owner = f"model card {self.name!r}"
        if self.output not in OUTPUT_KINDS:
            raise ConfigError(f"{owner}: output must be one of {OUTPUT_KINDS}, got {self.output!r}")
        if self.output == "scores" and not self.labels:
            raise ConfigError(f"{owner}: labels must not be empty")
        if self.output == "features":
            if self.labels:
                raise ConfigError(f"{owner}: a features model has no labels")
            if not self.output_shape or any(n < 1 for n in self.output_shape):
                raise ConfigError(
                    f"{owner}: a features model needs its output shape (sizes >= 1), "
                    f"got {list(self.output_shape)}"
                )
        if not self.inputs:
            raise ConfigError(f"{owner}: inputs must not be empty")
        check_weight(self.weight, owner=owner)

    @property
    def interface(self) -> Interface:
        """What the bus is told of a model with this card (see :class:`Interface`)."""
        shape = self.output_shape if self.output == "features" else (len(self.labels),)
        return Interface(self.type, self.inputs, self.labels, (self.output, shape))

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
        return cls.from_dict(raw, where=f"model card {path}")

    @classmethod
    def from_dict(cls, raw: object, *, where: str) -> ModelCard:
        """Validate a card already parsed from JSON (``where`` names it in errors).

        Raises:
            ConfigError: naming ``where`` and the problem.
        """
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a JSON object")
        try:
            metrics = {str(k): float(v) for k, v in raw.get("metrics", {}).items()}
            output = raw.get("output", "scores")
            if isinstance(output, dict):
                kind, shape = output.get("kind", "scores"), output.get("shape", [])
            else:
                kind, shape = output, []
            return cls(
                type=str(raw["type"]),
                name=str(raw["name"]),
                version=str(raw.get("version", "0.0.0")),
                labels=tuple(str(label) for label in raw.get("labels", ())),
                inputs=tuple(_input(i) for i in raw["inputs"]),
                weight=card_weight(raw.get("weight"), metrics, owner=where),
                metrics=metrics,
                notes=str(raw.get("notes", "")),
                output=kind,
                output_shape=tuple(int(n) for n in shape),
            )
        except ConfigError:
            raise  # already names the card and the problem
        except FusebusError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        except KeyError as exc:
            raise ConfigError(f"{where}: missing key {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def to_json(self) -> str:
        """The card as pretty JSON (in the layout :meth:`from_file` reads)."""
        data: dict[str, Any] = asdict(self)
        data["labels"] = list(self.labels)
        data["inputs"] = [
            {"stage": spec.sensor, "shape": list(spec.shape), "optional": spec.optional}
            if spec.stage
            else {"sensor": spec.sensor, "samples": spec.samples, "channels": spec.channels}
            for spec in self.inputs
        ]
        del data["output_shape"]
        if self.output == "features":
            data["output"] = {"kind": "features", "shape": list(self.output_shape)}
        return json.dumps(data, indent=2) + "\n"


def _input(raw: dict[str, Any]) -> InputSpec:
    """One card input: ``{"sensor", "samples", "channels"}``, or ``{"stage", "shape"}`` for
    the output of another subtask type."""
    if "stage" in raw:
        optional = raw.get("optional", False)
        if not isinstance(optional, bool):
            raise ConfigError(f"input {raw['stage']!r}: optional must be true or false")
        shape = tuple(int(n) for n in raw.get("shape", ()))
        if optional and (not shape or 0 in shape):
            raise ConfigError(
                f"input {raw['stage']!r}: an optional input needs a fixed shape (it is given "
                "as zeros when absent)"
            )
        return InputSpec(
            check_name(str(raw["stage"]), "stage"), stage=True, shape=shape, optional=optional
        )
    return InputSpec(str(raw["sensor"]), int(raw.get("samples", 0)), int(raw.get("channels", 0)))


def card_weight(explicit: object, metrics: dict[str, float], *, owner: str) -> float:
    """A card's fusion weight: ``explicit`` when given, else its validation accuracy
    (``metrics.val_accuracy``, which must then be in (0, 1]), else 1.0.

    Raises:
        ConfigError: the weight is not a finite number > 0, naming ``owner`` and its source.
    """
    if explicit is not None:
        return check_weight(explicit, owner=owner)
    if WEIGHT_METRIC not in metrics:
        return 1.0
    accuracy = metrics[WEIGHT_METRIC]
    if not 0 < accuracy <= 1:
        raise ConfigError(
            f"{owner}: metrics.{WEIGHT_METRIC} {accuracy!r} cannot be the fusion weight "
            "(it must be in (0, 1]); give an explicit weight"
        )
    return accuracy
