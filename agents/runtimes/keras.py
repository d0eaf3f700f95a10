"""The Keras runtime (TensorFlow): for models LiteRT cannot run.

The model is wrapped once in a ``tf.function`` with a fixed input signature per batch
bucket and traced at warm-up, so serving never re-traces and never goes through
``model.predict`` (which costs about 100 ms of overhead a call).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from agents.runtimes import KERAS_BUCKETS, predict_in_buckets
from schemas import ModelError


class KerasModel:
    """A ``.keras`` model served through one compiled ``tf.function`` per batch bucket."""

    name = "keras"

    def __init__(self, path: Path, *, buckets: tuple[int, ...] = KERAS_BUCKETS) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import keras
        import tensorflow as tf

        self._tf = tf
        self.path = path
        self.buckets = tuple(sorted(buckets))
        try:
            self._model = keras.saving.load_model(path, compile=False)
        except Exception as exc:  # keras raises many types for a bad file
            raise ModelError(f"Keras cannot load {path}: {exc}") from exc
        inputs = self._model.inputs
        self.input_shapes = [tuple(int(d) for d in x.shape[1:]) for x in inputs]
        self.input_names = [str(x.name) for x in inputs]
        # served through float32 signatures, whatever the model was saved with
        self.input_dtypes = [np.dtype(np.float32) for _ in inputs]
        model = self._model
        self._functions: dict[int, Any] = {}
        for bucket in self.buckets:
            signature = [tf.TensorSpec((bucket, *shape), tf.float32) for shape in self.input_shapes]
            self._functions[bucket] = tf.function(
                lambda *xs: model(list(xs) if len(xs) > 1 else xs[0], training=False),
                input_signature=signature,
                jit_compile=False,
            )

    def __repr__(self) -> str:
        return f"KerasModel({self.path.name}, buckets={self.buckets})"

    def warm_up(self) -> None:
        """Trace every bucket's function once."""
        for bucket in self.buckets:
            self.predict([np.zeros((bucket, *shape), np.float32) for shape in self.input_shapes])

    def predict(self, inputs: list[np.ndarray]) -> np.ndarray:
        """Run a batch of any size (padded to buckets, chunked past the largest)."""
        if len(inputs) != len(self.input_shapes):
            raise ModelError(
                f"{self.path.name} takes {len(self.input_shapes)} inputs, got {len(inputs)}"
            )
        typed = [np.asarray(x, np.float32) for x in inputs]
        return predict_in_buckets(self._run_bucket, typed, self.buckets)

    def _run_bucket(self, bucket: int, padded: list[np.ndarray]) -> np.ndarray:
        return np.asarray(self._functions[bucket](*padded))
