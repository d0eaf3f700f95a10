"""Faults with real processes: killed agents, a killed coordinator, a restarted fusion agent,
a slow agent. Whatever happens, every task the coordinator opened ends with exactly one
decision in the decisions stream."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
from nats.aio.client import Client
from nats.aio.msg import Msg

from agents import AgentRuntime, AgentSettings, ModelAgent
from agents.fusion import FusionAgent
from bus import EmbeddedServer, Subjects
from coordinator import Coordinator, PlanBook, basicmotions_plan
from fusebus.datasets import SensorDataset
from fusebus.paths import models_dir
from schemas import Decision
from tests.helpers import Collector, FrameFeeder, eventually, wait_for_agents, wait_for_role

ROOT = Path(__file__).resolve().parent.parent
FUSEBUS = (sys.executable, "-m", "fusebus")
Connect = Callable[[str], Awaitable[Client]]
Spawn = Callable[..., subprocess.Popen[bytes]]


def bus_args(server: EmbeddedServer, subjects: Subjects) -> tuple[str, ...]:
    return ("--nats-url", server.url, "--prefix", subjects.prefix, "--log-level", "warning")


async def opened_tasks(nc: Client, subjects: Subjects) -> set[str]:
    """Collects the id of every task the coordinator opens, from the subtasks it publishes."""
    from schemas import CODEC, Subtask

    ids: set[str] = set()

    async def on_msg(msg: Msg) -> None:
        ids.update(subtask.task_id for subtask in CODEC.decode_each(msg.data, Subtask))

    await nc.subscribe(subjects.all_tasks(), cb=on_msg)
    return ids


async def intake_done(nc: Client, subjects: Subjects, count: int) -> bool:
    """Whether the coordinator has acked every one of ``count`` frames in the intake stream."""
    state = (await nc.jetstream().stream_info(subjects.intake_stream)).state
    return bool(state.last_seq == count and state.messages == 0)


def kill(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(10)


async def model_agent(connect_bus: Connect, subjects: Subjects, type_name: str) -> AgentRuntime:
    """A shipped model served in this process on its own connection."""
    agent = ModelAgent(models_dir() / f"{type_name}.tflite")
    return await AgentRuntime(agent, await connect_bus(type_name), subjects=subjects).start()


async def fusion_agent(connect_bus: Connect, subjects: Subjects) -> FusionAgent:
    """The fusion agent in this process on its own connection."""
    return await FusionAgent(await connect_bus("fusion"), subjects=subjects).start()


async def coordinator_with(connect_bus: Connect, subjects: Subjects, **plan: float) -> Coordinator:
    """A coordinator in this process with the BasicMotions plan (``deadline_ms``...)."""
    return await Coordinator(
        await connect_bus("coordinator"),
        plans=PlanBook(default=basicmotions_plan(**plan)),  # type: ignore[arg-type]
        subjects=subjects,
    ).start()


def assert_one_decision_each(decisions: list[Decision], task_ids: set[str]) -> None:
    per_task = Counter(d.task_id for d in decisions)
    assert set(per_task) == task_ids, (
        f"missing {len(task_ids - set(per_task))}, extra {len(set(per_task) - task_ids)}"
    )
    assert max(per_task.values()) == 1, [t for t, n in per_task.items() if n > 1][:5]


async def test_killing_one_of_two_replicas_loses_and_duplicates_nothing(
    nats_server: EmbeddedServer,
    subjects: Subjects,
    connect_bus: Connect,
    spawn: Spawn,
    basicmotions: SensorDataset,
) -> None:
    """SIGKILL one of two accel replicas mid-stream: every task still gets exactly one decision."""
    nc = await connect_bus("test")
    args = bus_args(nats_server, subjects)
    replicas = [spawn(*FUSEBUS, "agent", "--model", "accel", *args) for _ in range(2)]
    spawn(*FUSEBUS, "agent", "--model", "gyro", *args)
    await wait_for_agents(nc, subjects.prefix, {"accel": 2, "gyro": 1})
    fusion = await fusion_agent(connect_bus, subjects)
    coordinator = await coordinator_with(connect_bus, subjects, deadline_ms=1000)
    decisions = await Collector(Decision).start_stream(nc, subjects.decision("bm"))
    tasks = await opened_tasks(nc, subjects)
    feeder = FrameFeeder(nc, subjects, basicmotions, every_s=0.02).start()
    try:
        await decisions.wait_for(20)
        kill(replicas[0])
        await decisions.wait_for(60)
        sent = await feeder.stop()
        await decisions.wait_for(sent, timeout_s=30)
        await decisions.settle(1.0)
    finally:
        await feeder.stop()
        await coordinator.stop()
        await fusion.stop()
    assert len(tasks) == sent
    assert_one_decision_each(decisions.items, tasks)
    assert sum(d.status == "complete" for d in decisions.items) > sent / 2


async def test_losing_every_replica_of_a_type_gives_partials_until_one_returns(
    nats_server: EmbeddedServer,
    subjects: Subjects,
    connect_bus: Connect,
    spawn: Spawn,
    basicmotions: SensorDataset,
) -> None:
    """SIGKILL the only gyro replica: tasks end partial at their deadline with gyro missing;
    start a replica again: later tasks are complete again."""
    nc = await connect_bus("test")
    args = bus_args(nats_server, subjects)
    gyro = spawn(*FUSEBUS, "agent", "--model", "gyro", *args)
    accel = await model_agent(connect_bus, subjects, "accel")
    await wait_for_agents(nc, subjects.prefix, {"gyro": 1})
    fusion = await fusion_agent(connect_bus, subjects)
    coordinator = await coordinator_with(connect_bus, subjects, deadline_ms=400)
    decisions = await Collector(Decision).start_stream(nc, subjects.decision("bm"))
    tasks = await opened_tasks(nc, subjects)
    feeder = FrameFeeder(nc, subjects, basicmotions, every_s=0.05).start()
    try:
        await decisions.wait_until(lambda d: d.status == "complete")
        kill(gyro)
        partial = await decisions.wait_until(lambda d: d.status == "partial")
        assert partial.missing == ("gyro",) and partial.contributors == ("accel",)
        assert partial.latency_ms >= 400
        spawn(*FUSEBUS, "agent", "--model", "gyro", *args)
        restarted = time.time_ns()
        back = await decisions.wait_until(
            lambda d: d.status == "complete" and d.decided_ns > restarted
        )
        assert set(back.contributors) == {"accel", "gyro"}
        sent = await feeder.stop()
        await decisions.wait_for(sent, timeout_s=30)
        await decisions.settle(1.0)
    finally:
        await feeder.stop()
        await coordinator.stop()
        await accel.stop()
        await fusion.stop()
    assert_one_decision_each(decisions.items, tasks)


async def test_coordinator_killed_and_restarted_finishes_every_task_it_opened(
    nats_server: EmbeddedServer,
    subjects: Subjects,
    connect_bus: Connect,
    spawn: Spawn,
    basicmotions: SensorDataset,
) -> None:
    """SIGKILL the coordinator while tasks are open and restart it: it restores them from its
    journal and ends each at its deadline, so every task it opened gets one decision.

    No gyro agent runs, so no task can complete without the coordinator's deadline status:
    without the journal the tasks open at the kill would never be decided in this test's time.
    """
    nc = await connect_bus("test")
    args = bus_args(nats_server, subjects)
    command = (*FUSEBUS, "coordinator", "--deadline-ms", "1500", *args)
    accel = await model_agent(connect_bus, subjects, "accel")
    fusion = await fusion_agent(connect_bus, subjects)
    decisions = await Collector(Decision).start_stream(nc, subjects.decision("bm"))
    tasks = await opened_tasks(nc, subjects)
    coordinator = spawn(*command)
    await wait_for_role(nc, subjects.prefix, "coordinator")
    feeder = FrameFeeder(nc, subjects, basicmotions, every_s=0.05).start()
    try:
        await decisions.wait_for(5)
        sent = await feeder.stop()
        await eventually(
            lambda: len(tasks) == sent, what=f"a task opened for each of {sent} frames"
        )
        # Frames are acked once the tasks they opened are in the journal.
        await eventually(
            lambda: intake_done(nc, subjects, sent), what=f"all {sent} frames acked (journalled)"
        )
        open_at_kill = len(tasks) - len(decisions.items)
        assert open_at_kill >= 5
        kill(coordinator)
        spawn(*command)
        await wait_for_role(nc, subjects.prefix, "coordinator")
        feeder = FrameFeeder(nc, subjects, basicmotions, every_s=0.05, stream="bm").start()
        feeder.sent = 1000  # later windows, distinct from the first run's
        await eventually(
            lambda: len(tasks) >= sent + 10, what="ten tasks opened by the restarted coordinator"
        )
        await feeder.stop()
        await decisions.wait_for(len(tasks), timeout_s=20)
        await decisions.settle(1.0)
    finally:
        await feeder.stop()
        await accel.stop()
        await fusion.stop()
    assert_one_decision_each(decisions.items, tasks)
    assert {d.status for d in decisions.items} == {"partial"}
    assert all(d.missing == ("gyro",) for d in decisions.items)


async def test_fusion_restarted_mid_stream_gives_each_task_one_decision(
    nats_server: EmbeddedServer,
    subjects: Subjects,
    connect_bus: Connect,
    spawn: Spawn,
    basicmotions: SensorDataset,
) -> None:
    """SIGKILL the fusion agent mid-stream and start it again: no task gets two decisions,
    none gets none."""
    nc = await connect_bus("test")
    args = bus_args(nats_server, subjects)
    agents = [
        await AgentRuntime(
            ModelAgent(models_dir() / f"{t}.tflite"), await connect_bus(t), subjects=subjects
        ).start()
        for t in ("accel", "gyro")
    ]
    coordinator = await coordinator_with(connect_bus, subjects, deadline_ms=1000)
    decisions = await Collector(Decision).start_stream(nc, subjects.decision("bm"))
    tasks = await opened_tasks(nc, subjects)
    fusion = spawn(*FUSEBUS, "fusion", *args)
    await wait_for_role(nc, subjects.prefix, "fusion")
    feeder = FrameFeeder(nc, subjects, basicmotions, every_s=0.02).start()
    try:
        await decisions.wait_for(20)
        kill(fusion)
        down_from = len(tasks)
        await eventually(
            lambda: len(tasks) >= down_from + 10, what="ten tasks opened while fusion is down"
        )
        spawn(*FUSEBUS, "fusion", *args)
        await wait_for_role(nc, subjects.prefix, "fusion")
        await decisions.wait_for(down_from + 10)  # the new fusion decides what it missed
        sent = await feeder.stop()
        await decisions.wait_for(sent, timeout_s=30)
        await decisions.settle(1.0)
    finally:
        await feeder.stop()
        await coordinator.stop()
        for agent in agents:
            await agent.stop()
    assert len(tasks) == sent
    assert_one_decision_each(decisions.items, tasks)


class SlowAgent(ModelAgent):
    """The accel model, made slow on purpose: each call takes at least ``delay_s``."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(models_dir() / "accel.tflite")
        self.delay_s = delay_s

    def predict(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        time.sleep(self.delay_s)  # the slowness under test
        return super().predict(batch)


async def test_slow_agent_with_small_inflight_sheds_windows_and_stays_bounded(
    subjects: Subjects, connect_bus: Connect, basicmotions: SensorDataset
) -> None:
    """A slow agent and max_inflight 3: windows are shed and counted, every task still gets
    one decision, latency stays bounded by the deadline, and nothing piles up in memory."""
    nc = await connect_bus("test")
    slow = await AgentRuntime(
        SlowAgent(0.1),
        await connect_bus("slow"),
        subjects=subjects,
        settings=AgentSettings(max_batch=1),
    ).start()
    gyro = await model_agent(connect_bus, subjects, "gyro")
    fusion = await fusion_agent(connect_bus, subjects)
    coordinator = await coordinator_with(connect_bus, subjects, deadline_ms=800, max_inflight=3)
    decisions = await Collector(Decision).start_stream(nc, subjects.decision("bm"))
    tasks = await opened_tasks(nc, subjects)
    most_open = 0
    most_pending = 0

    def watched_until_enough_sent() -> bool:
        nonlocal most_open, most_pending
        most_open = max(most_open, len(coordinator.tracker))
        most_pending = max(most_pending, len(fusion.pending))
        return feeder.sent >= 150

    feeder = FrameFeeder(nc, subjects, basicmotions, every_s=0.02).start()
    try:
        await eventually(watched_until_enough_sent, what="150 frames sent", timeout_s=30)
        sent = await feeder.stop()
        await decisions.wait_for(sent, timeout_s=30)
        await decisions.settle(1.0)
    finally:
        await feeder.stop()
        for component in (coordinator, slow, gyro, fusion):
            await component.stop()
    assert_one_decision_each(decisions.items, tasks)
    shed = coordinator.stats()["shed"]
    assert shed > sent / 3, f"only {shed} of {sent} shed"
    assert most_open <= 3
    assert most_pending <= 3 + 5  # shed tasks are decided as soon as their status arrives
    assert max(d.latency_ms for d in decisions.items) < 800 + 1000
    assert slow.counts["expired"] > 0  # subtasks of shed tasks are dropped, not inferred, once late


async def test_block_policy_makes_a_waiting_producer_keep_pace(
    subjects: Subjects, connect_bus: Connect, basicmotions: SensorDataset
) -> None:
    """With overflow = block, a producer that waits for answers is held back: nothing is
    shed, every window is decided complete, and sending takes as long as the slow agent."""
    from bus import Producer
    from fusebus.replay import replay_frames

    nc = await connect_bus("test")
    plan = dataclasses.replace(
        basicmotions_plan(deadline_ms=5000, max_inflight=2), overflow="block"
    )
    slow = await AgentRuntime(
        SlowAgent(0.15),
        await connect_bus("slow"),
        subjects=subjects,
        settings=AgentSettings(max_batch=1),
    ).start()
    gyro = await model_agent(connect_bus, subjects, "gyro")
    fusion = await fusion_agent(connect_bus, subjects)
    coordinator = await Coordinator(
        await connect_bus("coordinator"), plans=PlanBook(default=plan), subjects=subjects
    ).start()
    decisions = await Collector(Decision).start_stream(nc, subjects.decision("bm"))
    try:
        started = time.perf_counter()
        # Each answer comes once a task ends (about 0.15 s); 10 s per frame and 60 s in all
        # fail the test with the coordinator's state, well before the run's timeout.
        try:
            async with asyncio.timeout(60):
                sent = await replay_frames(
                    Producer(nc, subjects),
                    basicmotions,
                    stream="bm",
                    rate_hz=1000,
                    limit=12,
                    wait_s=10,
                )
        except TimeoutError:  # nats-py's TimeoutError too
            raise AssertionError(
                f"a held frame was never answered: {coordinator.stats()}"
            ) from None
        elapsed = time.perf_counter() - started
        await decisions.wait_for(12, timeout_s=20)
    finally:
        for component in (coordinator, slow, gyro, fusion):
            await component.stop()
    assert all(w.answer == b"accepted" for w in sent)
    assert elapsed >= (12 - 2) * 0.15 * 0.9  # held to the slow agent's pace, not 1000 frames/s
    assert all(d.status == "complete" for d in decisions.items)
    assert coordinator.stats()["shed"] == 0 and coordinator.stats()["held"] > 0


async def test_sigterm_on_an_agent_under_load_loses_no_subtask(
    nats_server: EmbeddedServer,
    subjects: Subjects,
    connect_bus: Connect,
    spawn: Spawn,
    basicmotions: SensorDataset,
) -> None:
    """SIGTERM one of two accel replicas while frames stream: it finishes and acks the batch
    in hand, hands back what it had buffered, exits 0, and every task still completes."""
    nc = await connect_bus("test")
    args = bus_args(nats_server, subjects)
    replicas = [spawn(*FUSEBUS, "agent", "--model", "accel", *args) for _ in range(2)]
    gyro = await model_agent(connect_bus, subjects, "gyro")
    await wait_for_agents(nc, subjects.prefix, {"accel": 2})
    fusion = await fusion_agent(connect_bus, subjects)
    coordinator = await coordinator_with(connect_bus, subjects, deadline_ms=5000)
    decisions = await Collector(Decision).start_stream(nc, subjects.decision("bm"))
    tasks = await opened_tasks(nc, subjects)
    feeder = FrameFeeder(nc, subjects, basicmotions, every_s=0.01).start()
    try:
        await decisions.wait_for(30)
        replicas[0].send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(replicas[0].wait, 30) == 0
        await decisions.wait_for(80)
        sent = await feeder.stop()
        await decisions.wait_for(sent, timeout_s=30)
        await decisions.settle(0.5)
    finally:
        await feeder.stop()
        for component in (coordinator, gyro, fusion):
            await component.stop()
    assert_one_decision_each(decisions.items, tasks)
    assert {d.status for d in decisions.items} == {"complete"}


async def test_sigterm_on_the_coordinator_lets_every_opened_task_end(
    nats_server: EmbeddedServer,
    subjects: Subjects,
    connect_bus: Connect,
    spawn: Spawn,
    basicmotions: SensorDataset,
) -> None:
    """SIGTERM the coordinator mid-stream with --drain-s: it stops opening tasks, lets the
    open ones end (here: at their deadline, gyro being absent), then exits 0."""
    nc = await connect_bus("test")
    accel = await model_agent(connect_bus, subjects, "accel")
    fusion = await fusion_agent(connect_bus, subjects)
    decisions = await Collector(Decision).start_stream(nc, subjects.decision("bm"))
    tasks = await opened_tasks(nc, subjects)
    coordinator = spawn(
        *FUSEBUS,
        "coordinator",
        "--deadline-ms",
        "1500",
        "--drain-s",
        "10",
        *bus_args(nats_server, subjects),
    )
    await wait_for_role(nc, subjects.prefix, "coordinator")
    feeder = FrameFeeder(nc, subjects, basicmotions, every_s=0.05).start()
    try:
        await decisions.wait_for(5)
        coordinator.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(coordinator.wait, 30) == 0
        await feeder.stop()
        await decisions.wait_for(len(tasks), timeout_s=10)
        await decisions.settle(0.5)
    finally:
        await feeder.stop()
        await accel.stop()
        await fusion.stop()
    assert len(tasks) >= 10
    assert_one_decision_each(decisions.items, tasks)
