"""The model-chain demo: examples/chain.toml and the one-line errors of a bad [agents]
table, `fusebus up --config` end to end, `fusebus eval --config`'s comparison rows, and
`fusebus train --models chain`."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agents import ModelAgent, ModelCard
from agents.builtin import WindowStatsStage
from bus import EmbeddedServer
from fusebus.config import load_deployment, parse_deployment
from fusebus.datasets import load_basicmotions
from fusebus.evaluate import EvalSettings, run_eval
from fusebus.lineup import check_lineup, describe
from fusebus.paths import models_dir
from schemas import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CHAIN = ROOT / "examples" / "chain.toml"
FUSEBUS = [sys.executable, "-m", "fusebus"]
TYPES = ("accel", "gyro", "enc_accel", "enc_gyro", "stats", "head")


def run_fusebus(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FUSEBUS, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def chain_doc() -> dict[str, Any]:
    """examples/chain.toml as parsed TOML, to change one key of."""
    return copy.deepcopy(tomllib.loads(CHAIN.read_text(encoding="utf-8")))


def test_the_chain_example_loads_with_its_agents() -> None:
    """The example's plan has both stages, fuses the per-sensor classifiers and the head,
    and names one agent per type: shipped models, and the numpy stats stage with params."""
    deployment = load_deployment(CHAIN)
    plan = deployment.plans.default
    assert plan is not None and plan.chained
    assert plan.types == TYPES
    assert plan.fused == ("accel", "gyro", "head")
    head = plan.subtasks[-1]
    assert head.required_upstream == ("enc_accel",)
    assert head.optional_upstream == ("enc_gyro", "stats")
    assert tuple(deployment.agents) == TYPES
    assert deployment.agents["head"].model == models_dir() / "head.tflite"
    stats = deployment.agents["stats"]
    assert (stats.model, stats.agent, stats.params) == (
        None,
        "stats",
        {"source": "accel", "channels": "3"},
    )
    served = {t: describe(e, source=deployment.source) for t, e in deployment.agents.items()}
    check_lineup(deployment, served, stream="basicmotions")  # raises on a misfit
    assert served["stats"].output_shape == (13,) and served["head"].output == "scores"


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``doc`` with the dotted ``path`` set to ``value`` (deleted when ``value`` is None)."""
    *parents, last = path.split(".")
    table = doc
    for key in parents:
        table = table.setdefault(key, {})
    if value is None:
        del table[last]
    else:
        table[last] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("agents", [], "agents: must be a table, got list"),
        ("agents.head", {}, "agents.head: needs model (a shipped model's name or a .tflite"),
        (
            "agents.head",
            {"model": "head", "agent": "stats"},
            "agents.head: names both a model and an agent class; give one",
        ),
        ("agents.stats.colour", "red", "agents.stats: unknown key 'colour'"),
        (
            "agents.accel",
            {"model": "accel", "params": {"width": 3}},
            "agents.accel.params: only an agent class takes params",
        ),
        ("agents.head.model", "nosuch", "agents.head.model: no shipped model 'nosuch' in"),
        (
            "agents.head.model",
            "head.onnx",
            "agents.head.model: 'head.onnx' is neither a shipped model's name nor a .tflite/.keras file",
        ),
        (
            "agents.head.model",
            "no/such/head.tflite",
            "agents.head.model: file no/such/head.tflite does not exist",
        ),
        ("agents.stats.agent", "", "agents.stats.agent: must be a non-empty string, got ''"),
        (
            "agents.stats.params.source",
            ["accel"],
            "agents.stats.params.source: must be a string, number or boolean, got list",
        ),
        ("agents.stats.params.type", "x", "agents.stats.params.type: the type is the table's name"),
        (
            "agents.extra",
            {"model": "accel"},
            "agents.extra: no plan lists the type 'extra' (they list accel, enc_accel",
        ),
        (
            "agents.stats",
            None,
            "agents: no [agents.stats] for the type 'stats' that the plans list",
        ),
        ("agents.bad type", {"model": "head"}, "agents.bad type: type 'bad type'"),
    ],
)
def test_a_bad_agents_table_is_one_config_error_naming_the_key(
    path: str, value: Any, message: str
) -> None:
    """Each mistake in [agents] is one line naming the source, the key and the problem."""
    with pytest.raises(ConfigError) as caught:
        parse_deployment(_set(chain_doc(), path, value), source="chain.toml", base=Path("."))
    text = str(caught.value)
    assert text.startswith(f"chain.toml: {message}"), text
    assert "\n" not in text


def _misfit(doc: dict[str, Any]) -> str:
    """The ConfigError of checking ``doc``'s agents against its plan."""
    deployment = parse_deployment(doc, source="chain.toml")
    served = {t: describe(e, source="chain.toml") for t, e in deployment.agents.items()}
    with pytest.raises(ConfigError) as caught:
        check_lineup(deployment, served, stream="basicmotions")
    return str(caught.value)


def test_agents_that_do_not_fit_the_plan_are_refused_before_anything_runs() -> None:
    """A model reading another sensor than its subtask gets, an upstream it needs that the
    plan does not list or makes optional, features fused, or shapes that do not meet: each
    is one line naming agents.<type>."""
    wrong_sensor = _set(chain_doc(), "default.subtasks.enc_accel.sensors", ["gyro"])
    assert _misfit(wrong_sensor) == (
        "chain.toml: agents.enc_accel: reads the sensor 'accel', but "
        "default.subtasks.enc_accel gives it gyro"
    )
    # stats reading a smoothing stage it cannot run without
    smoothed = _set(chain_doc(), "default.subtasks.smooth", {"sensors": ["accel"]})
    _set(smoothed, "agents.smooth", {"agent": "smooth"})
    _set(smoothed, "agents.stats.params", {"source": "smooth", "stage": True})
    assert _misfit(smoothed) == (
        "chain.toml: agents.stats: needs the answers of 'smooth' (its input is not optional), "
        "which default.subtasks.stats.after does not list"
    )
    _set(smoothed, "default.subtasks.stats", {"after": [{"type": "smooth", "optional": True}]})
    assert _misfit(smoothed) == (
        "chain.toml: agents.stats: cannot run without 'smooth' (its input is not optional), "
        "but default.subtasks.stats.after makes it optional"
    )
    # a head that no longer reads stats leaves stats fused
    unread = _set(chain_doc(), "default.subtasks.head.after", ["enc_accel", "enc_gyro"])
    assert _misfit(unread) == (
        "chain.toml: agents.stats: answers features, which fusion cannot vote with, and "
        "default fuses 'stats' (let another type read it, or leave it out of fuse)"
    )
    narrow = _set(chain_doc(), "agents.stats.params.channels", 2)
    assert _misfit(narrow) == (
        "chain.toml: agents.head: reads 'stats' as per-row shape [13], but agents.stats answers [9]"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("up", "--config", "examples/plans.toml"),
            "fusebus up: error: examples/plans.toml: no [agents] table",
        ),
        (
            ("up", "--config", "examples/chain.toml", "--agents", "accel"),
            "fusebus up: error: --agents does not apply with --config",
        ),
        (
            ("eval", "--config", "examples/chain.toml", "--agents", "accel,gyro"),
            "fusebus eval: error: --agents does not apply with --config",
        ),
        (
            ("up", "--config", "no/such.toml"),
            "fusebus up: error: no/such.toml: file does not exist",
        ),
    ],
)
def test_bad_config_use_is_one_line_and_exit_2(args: tuple[str, ...], message: str) -> None:
    """A config `up` or `eval` cannot use stops before any server or process starts."""
    done = run_fusebus(*args, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), done.stderr
    assert done.stdout == ""


def _stopped_counts(log: Path) -> dict[str, Any]:
    """The counters a component logged when it stopped (its last JSON line with them)."""
    for line in reversed(log.read_text().splitlines()):
        if line.startswith("{") and '"processed"' in line:
            counts: dict[str, Any] = json.loads(line)
            return counts
    raise AssertionError(f"no counters in {log}")


def test_up_with_the_chain_config_decides_every_window_through_both_stages(
    tmp_path: Path,
) -> None:
    """`fusebus up --config examples/chain.toml` starts its own server, the coordinator,
    fusion and the six agents as processes, and prints the live table and summary of plain
    `up`: 40 decisions, every one complete, accuracy >= 0.95; each agent of the chain
    answered every window, the head only after its upstreams."""
    done = run_fusebus("up", "--config", "examples/chain.toml", "--speed", "200",
                       "--log-dir", str(tmp_path))  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(embedded) · config examples/chain.toml" in done.stdout
    rows = [line for line in done.stdout.splitlines() if re.match(r"\s*\d+\s+\d+-\d+", line)]
    assert len(rows) == 40
    summary = re.search(r"decisions (\d+)/40 · accuracy ([\d.]+)", done.stdout)
    assert summary is not None, done.stdout
    assert int(summary.group(1)) == 40 and float(summary.group(2)) >= 0.95
    assert "complete 40 · partial 0 · failed 0" in done.stdout
    assert re.search(r"latency p50 [\d.]+ ms · p99 [\d.]+ ms · first decision", done.stdout)
    for text in ("DUPLICATE", "components exited with errors"):
        assert text not in done.stdout
    assert "Traceback" not in done.stderr
    for type_name in TYPES:
        counts = _stopped_counts(tmp_path / f"agent-{type_name}.log")
        assert (counts["processed"], counts["errors"]) == (40, 0), type_name
    assert '"stages_published": 40' in (tmp_path / "coordinator.log").read_text()


async def test_eval_with_the_chain_config_compares_chain_late_fusion_and_dropouts(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    """`eval --config`: the models answering scores alone (not the feature stages), then the
    chain, late fusion alone and the chain with each agent missing. A missing fused type or
    required encoder leaves every decision partial at the deadline, the head then missing
    with 'upstream: enc_accel'; a missing optional upstream leaves the head running on
    zeros, every decision complete well before the deadline."""
    settings = EvalSettings(
        config=CHAIN,
        strategies=None,  # the config's: weighted_mean
        deadline_ms=1000,  # room for six agents to answer on a loaded machine
        rate_hz=200,
        out_dir=tmp_path,
        nats_url=nats_server.url,
    )
    report = await run_eval(settings)
    alone = [r.what for r in report.rows if r.what.endswith("alone")]
    assert alone == ["accel alone", "gyro alone", "head alone"]
    fused = [r for r in report.rows if not r.what.endswith("alone")]
    assert [(r.what, r.strategy, r.missing) for r in fused] == [
        ("chain", "weighted_mean", "none"),
        ("late fusion", "weighted_mean", "none"),
        *(("chain", "weighted_mean", t) for t in TYPES),
    ]
    blocked = {"accel", "gyro", "enc_accel", "head"}
    for row in fused:
        waits = row.missing in blocked
        assert (row.complete, row.partial) == ((0, 40) if waits else (40, 0)), row
        assert row.accuracy >= 0.9, row
        assert (row.p50_ms >= 1000) == waits, row
    why = {r.missing: r.why_missing for r in fused}
    assert why["enc_accel"] == "enc_accel: deadline; head: upstream: enc_accel"
    assert why["head"] == "head: deadline" and why["enc_gyro"] == why["none"] == ""
    table = report.markdown.read_text()
    assert "| late fusion | weighted_mean | none |" in table
    assert "| enc_accel: deadline; head: upstream: enc_accel |" in table
    assert report.class_reports["weighted_mean"].total == 40


def test_train_writes_loadable_chain_models(tmp_path: Path) -> None:
    """`fusebus train --models chain` (one epoch, to keep the test short) writes the two
    encoders and the head with their cards; each loads as a model agent, the head reads the
    encoders' features and the stats stage's, and its LiteRT and Keras files agree."""
    done = run_fusebus(
        "train", "--models", "chain", "--epochs", "1", "--out", str(tmp_path), timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    printed = [line.split(":")[0] for line in done.stdout.splitlines()]
    assert printed == ["enc_accel", "enc_gyro", "head"]
    assert {p.stem for p in tmp_path.glob("*.tflite")} == {"enc_accel", "enc_gyro", "head"}
    dataset = load_basicmotions()
    inputs = {
        f"enc_{s}": ModelAgent(tmp_path / f"enc_{s}.tflite").predict(
            {s: dataset.sensor_view(dataset.x_test, s)}
        )
        for s in ("accel", "gyro")
    }
    inputs["stats"] = WindowStatsStage().predict(
        {"accel": dataset.sensor_view(dataset.x_test, "accel")}
    )
    assert inputs["enc_accel"].shape == (40, 32)
    card = ModelCard.for_model(tmp_path / "head.tflite")
    assert [(i.sensor, i.shape, i.optional) for i in card.inputs] == [
        ("enc_accel", (32,), True),
        ("enc_gyro", (32,), True),
        ("stats", (13,), True),
    ]
    litert = ModelAgent(tmp_path / "head.tflite").predict(inputs)
    keras = ModelAgent(tmp_path / "head.keras").predict(inputs)
    np.testing.assert_allclose(litert, keras, atol=1e-4)
    np.testing.assert_allclose(litert.sum(axis=1), 1.0, atol=1e-5)
