"""A model card's fusion weight: explicit ``weight``, else ``metrics.val_accuracy``, else 1.0;
it travels in the agent's service metadata and in every result."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from nats.aio.client import Client

from agents import AgentRuntime, ModelAgent, ModelCard
from agents.builtin import MotionEnergyAgent
from bus import Producer, Subjects, TopologySettings, discover_agents, ensure_streams
from bus.discovery import INFO, agent_info_from_metadata
from fusebus.paths import models_dir
from schemas import ConfigError, Result, Subtask, Window
from tests.helpers import Collector, wait_for_agents
from tests.plugins import ConstantAgent

Connect = Callable[[str], Awaitable[Client]]


def card_with(tmp_path: Path, **changes: Any) -> Path:
    """A copy of the accel model whose card has ``changes`` (a value of None drops the key)."""
    source = models_dir() / "accel.tflite"
    model = tmp_path / "m.tflite"
    model.write_bytes(source.read_bytes())
    card = json.loads(source.with_suffix(".json").read_text())
    for key, value in changes.items():
        if value is None:
            card.pop(key, None)
        else:
            card[key] = value
    model.with_suffix(".json").write_text(json.dumps(card))
    return model


@pytest.mark.parametrize(
    ("changes", "weight"),
    [
        ({"weight": None, "metrics": {"val_accuracy": 0.83}}, 0.83),
        ({"weight": 0.4, "metrics": {"val_accuracy": 0.83}}, 0.4),  # explicit wins
        ({"weight": None, "metrics": {"test_accuracy": 0.9}}, 1.0),  # neither: 1.0
        ({"weight": None, "metrics": None}, 1.0),
        ({"weight": 2.5, "metrics": None}, 2.5),  # a weight need not be an accuracy
    ],
)
def test_card_weight_is_explicit_else_validation_accuracy_else_one(
    tmp_path: Path, changes: dict[str, Any], weight: float
) -> None:
    """The card's weight is its explicit weight, else its validation accuracy, else 1.0."""
    assert ModelCard.for_model(card_with(tmp_path, **changes)).weight == pytest.approx(weight)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"weight": 0}, r"weight must be finite and > 0, got 0"),
        ({"weight": -0.5}, r"weight must be finite and > 0, got -0.5"),
        ({"weight": float("nan")}, r"weight must be finite and > 0, got nan"),
        ({"weight": float("inf")}, r"weight must be finite and > 0, got inf"),
        ({"weight": "heavy"}, r"weight must be a number, got 'heavy'"),
        ({"weight": [1]}, r"weight must be a number, got \[1\]"),
        ({"weight": None, "metrics": {"val_accuracy": 0.0}}, r"val_accuracy 0.0 cannot be"),
        ({"weight": None, "metrics": {"val_accuracy": 1.5}}, r"val_accuracy 1.5 cannot be"),
    ],
)
def test_bad_weights_are_refused_in_one_line_naming_the_card(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    """A weight that is not a finite number > 0, given or taken from the validation
    accuracy, is a one-line ConfigError naming the card file."""
    model = card_with(tmp_path, **changes)
    with pytest.raises(ConfigError, match=message) as caught:
        ModelCard.for_model(model)
    text = str(caught.value)
    assert "\n" not in text and text.startswith(f"model card {model.with_suffix('.json')}: ")


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf")])
def test_agents_of_any_kind_with_a_bad_weight_are_refused(weight: float) -> None:
    """The runtime refuses a plug-in agent whose weight is not finite and > 0, and the
    motion agent refuses one given as a parameter."""
    agent = ConstantAgent(type="accel")
    agent.weight = weight
    with pytest.raises(ConfigError, match="agent 'accel': weight must be finite and > 0"):
        AgentRuntime(agent, None, subjects=Subjects("x"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="motion agent: weight must be finite and > 0"):
        MotionEnergyAgent(weight=str(weight))


def test_discovery_ignores_agent_info_with_a_bad_weight() -> None:
    """Service metadata whose weight is not finite and > 0 is not taken as an agent's info."""
    body = {
        "agent_id": "a-1",
        "type": "a",
        "model": {"name": "m", "version": "1"},
        "runtime": "test",
        "inputs": [{"sensor": "accel", "samples": 0, "channels": 3}],
        "labels": ["x"],
    }
    metadata = {"fusebus.role": "agent", "fusebus.prefix": "fb"}
    good = agent_info_from_metadata({**metadata, INFO: json.dumps({**body, "weight": 0.7})})
    assert good is not None and good.weight == 0.7
    for bad in (0, -1, "NaN", "Infinity"):
        text = json.dumps(body)[:-1] + f', "weight": {bad}}}'
        assert agent_info_from_metadata({**metadata, INFO: text}) is None


async def test_validation_accuracy_weight_travels_in_metadata_and_results(
    tmp_path: Path, subjects: Subjects, connect_bus: Connect
) -> None:
    """An agent whose card gives only val_accuracy 0.83 registers weight 0.83 and puts it
    in every result, a single one and a batch alike."""
    nc = await connect_bus("test")
    await ensure_streams(nc.jetstream(), subjects, TopologySettings())
    agent = ModelAgent(card_with(tmp_path, weight=None, metrics={"val_accuracy": 0.83}))
    results = await Collector(Result).start(nc, subjects.result("bm"))
    runtime = await AgentRuntime(agent, await connect_bus("agent"), subjects=subjects).start()
    try:
        await wait_for_agents(nc, subjects.prefix, {"accel": 1})
        [(info, _)] = await discover_agents(nc, prefix=subjects.prefix)
        subtasks = [
            Subtask(
                task_id=f"t{i}",
                stream="bm",
                type="accel",
                window=Window(i, i + 1),
                inputs={"accel": np.zeros((100, 3), np.float32)},
                deadline_ns=2**62,
                expected=("accel",),
                ingest_ns=time.time_ns(),
            )
            for i in range(5)
        ]
        producer = Producer(nc, subjects)
        await producer.subtasks(subtasks[:1])  # a single result
        await results.wait_for(1)
        await producer.subtasks_unconfirmed("accel", subtasks[1:])  # a result batch
        await results.wait_for(5)
    finally:
        await runtime.stop()
    assert info.weight == pytest.approx(0.83)
    assert sorted(r.task_id for r in results.items) == [f"t{i}" for i in range(5)]
    assert all(r.weight == pytest.approx(0.83) for r in results.items)
