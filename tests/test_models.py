"""The shipped models: LiteRT serving matches Keras, batches match single calls, cards are honest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agents import ModelAgent, ModelCard
from agents.runtimes import LITERT_BUCKETS, bucket_plan, load_runtime
from fusebus.datasets import SensorDataset
from fusebus.paths import models_dir
from schemas import ConfigError

TYPES = ("accel", "gyro")


@pytest.mark.parametrize("type_name", TYPES)
def test_litert_batches_match_single_calls_and_score_well(
    type_name: str, basicmotions: SensorDataset
) -> None:
    """One call on 40 cases equals 40 calls on one case, and the model is accurate on TEST."""
    runtime = load_runtime(models_dir() / f"{type_name}.tflite")
    runtime.warm_up()
    x = basicmotions.sensor_view(basicmotions.x_test, type_name).astype(np.float32)
    batched = runtime.predict([x])
    single = np.concatenate([runtime.predict([x[i : i + 1]]) for i in range(len(x))])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    np.testing.assert_allclose(batched.sum(axis=1), 1.0, atol=1e-5)
    assert np.mean(batched.argmax(axis=1) == basicmotions.y_test) >= 0.9


@pytest.mark.parametrize(
    ("rows", "pieces"),
    [
        (1, [(0, 1, 1)]),
        (54, [(0, 54, 64)]),  # 10 rows of padding: cheaper than four calls
        (33, [(0, 32, 32), (32, 1, 1)]),  # padding to 64 would be half the work
        (40, [(0, 32, 32), (32, 8, 8)]),
        (7, [(0, 7, 8)]),
        (130, [(0, 64, 64), (64, 64, 64), (128, 2, 2)]),
    ],
)
def test_a_batch_runs_as_bucket_pieces_with_little_padding(
    rows: int, pieces: list[tuple[int, int, int]]
) -> None:
    """Pieces cover every row once, in order, each within a bucket, none mostly padding."""
    assert bucket_plan(rows, LITERT_BUCKETS) == pieces


def test_coarse_buckets_pad_rather_than_make_many_small_calls() -> None:
    """With buckets far apart (Keras's 1, 8, 64) a remainder is padded, not cut into ones."""
    assert bucket_plan(5, (1, 8, 64)) == [(0, 5, 8)]
    assert bucket_plan(40, (1, 8, 64)) == [(0, 40, 64)]
    assert bucket_plan(3, (8, 64)) == [(0, 3, 8)]  # smaller than the smallest bucket


@pytest.mark.parametrize("type_name", TYPES)
def test_litert_conversion_matches_keras(type_name: str, basicmotions: SensorDataset) -> None:
    """The served .tflite gives the .keras model's probabilities to float tolerance."""
    x = basicmotions.sensor_view(basicmotions.x_test, type_name).astype(np.float32)
    litert = load_runtime(models_dir() / f"{type_name}.tflite").predict([x])
    keras = load_runtime(models_dir() / f"{type_name}.keras").predict([x])
    np.testing.assert_allclose(litert, keras, atol=1e-4)


@pytest.mark.parametrize("type_name", TYPES)
def test_cards_describe_the_models(type_name: str, basicmotions: SensorDataset) -> None:
    """Each card names labels, input spec and validation accuracy consistent with the data."""
    card = ModelCard.for_model(models_dir() / f"{type_name}.tflite")
    assert card.type == type_name
    assert card.labels == basicmotions.labels
    assert [(i.sensor, i.samples, i.channels) for i in card.inputs] == [(type_name, 100, 3)]
    assert 0 < card.metrics["val_accuracy"] <= 1 and card.weight == pytest.approx(
        card.metrics["val_accuracy"]
    )


def test_model_agent_checks_output_shape_against_labels(tmp_path: Path) -> None:
    """A card whose labels do not fit the model's outputs is caught at the first call."""
    source = models_dir() / "accel.tflite"
    (tmp_path / "m.tflite").write_bytes(source.read_bytes())
    card = json.loads(source.with_suffix(".json").read_text())
    card["labels"] = ["a", "b"]
    (tmp_path / "m.json").write_text(json.dumps(card))
    agent = ModelAgent(tmp_path / "m.tflite")
    with pytest.raises(Exception, match=r"expected \(1, 2\)"):
        agent.predict({"accel": np.zeros((1, 100, 3), np.float32)})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("{not json", "not JSON"),
        ('{"type": "x", "name": "n", "labels": ["a"]}', "missing key 'inputs'"),
        (
            '{"type": "x", "name": "n", "labels": [], "inputs": [{"sensor": "s"}]}',
            "labels must not be empty",
        ),
    ],
)
def test_bad_cards_give_clear_errors(tmp_path: Path, content: str | None, message: str) -> None:
    """A missing or malformed card is a ConfigError naming the file and the problem."""
    path = tmp_path / "m.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        ModelCard.from_file(path)


def test_unknown_model_format_is_refused(tmp_path: Path) -> None:
    """Only .tflite and .keras files are served."""
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    with pytest.raises(ConfigError, match="unknown format"):
        load_runtime(model)


ENCODERS = ("enc_accel", "enc_gyro")


def chain_inputs(dataset: SensorDataset, *, suffix: str = ".tflite") -> dict[str, np.ndarray]:
    """What the shipped head reads for every TEST case: the encoders' features (served as
    ``suffix`` models) and the numpy stats stage's."""
    from agents.builtin import WindowStatsStage

    inputs = {
        f"enc_{s}": ModelAgent(models_dir() / f"enc_{s}{suffix}").predict(
            {s: dataset.sensor_view(dataset.x_test, s)}
        )
        for s in ("accel", "gyro")
    }
    inputs["stats"] = WindowStatsStage().predict(
        {"accel": dataset.sensor_view(dataset.x_test, "accel")}
    )
    return inputs


@pytest.mark.parametrize("type_name", ENCODERS)
def test_chain_encoders_answer_features_and_litert_matches_keras(
    type_name: str, basicmotions: SensorDataset
) -> None:
    """Each shipped encoder's card says it answers 32 features from one sensor's window, and
    the served .tflite gives the .keras model's features to float tolerance."""
    sensor = type_name.removeprefix("enc_")
    card = ModelCard.for_model(models_dir() / f"{type_name}.tflite")
    assert (card.type, card.output, card.output_shape, card.labels) == (
        type_name,
        "features",
        (32,),
        (),
    )
    assert [(i.sensor, i.samples, i.channels) for i in card.inputs] == [(sensor, 100, 3)]
    x = basicmotions.sensor_view(basicmotions.x_test, sensor)
    litert = ModelAgent(models_dir() / f"{type_name}.tflite").predict({sensor: x})
    keras = ModelAgent(models_dir() / f"{type_name}.keras").predict({sensor: x})
    assert litert.shape == (40, 32)
    np.testing.assert_allclose(litert, keras, atol=1e-4)


def test_the_head_is_fed_by_input_name_whatever_order_litert_gives(
    basicmotions: SensorDataset,
) -> None:
    """The head's LiteRT conversion takes its three inputs in another order than its card
    lists them; the model agent feeds each by name, so LiteRT matches Keras, and swapping
    the two encoders' same-shaped features changes the answers."""
    card = ModelCard.for_model(models_dir() / "head.tflite")
    names = [i.sensor for i in card.inputs]
    assert names == ["enc_accel", "enc_gyro", "stats"]
    assert load_runtime(models_dir() / "head.tflite").input_names != names
    inputs = chain_inputs(basicmotions)
    litert = ModelAgent(models_dir() / "head.tflite").predict(inputs)
    keras = ModelAgent(models_dir() / "head.keras").predict(
        chain_inputs(basicmotions, suffix=".keras")
    )
    np.testing.assert_allclose(litert, keras, atol=1e-4)
    assert np.mean(litert.argmax(axis=1) == basicmotions.y_test) >= 0.95
    swapped = {**inputs, "enc_accel": inputs["enc_gyro"], "enc_gyro": inputs["enc_accel"]}
    served = ModelAgent(models_dir() / "head.tflite")
    assert np.mean(served.predict(swapped).argmax(axis=1) == basicmotions.y_test) < 0.8


@pytest.mark.parametrize("absent", ["enc_accel", "enc_gyro", "stats"])
def test_the_head_classifies_with_an_optional_input_absent(
    absent: str, basicmotions: SensorDataset
) -> None:
    """Every head input is optional in its card; with one absent (given as zeros by the
    agent) the head still scores well, as its card says."""
    card = ModelCard.for_model(models_dir() / "head.tflite")
    assert all(i.stage and i.optional for i in card.inputs) and card.output == "scores"
    assert card.labels == basicmotions.labels
    given = {k: v for k, v in chain_inputs(basicmotions).items() if k != absent}
    scores = ModelAgent(models_dir() / "head.tflite").predict(given)
    accuracy = float(np.mean(scores.argmax(axis=1) == basicmotions.y_test))
    assert accuracy >= 0.9
    assert accuracy == pytest.approx(card.metrics[f"test_accuracy_without_{absent}"], abs=0.05)
