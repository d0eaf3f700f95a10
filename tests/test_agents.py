"""Agents on a real nats-server: replicas, micro-batching, deadlines, errors and dead letters."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from nats.aio.client import Client

from agents import AgentRuntime, AgentSettings, ModelAgent
from agents.builtin import MotionEnergyAgent
from agents.loading import load_agent, registered_agents, resolve_agent_class
from bus import EmbeddedServer, Producer, Subjects, TopologySettings, discover_agents
from fusebus.datasets import SensorDataset
from fusebus.paths import models_dir
from schemas import ConfigError, DeadLetter, Result, Subtask, Window
from tests.helpers import Collector, wait_for_agents
from tests.plugins import BrokenAgent, ConstantAgent

ROOT = Path(__file__).resolve().parent.parent
Connect = Callable[[str], Awaitable[Client]]
FAR_FUTURE_NS = 2**62


def subtasks_for(
    dataset: SensorDataset,
    type_name: str,
    count: int,
    *,
    deadline_ns: int = FAR_FUTURE_NS,
    stream: str = "bm",
) -> list[Subtask]:
    """``count`` subtasks of ``type_name`` built from the TEST cases, cycling through them."""
    x = dataset.x_test
    return [
        Subtask(
            task_id=f"task-{i}",
            stream=stream,
            type=type_name,
            window=Window(i, i + 1),
            inputs={type_name: dataset.sensor_view(x[i % len(x)], type_name)},
            deadline_ns=deadline_ns,
            expected=(type_name,),
            ingest_ns=time.time_ns(),
        )
        for i in range(count)
    ]


def output_of(result: Result) -> np.ndarray:
    """A result's scores; a result that carries none (an error) fails the test."""
    assert result.output is not None, result.error
    return result.output


async def publish_backlog(nc: Client, subjects: Subjects, subtasks: list[Subtask]) -> None:
    """Publish subtasks into the work queue (creating the streams first)."""
    from bus import ensure_streams

    await ensure_streams(nc.jetstream(), subjects, TopologySettings())
    producer = Producer(nc, subjects)
    for start in range(0, len(subtasks), 200):
        await producer.subtasks(subtasks[start : start + 200])


async def test_three_replica_processes_share_the_work_exactly_once(
    nats_server: EmbeddedServer,
    subjects: Subjects,
    connect_bus: Connect,
    basicmotions: SensorDataset,
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> None:
    """Three `fusebus agent` processes of one type under a backlog each answer some subtasks;
    every subtask is answered exactly once and the replicas' counters add up."""
    nc = await connect_bus("test")
    results = await Collector(Result).start(nc, subjects.result("bm"))
    for _ in range(3):
        spawn(
            sys.executable,
            "-m",
            "fusebus",
            "agent",
            "--model",
            "accel",
            "--max-batch",
            "16",
            "--nats-url",
            nats_server.url,
            "--prefix",
            subjects.prefix,
            "--log-level",
            "warning",
        )
    await wait_for_agents(nc, subjects.prefix, {"accel": 3})
    await publish_backlog(nc, subjects, subtasks_for(basicmotions, "accel", 1500))

    await results.wait_for(1500, timeout_s=60)
    await results.settle()
    per_task = Counter(r.task_id for r in results.items)
    assert len(per_task) == 1500 and set(per_task.values()) == {1}
    per_replica = Counter(r.agent_id for r in results.items)
    assert len(per_replica) == 3 and min(per_replica.values()) > 0
    stats = {
        info.agent_id: counters
        for info, counters in await discover_agents(nc, prefix=subjects.prefix)
    }
    assert {agent_id: c["processed"] for agent_id, c in stats.items()} == dict(per_replica)


async def test_backlog_is_served_in_batches_that_match_single_inference(
    subjects: Subjects, connect_bus: Connect, basicmotions: SensorDataset
) -> None:
    """With a backlog waiting, the runtime makes batched model calls, and the batched outputs
    equal one-at-a-time inference to float tolerance."""
    nc = await connect_bus("test")
    subtasks = subtasks_for(basicmotions, "gyro", 300)
    await publish_backlog(nc, subjects, subtasks)
    results = await Collector(Result).start(nc, subjects.result("bm"))
    agent = ModelAgent(models_dir() / "gyro.tflite")
    runtime = await AgentRuntime(
        agent,
        await connect_bus("agent"),
        subjects=subjects,
        settings=AgentSettings(max_batch=64, max_wait_ms=5),
    ).start()
    try:
        await results.wait_for(300)
    finally:
        await runtime.stop()

    sizes = runtime.batch_sizes
    assert sum(size * n for size, n in sizes.items()) == 300
    assert max(sizes) >= 32 and runtime.counts["batches"] < 300 / 8
    reference = ModelAgent(models_dir() / "gyro.tflite")
    reference.warm_up()
    by_task = {r.task_id: r for r in results.items}
    for subtask in subtasks[:60]:
        single = reference.predict({"gyro": subtask.inputs["gyro"][None]})[0]
        np.testing.assert_allclose(output_of(by_task[subtask.task_id]), single, atol=1e-5)


async def test_expired_subtasks_are_dropped_and_counted(
    subjects: Subjects, connect_bus: Connect, basicmotions: SensorDataset
) -> None:
    """Subtasks pulled after their deadline are not inferred: counted as expired, acked, no result."""
    nc = await connect_bus("test")
    await publish_backlog(
        nc, subjects, subtasks_for(basicmotions, "accel", 20, deadline_ns=time.time_ns() - 1)
    )
    await publish_backlog(nc, subjects, [subtasks_for(basicmotions, "accel", 21)[-1]])
    results = await Collector(Result).start(nc, subjects.result("bm"))
    agent = ConstantAgent(type="accel")
    runtime = await AgentRuntime(agent, await connect_bus("agent"), subjects=subjects).start()
    try:
        [result] = await results.wait_for(1)
        await results.settle()
    finally:
        await runtime.stop()
    assert result.task_id == "task-20" and len(results.items) == 1
    assert runtime.counts["expired"] == 20 and sum(agent.calls) == 1
    info = await nc.jetstream().stream_info(subjects.tasks_stream)
    assert info.state.messages == 0


async def test_model_that_raises_ends_in_dead_letters_after_its_deliveries(
    subjects: Subjects, connect_bus: Connect, basicmotions: SensorDataset
) -> None:
    """A failing model naks with backoff; after max_deliver attempts each subtask becomes a
    DeadLetter (reason max_deliveries) and is removed from the work queue."""
    nc = await connect_bus("test")
    letters = await Collector(DeadLetter).start(nc, subjects.dlq("agent-accel"))
    topology = TopologySettings(task_max_deliver=3)
    runtime = await AgentRuntime(
        BrokenAgent(type="accel"),
        await connect_bus("agent"),
        subjects=subjects,
        topology=topology,
        settings=AgentSettings(nak_delays_s=(0.05, 0.1)),
    ).start()
    try:
        await publish_backlog(nc, subjects, subtasks_for(basicmotions, "accel", 5))
        await letters.wait_for(5, timeout_s=30)
        await letters.settle()
    finally:
        await runtime.stop()
    assert len(letters.items) == 5
    assert {letter.reason for letter in letters.items} == {"max_deliveries"}
    assert all("attempt 3" in letter.error for letter in letters.items)
    assert sorted(task_ids_of(letters.items)) == sorted(f"task-{i}" for i in range(5))
    assert runtime.counts["errors"] >= 3
    assert (await nc.jetstream().stream_info(subjects.tasks_stream)).state.messages == 0


def task_ids_of(letters: list[DeadLetter]) -> list[str]:
    """The task ids of the subtasks kept in dead letters."""
    from schemas import decode

    return [decode(letter.data, Subtask).task_id for letter in letters]


async def test_malformed_subtask_goes_straight_to_a_dead_letter(
    subjects: Subjects, connect_bus: Connect
) -> None:
    """Undecodable bytes are dead-lettered at once, never retried, never counted as model errors."""
    nc = await connect_bus("test")
    letters = await Collector(DeadLetter).start(nc, subjects.all_dlq())
    runtime = await AgentRuntime(
        ConstantAgent(type="accel"), await connect_bus("agent"), subjects=subjects
    ).start()
    try:
        await nc.jetstream().publish(subjects.task("accel"), b"\x81\xa4kind\xa7subtask")
        [letter] = await letters.wait_for(1)
        await letters.settle(0.5)
    finally:
        await runtime.stop()
    assert len(letters.items) == 1 and letter.reason == "unsupported_version"
    assert runtime.counts["errors"] == 0 and runtime.stats()["dead_letters"] == 1


def test_agent_classes_load_by_module_path_and_entry_point() -> None:
    """`module:Class` and names registered under fusebus.agents both give a ready agent."""
    assert registered_agents()["motion"] == "agents.builtin.motion:MotionEnergyAgent"
    motion = load_agent("motion", {"softness": "0.25"})
    assert isinstance(motion, MotionEnergyAgent) and motion.softness == 0.25
    constant = load_agent("tests.plugins:ConstantAgent", {"type": "c2", "scores": "1,0,0"})
    assert constant.type == "c2" and constant.labels == ("label0", "label1", "label2")
    assert resolve_agent_class("agents.builtin:MotionEnergyAgent") is MotionEnergyAgent


@pytest.mark.parametrize(
    ("spec", "params", "message"),
    [
        ("nosuch", {}, "no agent registered as 'nosuch'"),
        ("no.such.module:Agent", {}, "cannot import agent module"),
        ("tests.plugins:Missing", {}, "has no class 'Missing'"),
        ("tests.plugins:ConstantAgent", {"colour": "red"}, "cannot create ConstantAgent"),
        ("schemas:Window", {"t_start_ns": "0", "t_end_ns": "1"}, "is not an agent"),
    ],
)
def test_bad_agent_specs_are_config_errors(spec: str, params: dict[str, str], message: str) -> None:
    """Every way of naming a wrong agent gives a ConfigError that says what is wrong."""
    with pytest.raises(ConfigError, match=message):
        load_agent(spec, params)


def test_motion_agent_classifies_basicmotions_without_a_model(basicmotions: SensorDataset) -> None:
    """The rule-based agent alone gets most TEST cases right from motion energy."""
    agent = MotionEnergyAgent()
    scores = agent.predict({"accel": basicmotions.sensor_view(basicmotions.x_test, "accel")})
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-6)
    predicted = [basicmotions.labels.index(agent.labels[i]) for i in scores.argmax(axis=1)]
    assert np.mean(np.array(predicted) == basicmotions.y_test) >= 0.85


async def test_keras_model_served_under_another_type_matches_litert(
    subjects: Subjects, connect_bus: Connect, basicmotions: SensorDataset
) -> None:
    """The generic model agent serves a .keras file under a type given on the command line,
    and its answers equal the LiteRT conversion's."""
    nc = await connect_bus("test")
    agent = ModelAgent(models_dir() / "accel.keras", type_name="accel-tf")
    assert agent.runtime == "keras"
    subtasks = [
        Subtask(
            task_id=s.task_id,
            stream="bm",
            type="accel-tf",
            window=s.window,
            inputs={"accel": s.inputs["accel"]},
            deadline_ns=FAR_FUTURE_NS,
            expected=("accel-tf",),
        )
        for s in subtasks_for(basicmotions, "accel", 40)
    ]
    await publish_backlog(nc, subjects, subtasks)
    results = await Collector(Result).start(nc, subjects.result("bm"))
    runtime = await AgentRuntime(agent, await connect_bus("agent"), subjects=subjects).start()
    try:
        await results.wait_for(40)
    finally:
        await runtime.stop()
    lite = ModelAgent(models_dir() / "accel.tflite")
    lite.warm_up()
    expected = lite.predict({"accel": np.stack([s.inputs["accel"] for s in subtasks])})
    by_task = {r.task_id: r for r in results.items}
    np.testing.assert_allclose(
        np.stack([output_of(by_task[s.task_id]) for s in subtasks]), expected, atol=1e-4
    )
    assert {r.type for r in results.items} == {"accel-tf"}


class ThreadNotingAgent(ConstantAgent):
    """Notes the thread each model call runs in, and takes ``seconds`` per call."""

    def __init__(self, seconds: float) -> None:
        super().__init__(type="accel")
        self.seconds = seconds
        self.threads: list[str] = []

    def predict(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Sleep, note the thread, answer constant scores."""
        time.sleep(self.seconds)  # the length of a model call: what is under test
        self.threads.append(threading.current_thread().name)
        return super().predict(batch)


@pytest.mark.parametrize(("seconds", "inline_after_first"), [(0.0, True), (0.005, False)])
async def test_short_model_calls_run_on_the_loop_and_long_ones_in_the_thread(
    subjects: Subjects,
    connect_bus: Connect,
    basicmotions: SensorDataset,
    seconds: float,
    inline_after_first: bool,
) -> None:
    """The first call measures the model in the inference thread; then a call expected to
    be shorter than the hop there and back runs on the event loop, and a longer one does not."""
    nc = await connect_bus("test")
    results = await Collector(Result).start(nc, subjects.result("bm"))
    agent = ThreadNotingAgent(seconds)
    runtime = await AgentRuntime(agent, await connect_bus("agent"), subjects=subjects).start()
    try:
        for i in range(4):  # one at a time, so that each is its own model call
            await publish_backlog(nc, subjects, subtasks_for(basicmotions, "accel", i + 1)[-1:])
            await results.wait_for(i + 1)
    finally:
        await runtime.stop()
    assert agent.threads[0].startswith("infer-")
    on_loop = [name == threading.main_thread().name for name in agent.threads[1:]]
    assert on_loop == [inline_after_first] * 3


async def test_a_batch_spanning_streams_is_answered_on_each_streams_subject(
    subjects: Subjects, connect_bus: Connect, basicmotions: SensorDataset
) -> None:
    """Subtasks of one type from two streams travel in one batch; each stream gets its own
    results, with the right rows."""
    from bus import ensure_streams

    nc = await connect_bus("test")
    await ensure_streams(nc.jetstream(), subjects, TopologySettings())
    first = await Collector(Result).start(nc, subjects.result("bm"))
    second = await Collector(Result).start(nc, subjects.result("other"))
    subtasks = subtasks_for(basicmotions, "accel", 6)
    mixed = [s if i % 3 else replace(s, stream="other") for i, s in enumerate(subtasks)]
    await Producer(nc, subjects).subtasks_unconfirmed("accel", mixed)  # one subtask_batch
    runtime = await AgentRuntime(
        ConstantAgent(type="accel"), await connect_bus("agent"), subjects=subjects
    ).start()
    try:
        await first.wait_for(4)
        await second.wait_for(2)
    finally:
        await runtime.stop()
    assert sorted(r.task_id for r in first.items) == ["task-1", "task-2", "task-4", "task-5"]
    assert sorted(r.task_id for r in second.items) == ["task-0", "task-3"]
    assert all(r.window == Window(int(r.task_id[5:]), int(r.task_id[5:]) + 1) for r in first.items)
