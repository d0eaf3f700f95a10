"""Model runtimes: LiteRT for ``.tflite`` (default for serving) and Keras for ``.keras``.

Both take a list of input batches (one array per model input) and return a ``[batch,
outputs]`` array. Each warms up at start and keeps one prepared executable per batch
bucket, so that no batch size re-allocates or re-traces while serving: a batch runs as
bucket-sized pieces (see :func:`bucket_plan`). TensorFlow is imported only when a
``.keras`` model is loaded.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from schemas import ConfigError, ModelError

#: Batch sizes prepared at warm-up by the Keras runtime (each one is a traced function).
KERAS_BUCKETS = (1, 8, 64)
#: The LiteRT runtime's: an interpreter per bucket is cheap, and a model call costs about a
#: fixed 10 us plus a per-row share, so finer buckets waste less on padding.
LITERT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
#: A piece is padded up to the next bucket when at most this share of it is padding, or
#: when the bucket below is less than half as big; otherwise the bucket below is run
#: exactly and the rest planned again.
MAX_PADDING = 0.25


class ModelRuntime(Protocol):
    """A loaded model that maps input batches to an output batch.

    ``input_shapes`` and ``input_dtypes`` describe each model input without its batch
    dimension (-1 where the model takes any size), and ``input_names`` names it, in the
    order :meth:`predict` takes them (for LiteRT, the interpreter's, which a conversion may
    have shuffled: names are what tie a model's inputs to its card's).
    """

    name: str
    input_shapes: list[tuple[int, ...]]
    input_dtypes: list[np.dtype]
    input_names: list[str]

    def warm_up(self) -> None:
        """Prepare every batch bucket so the first real call is as fast as the rest."""
        ...

    def predict(self, inputs: list[np.ndarray]) -> np.ndarray:
        """Run the model on a batch; one array per model input, first axis the batch."""
        ...


def bucket_plan(rows: int, buckets: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """How to run ``rows`` rows through fixed-size ``buckets`` (sorted): a list of
    ``(start, size, bucket)`` pieces, each ``size`` rows padded up to ``bucket``.

    Rows past the largest bucket are cut into pieces of that size. A remainder is padded up
    to the smallest bucket holding it when the padding is at most :data:`MAX_PADDING` of
    that bucket or the bucket below is under half its size (so coarse buckets never turn
    into many tiny calls); else the bucket below is run exactly and the rest planned again.
    With ``(1, 2, 4, ..., 64)``, 54 rows run as one padded 64, and 33 as 32 + 1.
    """
    pieces = []
    start = 0
    largest = buckets[-1]
    while start < rows:
        left = rows - start
        if left >= largest:
            pieces.append((start, largest, largest))
            start += largest
            continue
        up = next(b for b in buckets if b >= left)
        down = max((b for b in buckets if b <= left), default=0)
        if up - left <= MAX_PADDING * up or 2 * down < up:
            pieces.append((start, left, up))
            break
        pieces.append((start, down, down))
        start += down
    return pieces


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
    """Run a batch of any size through fixed-size executables, piece by piece as
    :func:`bucket_plan` says: ``run(bucket, padded_inputs)`` per piece, trimmed."""
    rows = len(inputs[0])
    if rows == 0:
        raise ModelError("cannot run an empty batch")
    outputs = [
        run(bucket, [pad_rows(x[start : start + size], bucket) for x in inputs])[:size]
        for start, size, bucket in bucket_plan(rows, buckets)
    ]
    return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)


def infer_ms_per_row(runtime: ModelRuntime, *, batch: int = 32, calls: int = 7) -> float:
    """What one row costs ``runtime``: the median over ``calls`` timed calls (after one
    untimed warm-up call) of a ``batch``-row call on zeros, in milliseconds per row.

    Timed on this machine, under whatever else runs on it: a guide to which of a type's
    models is cheaper, not a constant of the model.
    """
    if batch < 1 or calls < 1:
        raise ValueError(f"batch and calls must be >= 1, got {batch} and {calls}")
    zeros = [
        np.zeros((batch, *(max(n, 1) for n in shape)), dtype)
        for shape, dtype in zip(runtime.input_shapes, runtime.input_dtypes, strict=True)
    ]
    runtime.predict(zeros)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        runtime.predict(zeros)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000 / batch


def load_runtime(path: Path, *, buckets: tuple[int, ...] | None = None) -> ModelRuntime:
    """Load a model file with the runtime its suffix names (``buckets``: that runtime's
    default when not given); raises :class:`ConfigError`."""
    if not path.exists():
        raise ConfigError(f"model file {path} does not exist")
    if path.suffix == ".tflite":
        from agents.runtimes.litert import LiteRTModel

        return LiteRTModel(path, buckets=buckets or LITERT_BUCKETS)
    if path.suffix == ".keras":
        from agents.runtimes.keras import KerasModel

        return KerasModel(path, buckets=buckets or KERAS_BUCKETS)
    raise ConfigError(f"model file {path}: unknown format {path.suffix!r}; use .tflite or .keras")
