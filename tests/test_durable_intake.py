"""Durable intake: a coordinator SIGKILLed at any moment loses no window.

Sensor data waits in the intake stream until what it opened is durable, and task ids are the
stream and the window start, so a restarted coordinator opens exactly the tasks the dead one
had not made durable. Every window whose data reached the server ends with exactly one
decision.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from nats.aio.client import Client

from bus import EmbeddedServer, Producer, Subjects
from fusebus.datasets import SensorDataset
from fusebus.replay import aligned_start_ns, chunk_schedule, send_schedule
from schemas import Decision
from tests.helpers import Collector, eventually, wait_for_role
from tests.test_faults import (
    FUSEBUS,
    Connect,
    Spawn,
    bus_args,
    fusion_agent,
    kill,
    model_agent,
    opened_tasks,
)
from tests.test_reliability import frame_of


def one_decision_per_window(decisions: list[Decision], windows: set[tuple[str, int]]) -> None:
    """Every window has exactly one decision, and no other window has any."""
    per_window = Counter((d.stream, d.window.t_start_ns) for d in decisions)
    missing = windows - set(per_window)
    extra = set(per_window) - windows
    repeated = [w for w, n in per_window.items() if n > 1]
    assert not missing and not extra and not repeated, (
        f"{len(missing)} windows without a decision, {len(extra)} unexpected, "
        f"{len(repeated)} decided twice (e.g. {sorted(missing)[:3]} {repeated[:3]})"
    )


async def test_coordinator_killed_at_random_moments_loses_no_window(
    nats_server: EmbeddedServer,
    subjects: Subjects,
    connect_bus: Connect,
    spawn: Spawn,
    basicmotions: SensorDataset,
) -> None:
    """Eight sensor streams of per-sensor chunks play while the coordinator is SIGKILLed three
    times at random moments and started again at once: every window gets one decision."""
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    nc = await connect_bus("test")
    command = (*FUSEBUS, "coordinator", "--deadline-ms", "2000", *bus_args(nats_server, subjects))
    agents = [await model_agent(connect_bus, subjects, t) for t in ("accel", "gyro")]
    fusion = await fusion_agent(connect_bus, subjects)
    decisions = await Collector(Decision).start_stream(nc, subjects.all_decisions())
    coordinator = spawn(*command)
    await wait_for_role(nc, subjects.prefix, "coordinator")
    streams = [f"s{i}" for i in range(8)]
    schedule, truth = chunk_schedule(
        basicmotions,
        streams=streams,
        speed=40,
        chunk_ms=1000,
        start_ns=aligned_start_ns(basicmotions),
        limit=12,
    )
    windows = {(s, w.t_start_ns) for s, replayed in truth.items() for w in replayed}
    sending = asyncio.ensure_future(send_schedule(Producer(nc, subjects), schedule))
    try:
        for _ in range(3):
            await asyncio.sleep(rng.uniform(0.3, 0.9))  # a random moment: what is under test
            kill(coordinator)
            coordinator = spawn(*command)
        await sending
        await nc.flush()
        await decisions.wait_for(len(windows), timeout_s=60)
        await decisions.settle(1.5)
    finally:
        sending.cancel()
        for agent in agents:
            await agent.stop()
        await fusion.stop()
    one_decision_per_window(decisions.items, windows)
    assert sum(d.status == "complete" for d in decisions.items) >= len(windows) // 2


async def test_coordinator_killed_just_after_a_burst_with_every_agent_down(
    nats_server: EmbeddedServer,
    subjects: Subjects,
    connect_bus: Connect,
    spawn: Spawn,
    basicmotions: SensorDataset,
) -> None:
    """A burst of frames, the coordinator SIGKILLed a few ms later, no agent running: the
    tasks it had opened were not journalled yet, so it opens them again when it restarts and
    ends each at its deadline; every window gets one (failed) decision."""
    nc: Client = await connect_bus("test")
    command = (*FUSEBUS, "coordinator", "--deadline-ms", "800", *bus_args(nats_server, subjects))
    fusion = await fusion_agent(connect_bus, subjects)
    decisions = await Collector(Decision).start_stream(nc, subjects.decision("burst"))
    coordinator = spawn(*command)
    await wait_for_role(nc, subjects.prefix, "coordinator")
    producer = Producer(nc, subjects)
    tasks = await opened_tasks(nc, subjects)
    try:
        for i in range(30):
            await producer.frame(frame_of(basicmotions, "burst", i))
        await nc.flush()
        # Killed as soon as it opens tasks, well within its 50 ms journal interval.
        await eventually(lambda: bool(tasks), what="a task of the burst opened", every_s=0.002)
        kill(coordinator)
        spawn(*command)
        await decisions.wait_for(30, timeout_s=30)
        await decisions.settle(1.5)
    finally:
        await fusion.stop()
    one_decision_per_window(decisions.items, {("burst", (i + 1) * 10**10) for i in range(30)})
    assert {d.status for d in decisions.items} == {"failed"}
