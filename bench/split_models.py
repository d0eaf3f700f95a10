"""The benchmark models cut in two, for :mod:`bench.chain`.

Each benchmark model (:mod:`bench.workload`: Conv1D, Conv1D, pooling, Dense) is cut after
its pooling: ``<type>_enc`` reads the sensor and answers the 32 pooled features, ``<type>``
(the Dense layer) reads them as a stage input and answers the class scores, and
``<type>_head`` is the same Dense layer reading the features from a ``[128, 1]`` sensor of
the frame (the first 32 values: a frame's sensors all have 128 samples). Built once from
the cached Keras models with TensorFlow, converted to LiteRT, checked against the whole
models, and cached with their cards in ``<cache>/split``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.workload import LABELS, SAMPLES, SENSORS, TYPES, build_models, cache_dir, frames
from schemas import InputSpec

FEATURES = 32  # the pooled features of a benchmark model (its second Conv1D's filters)


def encoder(type_name: str) -> str:
    """The stage-1 type of a benchmark type in the chain."""
    return f"{type_name}_enc"


def head(type_name: str) -> str:
    """The type of a benchmark model's head beside it, reading features from the frame."""
    return f"{type_name}_head"


def features_sensor(type_name: str) -> str:
    """The frame's sensor that carries a head's features beside the model."""
    return f"{type_name}_features"


def build_split_models(out: Path | None = None) -> Path:
    """Make (or reuse) each benchmark model cut in two: ``<type>_enc.tflite`` (sensor in,
    pooled features out) and ``<type>.tflite`` (features in, scores out), and its head
    reading the features from a ``[128, 1]`` sensor (``<type>_head.tflite``: the first 32
    values), with cards.
    Returns their folder.

    Raises:
        RuntimeError: the two halves, run one after the other, do not give what the whole
            model gives.
    """
    whole = build_models()
    out = out or cache_dir() / "split"
    if all((out / f"{name}.tflite").exists() for t in TYPES for name in (t, encoder(t), head(t))):
        return out
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from agents.model_card import ModelCard
    from agents.runtimes.litert import LiteRTModel
    from agents.training import export_tflite

    out.mkdir(parents=True, exist_ok=True)
    data = frames(16)
    for type_name, sensor in zip(TYPES, SENSORS, strict=True):
        model = keras.models.load_model(whole / f"{type_name}.keras")
        pooled = model.layers[-2].output
        export_tflite(keras.Model(model.inputs, pooled), out / f"{encoder(type_name)}.tflite")
        dense = model.layers[-1]
        features = keras.Input((FEATURES,))
        export_tflite(keras.Model(features, dense(features)), out / f"{type_name}.tflite")
        rows = keras.Input((SAMPLES, 1))
        cropped = keras.layers.Cropping1D((0, SAMPLES - FEATURES))(rows)
        beside = keras.Model(rows, dense(keras.layers.Flatten()(cropped)))
        export_tflite(beside, out / f"{head(type_name)}.tflite")
        card = ModelCard.for_model(whole / f"{type_name}.tflite")
        (out / f"{encoder(type_name)}.json").write_text(
            ModelCard(
                type=encoder(type_name),
                name=f"{card.name}-enc",
                version=card.version,
                labels=(),
                inputs=card.inputs,
                notes=f"the convolutions and pooling of {card.name}: its pooled features",
                output="features",
                output_shape=(FEATURES,),
            ).to_json(),
            encoding="utf-8",
        )
        (out / f"{type_name}.json").write_text(
            ModelCard(
                type=type_name,
                name=f"{card.name}-head",
                version=card.version,
                labels=LABELS,
                inputs=(InputSpec(encoder(type_name), stage=True, shape=(FEATURES,)),),
                weight=card.weight,
                notes=f"the last Dense layer of {card.name}, reading {encoder(type_name)}",
            ).to_json(),
            encoding="utf-8",
        )
        (out / f"{head(type_name)}.json").write_text(
            ModelCard(
                type=head(type_name),
                name=f"{card.name}-head-beside",
                version=card.version,
                labels=LABELS,
                inputs=(InputSpec(features_sensor(type_name), SAMPLES, 1),),
                weight=card.weight,
                notes=f"the last Dense layer of {card.name}, reading features from the frame",
            ).to_json(),
            encoding="utf-8",
        )
        x = np.stack([f[sensor] for f in data])
        full = LiteRTModel(whole / f"{type_name}.tflite").predict([x])
        enc = LiteRTModel(out / f"{encoder(type_name)}.tflite").predict([x])
        split = LiteRTModel(out / f"{type_name}.tflite").predict([enc])
        padded = np.pad(enc, ((0, 0), (0, SAMPLES - FEATURES)))[:, :, None]
        side = LiteRTModel(out / f"{head(type_name)}.tflite").predict([padded])
        if not (np.allclose(full, split, atol=1e-5) and np.allclose(split, side, atol=1e-6)):
            raise RuntimeError(f"{type_name} cut in two answers differently from the whole model")
    return out


def model_us_per_frame(batch: int) -> tuple[float, float]:
    """In this process, no bus: the microseconds per frame of the three whole models, and
    of the three cut in two (encoder then head), called ``batch`` frames at a time (the
    median of 5 timings of about 2,000 frames each)."""
    from agents.runtimes.litert import LiteRTModel

    whole, split = build_models(), build_split_models()
    rounds = max(20, 2000 // batch)
    data = frames(batch)
    x = {s: np.stack([f[s] for f in data]) for s in SENSORS}

    def load(path: Path) -> LiteRTModel:
        model = LiteRTModel(path, buckets=(batch,))
        model.warm_up()
        return model

    models = [load(whole / f"{t}.tflite") for t in TYPES]
    halves = [(load(split / f"{encoder(t)}.tflite"), load(split / f"{t}.tflite")) for t in TYPES]

    def one_stage() -> None:
        for model, sensor in zip(models, SENSORS, strict=True):
            model.predict([x[sensor]])

    def two_stages() -> None:
        for (enc, head), sensor in zip(halves, SENSORS, strict=True):
            head.predict([enc.predict([x[sensor]])])

    def timed(run: Callable[[], None]) -> float:
        times = []
        for _ in range(5):
            began = time.perf_counter()
            for _ in range(rounds):
                run()
            times.append((time.perf_counter() - began) * 1e6 / (rounds * batch))
        return statistics.median(times)

    return timed(one_stage), timed(two_stages)
