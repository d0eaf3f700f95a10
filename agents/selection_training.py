"""Train the models an agent selects among by deadline: for one sensor's subtask type, an
accurate but costly model (``<type>-large``) and a fast, cheap one (``<type>-small``).

Both are fitted exactly as :mod:`agents.training` fits the per-sensor classifier (the same
seeded split, augmentation and optimiser), so the three are scored on the same held-out
cases. Each card records, besides its accuracies, ``infer_ms_per_row``: what a row costs
the exported model served by LiteRT (one thread, as agents serve it) in a 32-row call, timed
on the training machine (see :func:`agents.runtimes.infer_ms_per_row`).

This module imports TensorFlow; training is reproducible from one seed (the timings are
measured again by every run, so only they differ between runs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from agents.model_card import ModelCard
from agents.runtimes import infer_ms_per_row
from agents.training import (
    Builder,
    TrainingSettings,
    classifier_card,
    export_tflite,
    fit_classifier,
)

#: The convolutions of the large model, as (filters, kernel size), one after the other at
#: the window's full length: real capacity, and a real per-row cost.
LARGE_CONVOLUTIONS = ((64, 7), (128, 7), (128, 7), (128, 7), (128, 7), (128, 7))
#: The small model reads the window averaged over this many samples at a time.
SMALL_POOL = 4


def build_large(samples: int, channels: int, classes: int, x_fit: np.ndarray) -> Any:
    """A deep, wide Conv1D stack: six convolutions of 64-128 filters over every sample."""
    import keras

    window = keras.Input((samples, channels), name="window")
    h = _normalise(keras, x_fit)(window)
    for i, (filters, kernel) in enumerate(LARGE_CONVOLUTIONS):
        h = keras.layers.Conv1D(
            filters, kernel, padding="same", activation="relu", name=f"conv{i}"
        )(h)
    h = keras.layers.GlobalAveragePooling1D(name="pool")(h)
    h = keras.layers.Dropout(0.2, name="dropout")(h)
    h = keras.layers.Dense(64, activation="relu", name="hidden")(h)
    outputs = keras.layers.Dense(classes, activation="softmax", name="probabilities")(h)
    return keras.Model(window, outputs, name="large")


def build_small(samples: int, channels: int, classes: int, x_fit: np.ndarray) -> Any:
    """One narrow convolution over the window averaged down by :data:`SMALL_POOL`."""
    import keras

    window = keras.Input((samples, channels), name="window")
    h = _normalise(keras, x_fit)(window)
    h = keras.layers.AveragePooling1D(SMALL_POOL, name="downsample")(h)
    h = keras.layers.Conv1D(8, 3, padding="same", activation="relu", name="conv0")(h)
    h = keras.layers.GlobalAveragePooling1D(name="pool")(h)
    outputs = keras.layers.Dense(classes, activation="softmax", name="probabilities")(h)
    return keras.Model(window, outputs, name="small")


@dataclass(frozen=True)
class Variant:
    """One model of a type to select from: how it is built and what its card says it is."""

    build: Builder
    description: str
    learning_rate: float | None = None  # None: the training settings' rate


#: The models trained, by the suffix of their files and cards.
VARIANTS: dict[str, Variant] = {
    # A plain stack this deep settled at 0.75 validation accuracy with the classifiers'
    # 3e-3; at 1e-3 (and 3e-4) it fits every held-out case.
    "large": Variant(
        build_large,
        "six Conv1D layers of 64-128 filters (kernel 7) at full length, then a dense layer",
        learning_rate=1e-3,
    ),
    "small": Variant(
        build_small,
        f"one Conv1D layer of 8 filters on the window averaged over {SMALL_POOL} samples",
    ),
}


def train_selection_models(
    *,
    type_name: str,
    sensor: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    labels: tuple[str, ...],
    out_dir: Path,
    dataset: str = "basicmotions",
    settings: TrainingSettings | None = None,
) -> dict[str, ModelCard]:
    """Train, validate, export and time each of :data:`VARIANTS` for one sensor.

    Args:
        type_name: the subtask type the models serve; their files are
            ``<type_name>-<variant>`` (``.keras``, ``.tflite``, ``.json``) in ``out_dir``.
        sensor: the input the models read, ``[cases, samples, channels]`` in ``x_train``
            and ``x_test``.
        dataset: the dataset's name, which starts the cards' names.

    Only ``x_train``/``y_train`` are fitted on (minus the seeded validation hold-out);
    ``x_test`` is scored once, for the cards. Returns the cards by variant.
    """
    settings = settings or TrainingSettings()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from agents.runtimes.litert import LiteRTModel

    out_dir.mkdir(parents=True, exist_ok=True)
    cards = {}
    for variant, spec in VARIANTS.items():
        stem = f"{type_name}-{variant}"
        rate = spec.learning_rate or settings.learning_rate
        model, fit_idx, val_idx = fit_classifier(
            spec.build,
            x_train,
            y_train,
            classes=len(labels),
            settings=replace(settings, learning_rate=rate),
        )
        # Saved uncompiled: the file holds what serving needs, not the optimiser's state
        # (which would triple the large model's file).
        served = keras.Model(model.inputs, model.outputs, name=model.name)
        served.save(out_dir / f"{stem}.keras")
        export_tflite(served, out_dir / f"{stem}.tflite")
        runtime = LiteRTModel(out_dir / f"{stem}.tflite", buckets=(32,))
        cards[variant] = classifier_card(
            model,
            type_name=type_name,
            name=f"{dataset}-{stem}",
            sensor=sensor,
            labels=labels,
            train=(x_train, y_train),
            test=(x_test, y_test),
            split=(fit_idx, val_idx),
            metrics={
                "infer_ms_per_row": round(infer_ms_per_row(runtime, batch=32), 6),
                "params": float(model.count_params()),
            },
            notes=(
                f"{spec.description}, on the {sensor} channels of {dataset} TRAIN, seed "
                f"{settings.seed}, {settings.epochs} epochs, learning rate {rate:g}; validated on {len(val_idx)} "
                "held-out TRAIN cases; test_accuracy is informational; infer_ms_per_row is "
                "the LiteRT (1 thread) median of 7 calls of 32 rows after warm-up, on the "
                "training machine."
            ),
        )
        (out_dir / f"{stem}.json").write_text(cards[variant].to_json(), encoding="utf-8")
    return cards


def _normalise(keras: Any, x_fit: np.ndarray) -> Any:
    """A normalisation layer adapted to ``x_fit``, so the model reads raw sensor units."""
    normalise = keras.layers.Normalization(axis=-1, name="normalise")
    normalise.adapt(x_fit)
    return normalise
