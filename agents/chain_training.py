"""Train the models of a two-stage chain: one encoder per sensor (stage 1, answering
features) and a head that classifies from their features and a rule-based stage's
(stage 2, feature-level fusion).

The encoders and the head are trained together, as one network, then cut apart and exported
as separate models, each with its card: ``enc_<sensor>`` reads a sensor's window and answers
its pooled Conv1D features; ``head`` reads every encoder's features and the numpy
:class:`~agents.builtin.WindowStatsStage` features of the first sensor, and answers class
scores. Every input of the head is dropped out (given as zeros, as the model agent gives an
absent optional input) for a share of the training rows, so the head still classifies when
an encoder or the stats stage cannot answer; its card declares every input optional and
the plan decides which ones the head waits for.

This module imports TensorFlow; like :mod:`agents.training`, training is reproducible from
one seed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agents.builtin.features import WindowStatsStage
from agents.model_card import ModelCard
from agents.training import TrainingSettings, augment, export_tflite, stratified_split
from schemas import InputSpec

#: The features each encoder answers: its last convolution's channels, averaged over time.
ENCODER_FEATURES = 32
#: The type of the head, and of the rule-based stage it reads.
HEAD = "head"
STATS = "stats"


def encoder_type(sensor: str) -> str:
    """The subtask type of ``sensor``'s encoder."""
    return f"enc_{sensor}"


@dataclass(frozen=True)
class ChainSettings:
    """How to train the chain, beyond :class:`~agents.training.TrainingSettings`."""

    input_dropout: float = 0.3  # share of rows in which each head input is given as zeros
    head_units: int = 32


def stats_features(x: np.ndarray) -> np.ndarray:
    """What the ``stats`` stage answers for windows ``x`` ([cases, samples, channels])."""
    stage = WindowStatsStage(source="x", channels=x.shape[2])
    return stage.predict({"x": x})


def dropout_masks(rows: int, inputs: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """``[rows, inputs]`` of 1 (given) and 0 (absent): each input absent with probability
    ``rate``, and never all of a row's inputs at once."""
    keep = (rng.random((rows, inputs)) >= rate).astype(np.float32)
    for row in np.flatnonzero(keep.sum(axis=1) == 0):
        keep[row, rng.integers(inputs)] = 1.0
    return keep


def train_chain_models(
    *,
    train_views: dict[str, np.ndarray],
    y_train: np.ndarray,
    test_views: dict[str, np.ndarray],
    y_test: np.ndarray,
    labels: tuple[str, ...],
    out_dir: Path,
    dataset: str = "the dataset",
    settings: TrainingSettings | None = None,
    chain: ChainSettings = ChainSettings(),
) -> dict[str, ModelCard]:
    """Train the encoders and the head together and export each as its own model.

    Args:
        train_views, test_views: each sensor's cases ``[cases, samples, channels]``, in
            the dataset's sensor order; the first sensor also feeds the ``stats`` stage.
        y_train, y_test: class indexes into ``labels``.
        out_dir: where ``enc_<sensor>`` and ``head`` (``.keras``, ``.tflite``, ``.json``) go.
        dataset: the dataset's name, for the cards' notes.

    Only the train views are fitted on (minus a seeded validation hold-out of
    ``settings.val_per_class`` cases per class); the test views are scored once, for the
    cards. Returns the cards by type.
    """
    settings = settings or TrainingSettings()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(settings.seed)
    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(settings.seed)
    sensors = list(train_views)
    widths = [train_views[s].shape[2] for s in sensors]
    fit_idx, val_idx = stratified_split(y_train, settings.val_per_class, rng)
    # One augmentation for all sensors: a case's sensors are shifted and scaled together.
    x_all = np.concatenate([train_views[s][fit_idx] for s in sensors], axis=2)
    x_all, y_fit = augment(x_all, y_train[fit_idx], settings.augment_copies, rng)
    bounds = np.cumsum([0, *widths])
    x_fit = {s: x_all[..., bounds[i] : bounds[i + 1]] for i, s in enumerate(sensors)}
    head_inputs = [*(encoder_type(s) for s in sensors), STATS]
    masks = dropout_masks(len(y_fit), len(head_inputs), chain.input_dropout, rng)

    stats_fit = stats_features(x_fit[sensors[0]])
    encoders = {s: _encoder(keras, s, x_fit[s]) for s in sensors}
    head = _Head(keras, stats_fit, len(labels), chain.head_units)

    # The joint network: encoders, then each head input times its row's mask.
    windows = {s: keras.Input(train_views[s].shape[1:], name=s) for s in sensors}
    stats_in = keras.Input((stats_fit.shape[1],), name=STATS)
    mask_in = keras.Input((len(head_inputs),), name="given")
    features = [encoders[s](windows[s]) for s in sensors] + [stats_in]
    given = [keras.ops.multiply(f, mask_in[:, i : i + 1]) for i, f in enumerate(features)]
    joint = keras.Model([*windows.values(), stats_in, mask_in], head(given))
    joint.compile(
        optimizer=keras.optimizers.Adam(settings.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    joint.fit(
        [*(x_fit[s] for s in sensors), stats_fit, masks],
        y_fit,
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        shuffle=True,
        verbose=0,
    )

    sizes = {**{encoder_type(s): ENCODER_FEATURES for s in sensors}, STATS: stats_fit.shape[1]}
    head_model = head.model(keras, sizes)

    def head_inputs_of(views: dict[str, np.ndarray], rows: np.ndarray | slice) -> list[np.ndarray]:
        encoded = [encoders[s](views[s][rows], training=False).numpy() for s in sensors]
        return [*encoded, stats_features(views[sensors[0]][rows])]

    def accuracy(inputs: list[np.ndarray], y: np.ndarray, given: set[int] | None = None) -> float:
        """The head's accuracy with only the ``given`` inputs (the rest zeros, as absent)."""
        kept = [
            x if given is None or i in given else np.zeros_like(x) for i, x in enumerate(inputs)
        ]
        scores = head_model(kept, training=False).numpy()
        return round(float(np.mean(np.argmax(scores, axis=1) == y)), 4)

    val_inputs = head_inputs_of(train_views, val_idx)
    test_inputs = head_inputs_of(test_views, slice(None))
    val_accuracy = accuracy(val_inputs, y_train[val_idx])
    metrics = {
        "val_accuracy": val_accuracy,
        "test_accuracy": accuracy(test_inputs, y_test),
        **{
            f"test_accuracy_without_{name}": accuracy(
                test_inputs, y_test, set(range(len(head_inputs))) - {i}
            )
            for i, name in enumerate(head_inputs)
        },
        **{
            f"test_accuracy_only_{name}": accuracy(test_inputs, y_test, {i})
            for i, name in enumerate(head_inputs)
        },
        "train_cases": float(len(fit_idx)),
        "val_cases": float(len(val_idx)),
    }
    trained = (
        f"trained jointly with the head on {dataset} TRAIN, seed {settings.seed}, "
        f"{settings.epochs} epochs"
    )
    cards = {
        encoder_type(s): ModelCard(
            type=encoder_type(s),
            name=f"chain-{encoder_type(s)}",
            version="1.0.0",
            labels=(),
            inputs=(InputSpec(s, train_views[s].shape[1], train_views[s].shape[2]),),
            metrics={"train_cases": float(len(fit_idx))},
            notes=(
                f"Conv1D encoder of the {s} channels: the time-averaged features of its "
                f"last convolution, read by the head of a model chain; {trained}."
            ),
            output="features",
            output_shape=(ENCODER_FEATURES,),
        )
        for s in sensors
    }
    cards[HEAD] = ModelCard(
        type=HEAD,
        name="chain-head",
        version="1.0.0",
        labels=labels,
        inputs=tuple(
            InputSpec(name, stage=True, shape=(int(x.shape[1]),), optional=True)
            for name, x in zip(head_inputs, val_inputs, strict=True)
        ),
        weight=round(max(val_accuracy, 0.05), 4),
        metrics=metrics,
        notes=(
            f"Feature-level fusion head over {', '.join(head_inputs)} (the {STATS} stage on "
            f"the {sensors[0]} channels), each input given as zeros in "
            f"{chain.input_dropout:.0%} of training rows, so every input is optional; trained "
            f"with its encoders on {dataset} TRAIN, seed {settings.seed}, {settings.epochs} "
            f"epochs; validated on {len(val_idx)} held-out TRAIN cases; test metrics are "
            "informational."
        ),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    models = {**{encoder_type(s): encoders[s] for s in sensors}, HEAD: head_model}
    for type_name, model in models.items():
        model.save(out_dir / f"{type_name}.keras")
        export_tflite(model, out_dir / f"{type_name}.tflite")
        (out_dir / f"{type_name}.json").write_text(cards[type_name].to_json(), encoding="utf-8")
    return cards


def _encoder(keras: Any, sensor: str, x_fit: np.ndarray) -> Any:
    """A Conv1D encoder of one sensor's windows, normalising its raw input itself."""
    normalise = keras.layers.Normalization(axis=-1)
    normalise.adapt(x_fit)
    window = keras.Input(x_fit.shape[1:], name=sensor)
    h = normalise(window)
    h = keras.layers.Conv1D(16, 5, padding="same", activation="relu")(h)
    h = keras.layers.Conv1D(ENCODER_FEATURES, 5, padding="same", activation="relu")(h)
    features = keras.layers.GlobalAveragePooling1D(name="features")(h)
    return keras.Model(window, features, name=encoder_type(sensor))


class _Head:
    """The head's layers, applied in the joint network and again on the head's own inputs."""

    def __init__(self, keras: Any, stats_fit: np.ndarray, classes: int, units: int) -> None:
        # Statistics are in sensor units: normalised inside the head, after the mask, so an
        # absent stats input reads as the same zeros in training and in serving.
        self.normalise = keras.layers.Normalization(axis=-1)
        self.normalise.adapt(stats_fit)
        self.join = keras.layers.Concatenate()
        self.dropout = keras.layers.Dropout(0.2)
        self.hidden = keras.layers.Dense(units, activation="relu")
        self.out = keras.layers.Dense(classes, activation="softmax", name="probabilities")

    def __call__(self, given: list[Any]) -> Any:
        *encoded, stats = given
        h = self.join([*encoded, self.normalise(stats)])
        return self.out(self.hidden(self.dropout(h)))

    def model(self, keras: Any, sizes: dict[str, int]) -> Any:
        """The trained head as a model of its own, one named input per upstream type."""
        inputs = [keras.Input((size,), name=name) for name, size in sizes.items()]
        return keras.Model(inputs, self(inputs), name=HEAD)
