"""Model runtimes: LiteRT for ``.tflite`` (default for serving) and Keras for ``.keras``.

Both take a list of input batches (one array per model input) and return a ``[batch,
outputs]`` array. Each warms up at start and keeps one prepared executable per batch
bucket, padding a batch up to the next bucket, so that no batch size re-allocates or
re-traces while serving. TensorFlow is imported only when a ``.keras`` model is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from schemas import ConfigError, ModelError

#: Batch sizes prepared at warm-up; a batch is padded up to the next one.
DEFAULT_BUCKETS = (1, 8, 64)


class ModelRuntime(Protocol):
    """A loaded model that maps input batches to an output batch."""

    name: str

    def warm_up(self) -> None:
        """Prepare every batch bucket so the first real call is as fast as the rest."""
        ...

    def predict(self, inputs: list[np.ndarray]) -> np.ndarray:
        """Run the model on a batch; one array per model input, first axis the batch."""
        ...


def bucket_for(size: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket holding ``size`` rows, or the largest bucket."""
    for bucket in buckets:
        if size <= bucket:
            return bucket
    return buckets[-1]


def pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """``array`` padded with zero rows up to ``rows``."""
    if len(array) == rows:
        return array
    padded = np.zeros((rows, *array.shape[1:]), dtype=array.dtype)
    padded[: len(array)] = array
    return padded


def predict_in_buckets(
    run: Callable[[int, list[np.ndarray]], np.ndarray],
    inputs: list[np.ndarray],
    buckets: tuple[int, ...],
) -> np.ndarray:
    """Run a batch of any size through fixed-size executables.

    The batch is cut into chunks of at most the largest bucket; each chunk is padded up to
    the smallest bucket that holds it, run as ``run(bucket, padded_inputs)``, and trimmed.
    """
    rows = len(inputs[0])
    if rows == 0:
        raise ModelError("cannot run an empty batch")
    largest = buckets[-1]
    outputs = []
    for start in range(0, rows, largest):
        chunk = [x[start : start + largest] for x in inputs]
        size = len(chunk[0])
        bucket = bucket_for(size, buckets)
        outputs.append(run(bucket, [pad_rows(x, bucket) for x in chunk])[:size])
    return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)


def load_runtime(path: Path, *, buckets: tuple[int, ...] = DEFAULT_BUCKETS) -> ModelRuntime:
    """Load a model file with the runtime its suffix names; raises :class:`ConfigError`."""
    if not path.exists():
        raise ConfigError(f"model file {path} does not exist")
    if path.suffix == ".tflite":
        from agents.runtimes.litert import LiteRTModel

        return LiteRTModel(path, buckets=buckets)
    if path.suffix == ".keras":
        from agents.runtimes.keras import KerasModel

        return KerasModel(path, buckets=buckets)
    raise ConfigError(f"model file {path}: unknown format {path.suffix!r}; use .tflite or .keras")
