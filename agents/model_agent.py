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
        self.output = self.card.output
        self.output_shape = self.card.output_shape
        self._runtime: ModelRuntime = load_runtime(model_path, buckets=buckets)
        self.runtime = self._runtime.name
        # which card input each model input takes, in the order the runtime takes them
        self._feed = check_card_fits_model(self.card, self._runtime, model_path)
        # what the runtime casts each (card) input to: inputs that cannot be cast are refused
        dtypes = dict(zip(self._feed, self._runtime.input_dtypes, strict=True))
        self.input_dtypes = tuple(dtypes[i] for i in range(len(self.inputs)))
        # each (card) input's per-row shape as the model takes it (-1: any size)
        shapes = dict(zip(self._feed, self._runtime.input_shapes, strict=True))
        self.input_shapes = tuple(shapes[i] for i in range(len(self.inputs)))

    def __repr__(self) -> str:
        return f"ModelAgent(type={self.type!r}, model={self.model.name}@{self.model.version}, runtime={self.runtime})"

    def warm_up(self) -> None:
        """Prepare every batch bucket of the runtime."""
        self._runtime.warm_up()

    def predict(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Run the model; checks it answers one score per label per row (or, for a
        features model, the card's output shape per row)."""
        rows = len(next(iter(batch.values())))
        given = [self._input(batch, spec, rows) for spec in self.inputs]
        output = self._runtime.predict([given[i] for i in self._feed])
        per_row = self.output_shape if self.output == "features" else (len(self.labels),)
        if output.shape != (rows, *per_row):
            raise ModelError(
                f"{self.model.name} returned shape {output.shape}, expected {(rows, *per_row)}"
            )
        return output

    def _input(self, batch: dict[str, np.ndarray], spec: InputSpec, rows: int) -> np.ndarray:
        """The batch's input for ``spec``: zeros for an optional one that did not come,
        which is what a model trained with that input dropped out learnt to read."""
        if spec.sensor in batch or not spec.optional:
            return batch[spec.sensor]
        return np.zeros((rows, *spec.shape), np.float32)


def feed_order(card: ModelCard, names: list[str]) -> tuple[int, ...]:
    """Which card input each model input (named ``names``, in the runtime's order) takes:
    by name when the model's inputs are named as the card's are (a model with several
    inputs, whose order a LiteRT conversion does not keep), else by position."""
    wanted = [spec.sensor for spec in card.inputs]
    if len(set(names)) == len(names) and sorted(names) == sorted(wanted):
        return tuple(wanted.index(name) for name in names)
    return tuple(range(len(names)))


def check_card_fits_model(
    card: ModelCard, runtime: ModelRuntime, model_path: Path
) -> tuple[int, ...]:
    """Refuse a card whose inputs the model cannot take: the number of inputs, and each
    input's samples and channels where both the card and the model fix them. Returns which
    card input each model input takes (see :func:`feed_order`).

    Known at start, so said once, at start, rather than with every subtask.

    Raises:
        ConfigError: naming the model file, the input, the card's and the model's shapes.
    """
    if len(card.inputs) != len(runtime.input_shapes):
        raise ConfigError(
            f"model {model_path}: its card lists {len(card.inputs)} inputs, the model takes "
            f"{len(runtime.input_shapes)}"
        )
    feed = feed_order(card, list(runtime.input_names))
    by_card = dict(zip(feed, runtime.input_shapes, strict=True))
    shapes = [by_card[i] for i in range(len(card.inputs))]
    for spec, shape in zip(card.inputs, shapes, strict=True):
        if spec.stage:
            if spec.shape and (
                len(spec.shape) != len(shape)
                or any(c and m > 0 and c != m for c, m in zip(spec.shape, shape, strict=True))
            ):
                raise ConfigError(
                    f"model {model_path}: its card says input {spec.sensor!r} has per-row shape "
                    f"{list(spec.shape)}, the model takes {list(shape)}"
                )
            continue
        model_dims = tuple(shape) if len(shape) == 2 else None
        if model_dims is None:
            raise ConfigError(
                f"model {model_path}: input {spec.sensor!r} has per-row shape {tuple(shape)}; "
                "fusebus feeds a sensor as [samples, channels] (an input that is another type's "
                'output says so in the card: {"stage": <type>, "shape": [...]})'
            )
        for what, card_size, model_size in zip(
            ("samples", "channels"), (spec.samples, spec.channels), model_dims, strict=True
        ):
            if card_size and model_size > 0 and card_size != model_size:
                raise ConfigError(
                    f"model {model_path}: its card says input {spec.sensor!r} has {card_size} "
                    f"{what}, the model takes {model_size}"
                )
    return feed
