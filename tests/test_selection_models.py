"""The shipped models to select among by deadline: two models of type accel, one accurate
and costly, one fast and cheap, each card saying how good and how costly it is."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from agents import ModelAgent, ModelCard
from agents.runtimes import infer_ms_per_row, load_runtime
from fusebus.cli import build_parser
from fusebus.datasets import SensorDataset
from fusebus.paths import models_dir

VARIANTS = ("accel-large", "accel-small")


@pytest.mark.parametrize("stem", VARIANTS)
def test_the_cards_load_and_carry_their_accuracy_and_cost(
    stem: str, basicmotions: SensorDataset
) -> None:
    """Each card serves type accel from the accel window with the accel classifier's labels,
    and its metrics hold validation and test accuracy and the per-row cost, as floats."""
    agent = ModelAgent(models_dir() / f"{stem}.tflite")
    shipped = ModelCard.for_model(models_dir() / "accel.tflite")
    assert (agent.type, agent.model.name, agent.model.version) == (
        "accel",
        f"basicmotions-{stem}",
        "1.0.0",
    )
    assert agent.labels == shipped.labels == basicmotions.labels
    assert agent.inputs == shipped.inputs
    metrics = agent.card.metrics
    assert {"val_accuracy", "test_accuracy", "infer_ms_per_row"} <= set(metrics)
    assert all(isinstance(value, float) for value in metrics.values())
    assert 0 < metrics["val_accuracy"] <= 1 and 0 <= metrics["test_accuracy"] <= 1
    assert metrics["infer_ms_per_row"] > 0
    assert agent.weight == pytest.approx(metrics["val_accuracy"])


@pytest.mark.parametrize("stem", VARIANTS)
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_both_answer_one_score_per_label_for_every_row(stem: str, rows: int) -> None:
    """On zeros, each model answers ``[rows, 4]`` probabilities."""
    agent = ModelAgent(models_dir() / f"{stem}.tflite")
    scores = agent.predict({"accel": np.zeros((rows, 100, 3), np.float32)})
    assert scores.shape == (rows, 4)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("stem", VARIANTS)
def test_litert_matches_keras_and_the_card_s_test_accuracy(
    stem: str, basicmotions: SensorDataset
) -> None:
    """The served .tflite gives the .keras model's probabilities on every TEST case, and
    scores the accuracy its card says."""
    x = basicmotions.sensor_view(basicmotions.x_test, "accel")
    litert = ModelAgent(models_dir() / f"{stem}.tflite")
    scores = litert.predict({"accel": x})
    keras = ModelAgent(models_dir() / f"{stem}.keras").predict({"accel": x})
    np.testing.assert_allclose(scores, keras, atol=1e-4)
    accuracy = float(np.mean(scores.argmax(axis=1) == basicmotions.y_test))
    assert accuracy == pytest.approx(litert.card.metrics["test_accuracy"], abs=1e-4)


def test_the_large_model_costs_many_times_the_small_one_per_row() -> None:
    """Measured here and now, the large model's row costs at least 10 times the small one's
    (the best of five measurements each, so a busy machine slows neither by chance); the
    cards, measured at training, say the same, and the large one is at least as accurate."""
    best = {
        stem: min(
            infer_ms_per_row(load_runtime(models_dir() / f"{stem}.tflite", buckets=(32,)), calls=3)
            for _ in range(5)
        )
        for stem in VARIANTS
    }
    print(f"best ms per row at batch 32: {best}")
    assert best["accel-large"] >= 10 * best["accel-small"]
    large, small = (ModelCard.for_model(models_dir() / f"{s}.tflite").metrics for s in VARIANTS)
    assert large["infer_ms_per_row"] >= 10 * small["infer_ms_per_row"]
    assert large["val_accuracy"] >= small["val_accuracy"]


def test_train_takes_the_selection_models() -> None:
    """``fusebus train --models selection`` is a choice of the command line."""
    assert build_parser().parse_args(["train", "--models", "selection"]).models == "selection"


def test_retraining_with_the_seed_gives_the_same_files(
    tmp_path: Path, basicmotions: SensorDataset
) -> None:
    """Two one-epoch trainings with seed 7 in one process write byte-identical .tflite files
    (the layers are named, so the first run's models do not rename the second's), and each
    card records the cost it measured."""
    from agents.selection_training import train_selection_models
    from agents.training import TrainingSettings

    settings = replace(TrainingSettings(), epochs=1)
    x_train, y_train = basicmotions.split("train")
    x_test, y_test = basicmotions.split("test")
    for run in ("first", "second"):
        cards = train_selection_models(
            type_name="accel",
            sensor="accel",
            x_train=basicmotions.sensor_view(x_train, "accel"),
            y_train=y_train,
            x_test=basicmotions.sensor_view(x_test, "accel"),
            y_test=y_test,
            labels=basicmotions.labels,
            out_dir=tmp_path / run,
            settings=settings,
        )
        assert all(card.metrics["infer_ms_per_row"] > 0 for card in cards.values())
    for stem in VARIANTS:
        first = (tmp_path / "first" / f"{stem}.tflite").read_bytes()
        assert first == (tmp_path / "second" / f"{stem}.tflite").read_bytes()
