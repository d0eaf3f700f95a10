"""The LiteRT runtime (``ai-edge-litert``): small and fast, the default for serving."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from agents.runtimes import LITERT_BUCKETS, predict_in_buckets
from schemas import ModelError


class LiteRTModel:
    """A ``.tflite`` model with one interpreter allocated per batch bucket.

    Resizing an interpreter re-plans its memory, so instead of resizing per call each
    bucket keeps its own interpreter, all allocated at :meth:`warm_up`. Not thread-safe:
    the agent runtime calls it from one inference thread.
    """

    name = "litert"

    def __init__(
        self, path: Path, *, buckets: tuple[int, ...] = LITERT_BUCKETS, threads: int = 1
    ) -> None:
        self.path = path
        self.buckets = tuple(sorted(buckets))
        self.threads = threads
        self._model_bytes = path.read_bytes()
        self._interpreters: dict[int, Any] = {}
        probe = self._interpreter(self.buckets[0])
        details = probe.get_input_details()
        self.input_shapes = [tuple(int(n) for n in d["shape_signature"][1:]) for d in details]
        self.input_dtypes = [np.dtype(d["dtype"]) for d in details]
        # The signature's names, by tensor index: a SavedModel conversion keeps a model's
        # input names but not their order (a head's inputs may come out as gyro, stats, accel).
        by_index: dict[int, str] = {}
        for key in probe.get_signature_list():
            runner = probe.get_signature_runner(key)
            by_index.update({d["index"]: n for n, d in runner.get_input_details().items()})
        self.input_names = [by_index.get(d["index"], d["name"]) for d in details]

    def __repr__(self) -> str:
        return f"LiteRTModel({self.path.name}, buckets={self.buckets})"

    def _interpreter(self, batch: int) -> Any:
        interpreter = self._interpreters.get(batch)
        if interpreter is None:
            try:
                interpreter = Interpreter(model_content=self._model_bytes, num_threads=self.threads)
                for detail in interpreter.get_input_details():
                    shape = list(detail["shape_signature"])
                    shape[0] = batch
                    interpreter.resize_tensor_input(detail["index"], shape, strict=False)
                interpreter.allocate_tensors()
            except (ValueError, RuntimeError) as exc:
                raise ModelError(f"LiteRT cannot load {self.path}: {exc}") from exc
            self._interpreters[batch] = interpreter
        return interpreter

    def warm_up(self) -> None:
        """Allocate and run every bucket once on zeros."""
        for bucket in self.buckets:
            zeros = [
                np.zeros((bucket, *shape), dtype)
                for shape, dtype in zip(self.input_shapes, self.input_dtypes, strict=True)
            ]
            self.predict(zeros)

    def predict(self, inputs: list[np.ndarray]) -> np.ndarray:
        """Run a batch of any size (padded to buckets, chunked past the largest)."""
        if len(inputs) != len(self.input_shapes):
            raise ModelError(
                f"{self.path.name} takes {len(self.input_shapes)} inputs, got {len(inputs)}"
            )
        typed = [np.asarray(x, dtype) for x, dtype in zip(inputs, self.input_dtypes, strict=True)]
        return predict_in_buckets(self._run_bucket, typed, self.buckets)

    def _run_bucket(self, bucket: int, padded: list[np.ndarray]) -> np.ndarray:
        interpreter = self._interpreter(bucket)
        for detail, array in zip(interpreter.get_input_details(), padded, strict=True):
            interpreter.set_tensor(detail["index"], array)
        interpreter.invoke()
        # get_tensor returns a copy, safe to keep after the next invoke
        return np.asarray(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))
