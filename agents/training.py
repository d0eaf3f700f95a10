"""Train a small Conv1D classifier per sensor and export it for serving.

This module imports TensorFlow; only training and the Keras runtime do. Training is
reproducible: one seed fixes the split, the augmentation, the weights and the op order.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agents.model_card import ModelCard
from schemas import InputSpec


@dataclass(frozen=True)
class TrainingSettings:
    """How to train one classifier."""

    seed: int = 7
    epochs: int = 120
    batch_size: int = 16
    learning_rate: float = 3e-3
    val_per_class: int = 3  # cases of each class held out of TRAIN for validation
    augment_copies: int = 8  # shifted, scaled copies of each training case


def stratified_split(
    y: np.ndarray, per_class: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Indexes of a train/validation split holding out ``per_class`` cases of each class."""
    val = np.concatenate(
        [rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in np.unique(y)]
    )
    train = np.setdiff1d(np.arange(len(y)), val)
    return train, np.sort(val)


def augment(
    x: np.ndarray, y: np.ndarray, copies: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Add ``copies`` circularly shifted, amplitude-scaled, noisy versions of every case."""
    xs, ys = [x], [y]
    for _ in range(copies):
        shifts = rng.integers(0, x.shape[1], size=len(x))
        shifted = np.stack([np.roll(case, s, axis=0) for case, s in zip(x, shifts, strict=True)])
        scale = rng.uniform(0.85, 1.15, size=(len(x), 1, x.shape[2]))
        noise = rng.normal(0.0, 0.02, size=x.shape) * x.std(axis=(0, 1), keepdims=True)
        xs.append((shifted * scale + noise).astype(np.float32))
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def build_model(samples: int, channels: int, classes: int, x_train: np.ndarray) -> Any:
    """A small Conv1D classifier that normalises its raw input itself."""
    import keras

    normalise = keras.layers.Normalization(axis=-1)
    normalise.adapt(x_train)
    inputs = keras.Input((samples, channels), name="window")
    h = normalise(inputs)
    h = keras.layers.Conv1D(16, 5, padding="same", activation="relu")(h)
    h = keras.layers.Conv1D(32, 5, padding="same", activation="relu")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    h = keras.layers.Dropout(0.2)(h)
    outputs = keras.layers.Dense(classes, activation="softmax", name="probabilities")(h)
    return keras.Model(inputs, outputs)


def export_tflite(model: Any, path: Path) -> None:
    """Convert ``model`` to a LiteRT flatbuffer with a resizable batch dimension.

    The conversion goes through a SavedModel export: converting a traced function of a
    Keras 3 model directly loses its weights in TF 2.21 (it predicts one class for all).
    """
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="fusebus-export-") as saved:
        model.export(saved, format="tf_saved_model", verbose=False)
        path.write_bytes(tf.lite.TFLiteConverter.from_saved_model(saved).convert())


#: Builds a classifier: ``(samples, channels, classes, x_fit) -> keras.Model``, where
#: ``x_fit`` are the (unaugmented) training cases its normalisation adapts to.
Builder = Callable[[int, int, int, np.ndarray], Any]


def fit_classifier(
    build: Builder,
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    classes: int,
    settings: TrainingSettings,
) -> tuple[Any, np.ndarray, np.ndarray]:
    """Fit ``build``'s model on ``x_train`` minus a seeded validation hold-out, augmented.

    Seeds Keras and numpy with ``settings.seed`` first, so the split, the augmentation and
    the weights are the same whatever was trained before in the process. Returns the fitted
    model and the indexes of the fitted and the held-out cases.
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(settings.seed)
    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(settings.seed)
    fit_idx, val_idx = stratified_split(y_train, settings.val_per_class, rng)
    x_fit, y_fit = augment(x_train[fit_idx], y_train[fit_idx], settings.augment_copies, rng)

    model = build(x_train.shape[1], x_train.shape[2], classes, x_train[fit_idx])
    model.compile(
        optimizer=keras.optimizers.Adam(settings.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(
        x_fit,
        y_fit,
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        shuffle=True,
        verbose=0,
    )
    return model, fit_idx, val_idx


def classifier_accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    """The share of cases ``x`` whose highest score is their class ``y``."""
    return float(np.mean(np.argmax(model(x, training=False).numpy(), axis=1) == y))


def train_sensor_model(
    *,
    type_name: str,
    sensor: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    labels: tuple[str, ...],
    out_dir: Path,
    settings: TrainingSettings = TrainingSettings(),
) -> ModelCard:
    """Train, validate and export one sensor's classifier; writes ``.keras``, ``.tflite``, ``.json``.

    Only ``x_train``/``y_train`` are fitted on (minus a seeded validation hold-out);
    ``x_test`` is scored once, for the card, and never used to choose anything.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    model, fit_idx, val_idx = fit_classifier(
        build_model, x_train, y_train, classes=len(labels), settings=settings
    )
    card = classifier_card(
        model,
        type_name=type_name,
        name=f"basicmotions-{type_name}",
        sensor=sensor,
        labels=labels,
        train=(x_train, y_train),
        test=(x_test, y_test),
        split=(fit_idx, val_idx),
        notes=(
            f"Conv1D on the {sensor} channels of BasicMotions TRAIN, seed {settings.seed}, "
            f"{settings.epochs} epochs; validated on {len(val_idx)} held-out TRAIN cases; "
            "test_accuracy is informational."
        ),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(out_dir / f"{type_name}.keras")
    export_tflite(model, out_dir / f"{type_name}.tflite")
    (out_dir / f"{type_name}.json").write_text(card.to_json(), encoding="utf-8")
    return card


def classifier_card(
    model: Any,
    *,
    type_name: str,
    name: str,
    sensor: str,
    labels: tuple[str, ...],
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    split: tuple[np.ndarray, np.ndarray],
    notes: str,
    metrics: dict[str, float] | None = None,
) -> ModelCard:
    """The card of a trained sensor classifier: its validation accuracy (on the held-out
    rows of ``split``, also its fusion weight), its TEST accuracy, the case counts, and any
    further ``metrics``."""
    (x_train, y_train), (x_test, y_test), (fit_idx, val_idx) = train, test, split
    val_accuracy = classifier_accuracy(model, x_train[val_idx], y_train[val_idx])
    return ModelCard(
        type=type_name,
        name=name,
        version="1.0.0",
        labels=labels,
        inputs=(InputSpec(sensor, x_train.shape[1], x_train.shape[2]),),
        weight=round(max(val_accuracy, 0.05), 4),
        metrics={
            "val_accuracy": round(val_accuracy, 4),
            "test_accuracy": round(classifier_accuracy(model, x_test, y_test), 4),
            **(metrics or {}),
            "train_cases": float(len(fit_idx)),
            "val_cases": float(len(val_idx)),
        },
        notes=notes,
    )
