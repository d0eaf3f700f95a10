"""Inputs that do not fit an agent's card: one warning per stream and shape, an error result
for every subtask, no dead letters, and the task ends at once rather than at its deadline."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
from nats.aio.client import Client

from agents import AgentRuntime, ModelAgent
from agents.builtin import MotionEnergyAgent
from agents.inputs import input_mismatch
from bus import Producer, Subjects, TopologySettings, ensure_streams
from coordinator import Plan, SensorInput, SubtaskSpec
from fusebus.datasets import SensorDataset
from fusebus.paths import models_dir
from schemas import (
    ConfigError,
    DeadLetter,
    Decision,
    InputSpec,
    Result,
    SensorFrame,
    Subtask,
    Window,
)
from tests.helpers import Collector, Pipeline, eventually

Connect = Callable[[str], Awaitable[Client]]
FAR_FUTURE_NS = 2**62


def subtask(task_id: str, stream: str, inputs: dict[str, np.ndarray]) -> Subtask:
    """An ``accel`` subtask of ``stream`` with ``inputs``."""
    return Subtask(
        task_id=task_id,
        stream=stream,
        type="accel",
        window=Window(0, 1),
        inputs=inputs,
        deadline_ns=FAR_FUTURE_NS,
        expected=("accel",),
        ingest_ns=time.time_ns(),
        ticket=task_id.encode()[:16].ljust(16, b"\0"),
    )


async def test_misfit_subtasks_get_error_results_and_one_warning_per_stream_and_shape(
    subjects: Subjects, connect_bus: Connect
) -> None:
    """An accel agent (card: 100 x 3) sent 50-sample windows on two streams and a gyro-only
    input on one answers every such subtask with an input_mismatch error naming expected and
    got, logs one warning per (stream, shape), dead-letters nothing and still serves good
    subtasks."""
    nc = await connect_bus("test")
    await ensure_streams(nc.jetstream(), subjects, TopologySettings())
    short = {"accel": np.zeros((50, 3), np.float32)}
    gyro_only = {"gyro": np.zeros((100, 3), np.float32)}
    good = {"accel": np.zeros((100, 3), np.float32)}
    sent = (
        [subtask(f"a-short-{i}", "a", short) for i in range(5)]
        + [subtask(f"b-short-{i}", "b", short) for i in range(3)]
        + [subtask(f"a-gyro-{i}", "a", gyro_only) for i in range(4)]
        + [subtask(f"a-good-{i}", "a", good) for i in range(2)]
    )
    misfits = {s.task_id: s for s in sent if "good" not in s.task_id}
    on_a = await Collector(Result).start(nc, subjects.result("a"))
    on_b = await Collector(Result).start(nc, subjects.result("b"))
    letters = await Collector(DeadLetter).start(nc, subjects.all_dlq())
    producer = Producer(nc, subjects)
    with structlog.testing.capture_logs() as logs:
        runtime = await AgentRuntime(
            ModelAgent(models_dir() / "accel.tflite"), await connect_bus("agent"), subjects=subjects
        ).start()
        try:
            for one in sent:  # one message each: the warning is once per shape, not per message
                await producer.subtasks([one])
            await on_a.wait_for(11)
            await on_b.wait_for(3)
            await letters.settle(0.5)
        finally:
            await runtime.stop()

    results = on_a.items + on_b.items
    assert Counter(r.task_id for r in results) == Counter(s.task_id for s in sent)
    errors = {r.task_id: r for r in results if r.error is not None}
    assert set(errors) == set(misfits)
    for task_id, result in errors.items():
        assert result.error is not None and result.error.code == "input_mismatch"
        assert result.output is None and result.stream == misfits[task_id].stream
        assert result.ticket == misfits[task_id].ticket  # fusion can place it in its task
        assert result.weight == runtime.agent.weight and result.labels == runtime.agent.labels
    texts = {task_id: r.error.text for task_id, r in errors.items() if r.error is not None}
    assert "reads 100 samples x 3 channels float32" in texts["a-short-0"]
    assert "has 50 samples x 3 channels float32" in texts["a-short-0"]
    assert "has no such input (gyro: 100 samples x 3 channels float32)" in texts["a-gyro-0"]
    assert all(r.output is not None for r in results if "good" in r.task_id)

    warnings = [e for e in logs if e["event"] == "subtask.input_mismatch"]
    assert sorted((w["stream"], w["got"]) for w in warnings) == [
        ("a", "50 samples x 3 channels float32"),
        ("a", "no such input (gyro: 100 samples x 3 channels float32)"),
        ("b", "50 samples x 3 channels float32"),
    ]
    assert all(w["log_level"] == "warning" and w["sensor"] == "accel" for w in warnings)
    assert letters.items == [] and runtime.stats()["dead_letters"] == 0
    assert runtime.stats()["input_mismatch"] == 12 and runtime.counts["processed"] == 2
    assert (await nc.jetstream().stream_info(subjects.tasks_stream)).state.messages == 0


async def test_frames_that_misfit_a_running_agent_are_refused_before_it_sees_them(
    pipeline: Callable[..., Awaitable[Pipeline]],
    connect_bus: Connect,
    basicmotions: SensorDataset,
) -> None:
    """Frames of 50 samples for a plan whose accel type's running agent reads 100: the
    coordinator knows the card, so it refuses each frame at the door (`bad_shape`) and no
    subtask reaches the agent (the agent's own answer to a misfit is tested above, with
    subtasks sent straight to it)."""
    plan = Plan(
        subtasks=(
            SubtaskSpec("accel", (SensorInput("accel"),)),
            SubtaskSpec("motion", (SensorInput("accel"),)),
        ),
        deadline_ms=60_000,
    )
    parts = await pipeline(agents=("accel",), plan=plan)
    motion = await AgentRuntime(
        MotionEnergyAgent(), await connect_bus("agent-motion"), subjects=parts.subjects
    ).start()
    parts.agents.append(motion)  # stopped with the pipeline
    decisions = await Collector(Decision).start_stream(parts.nc, parts.subjects.decision("half"))
    producer = Producer(parts.nc, parts.subjects)
    assert parts.coordinator is not None
    directory = parts.coordinator.directory
    await eventually(lambda: "accel" in directory and "motion" in directory, what="discovery")
    answers = []
    for i in range(3):
        case = basicmotions.x_test[i]
        frame = SensorFrame(
            stream="half",
            t_ns=(i + 1) * 10**10,
            period_ns=basicmotions.period_ns,
            sensors={"accel": basicmotions.sensor_view(case, "accel")[:50].copy()},
        )
        answers.append(await producer.frame(frame, wait_s=10))
    assert all(
        a is not None and a.startswith(b"rejected: bad_shape: type 'accel'") for a in answers
    )
    assert decisions.items == [] and parts.coordinator.tracker.counts["opened"] == 0
    [accel] = [a for a in parts.agents if a.agent.type == "accel"]
    assert accel.stats()["input_mismatch"] == 0 and accel.stats()["processed"] == 0


@pytest.mark.parametrize(
    ("arrays", "dtypes", "got"),
    [
        ({"accel": np.zeros((2, 100, 3), np.float32)}, None, None),
        ({"accel": np.zeros((2, 100, 3), np.float64)}, (np.float32,), None),  # casts down
        ({"accel": np.zeros((2, 100, 3), np.int16)}, (np.float32,), None),  # casts up
        ({"accel": np.zeros((2, 100, 3), np.float32), "gyro": np.zeros((2, 7, 1))}, None, None),
        ({"accel": np.zeros((2, 100, 2), np.float32)}, None, "100 samples x 2 channels float32"),
        ({"accel": np.zeros((2, 100), np.float32)}, None, "per-row shape (100,) float32"),
        ({"accel": np.zeros((2, 100, 3), np.float32)}, (np.int8,), "100 samples x 3 channels"),
        ({"gyro": np.zeros((2, 100, 3), np.float32)}, None, "no such input (gyro: 100 samples"),
        ({}, None, "no such input (nothing)"),
    ],
)
def test_input_mismatch_names_what_the_agent_reads_and_what_came(
    arrays: dict[str, np.ndarray], dtypes: tuple[Any, ...] | None, got: str | None
) -> None:
    """A batch fits when every input the card names is there with its samples and channels
    (0: any) and a dtype castable to the model's; otherwise the mismatch says what came."""
    specs = (InputSpec("accel", 100, 3),)
    mismatch = input_mismatch(
        specs, arrays, dtypes=[np.dtype(d) for d in dtypes] if dtypes else None
    )
    if got is None:
        assert mismatch is None
    else:
        assert mismatch is not None and mismatch.got.startswith(got)
        assert mismatch.sensor == "accel" and mismatch.expected.startswith("100 samples x 3")
        assert mismatch.text.startswith("input 'accel': the agent reads 100 samples x 3")


def test_any_samples_fit_a_card_that_leaves_them_open() -> None:
    """An input spec with 0 samples takes any window length with the right channels."""
    specs = (InputSpec("accel", 0, 3),)
    for samples in (1, 50, 1000):
        assert input_mismatch(specs, {"accel": np.zeros((1, samples, 3))}) is None
    assert input_mismatch(specs, {"accel": np.zeros((1, 50, 4))}) is not None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"samples": 50}, "says input 'accel' has 50 samples, the model takes 100"),
        ({"channels": 6}, "says input 'accel' has 6 channels, the model takes 3"),
    ],
)
def test_a_card_that_misdescribes_its_model_is_refused_at_start(
    tmp_path: Path, change: dict[str, int], message: str
) -> None:
    """A card whose input shape differs from the model's is a ConfigError when the agent is
    made, known at start, before any subtask."""
    source = models_dir() / "accel.tflite"
    (tmp_path / "m.tflite").write_bytes(source.read_bytes())
    card = json.loads(source.with_suffix(".json").read_text())
    card["inputs"][0].update(change)
    (tmp_path / "m.json").write_text(json.dumps(card))
    with pytest.raises(ConfigError, match=message):
        ModelAgent(tmp_path / "m.tflite")


def test_a_card_listing_more_inputs_than_the_model_takes_is_refused(tmp_path: Path) -> None:
    """The card and the model agree on the number of inputs, or the agent does not start."""
    source = models_dir() / "accel.tflite"
    (tmp_path / "m.tflite").write_bytes(source.read_bytes())
    card = json.loads(source.with_suffix(".json").read_text())
    card["inputs"].append({"sensor": "gyro", "samples": 100, "channels": 3})
    (tmp_path / "m.json").write_text(json.dumps(card))
    with pytest.raises(ConfigError, match="lists 2 inputs, the model takes 1"):
        ModelAgent(tmp_path / "m.tflite")
