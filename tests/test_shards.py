"""Sharded coordinators and fusion agents: partitions decided by the server, leased in KV.

The pure rule (who should own what) is tested by calling it; everything that crosses the bus
runs against the real server, with short lease TTLs so takeovers happen within a test.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from agents import AgentRuntime, ModelAgent
from agents.fusion import FusionAgent, FusionSettings
from bus import (
    EmbeddedCluster,
    EmbeddedServer,
    LeaseView,
    Subjects,
    TopologySettings,
    ensure_streams,
    fair_share,
    lease_bucket,
    plan_moves,
    read_leases,
)
from bus.shares import settled
from coordinator import Coordinator, CoordinatorSettings, PlanBook, basicmotions_plan
from fusebus.datasets import SensorDataset
from fusebus.paths import models_dir
from fusebus.status import BusStatus, partition_lines, render_summary
from schemas import CODEC, ConfigError, Decision, Subtask
from tests.helpers import Collector, FrameFeeder, eventually, wait_for_agents

FUSEBUS = (sys.executable, "-m", "fusebus")
Connect = Callable[[str], Awaitable[Client]]
Spawn = Callable[..., subprocess.Popen[bytes]]

P = 4
TTL_S = 1.5
STREAMS = tuple(f"s{i}" for i in range(8))  # spread over the four partitions
TOPOLOGY = TopologySettings(partitions=P)


# Pure: who should own what ---------------------------------------------------------------
def test_fair_shares_add_up_to_every_partition_and_differ_by_at_most_one() -> None:
    """Shares of P partitions among n members sum to P, each floor or ceil of P/n."""
    for partitions in (1, 2, 4, 7, 16):
        for n in range(1, 6):
            members = [f"m{i}" for i in range(n)]
            shares = [fair_share(partitions, members, m) for m in members]
            assert sum(shares) == partitions
            assert max(shares) - min(shares) <= 1


def test_a_lone_member_takes_every_free_partition() -> None:
    """With nobody else, a member acquires all partitions, lowest first."""
    moves = plan_moves(partitions=4, members=["a"], owners={}, me="a")
    assert moves.acquire == (0, 1, 2, 3) and moves.release == ()


def test_a_new_member_makes_the_holder_release_its_highest_partitions() -> None:
    """When b joins, a (holding all four) gives back two, and b takes them once free."""
    owners = dict.fromkeys(range(4), "a")
    assert plan_moves(partitions=4, members=["a", "b"], owners=owners, me="a").release == (2, 3)
    assert plan_moves(partitions=4, members=["a", "b"], owners=owners, me="b").acquire == ()
    after = {0: "a", 1: "a"}
    assert plan_moves(partitions=4, members=["a", "b"], owners=after, me="b").acquire == (2, 3)
    assert settled(partitions=4, members=["a", "b"], owners={**after, 2: "b", 3: "b"})


def test_partitions_of_a_dead_member_wait_for_its_lease_then_go_to_the_survivor() -> None:
    """A dead member's leases are not free until they run out; then the survivor takes all."""
    owners = {0: "a", 1: "a", 2: "b", 3: "b"}
    assert not plan_moves(partitions=4, members=["a"], owners=owners, me="a")
    expired = {0: "a", 1: "a"}
    assert plan_moves(partitions=4, members=["a"], owners=expired, me="a").acquire == (2, 3)


def test_a_third_member_gets_a_share_from_the_member_with_two_too_many() -> None:
    """Four partitions among three: shares 2, 1, 1 by member id, and only excess moves."""
    owners = {0: "a", 1: "a", 2: "b", 3: "b"}
    members = ["a", "b", "c"]
    assert [fair_share(4, members, m) for m in members] == [2, 1, 1]
    assert not plan_moves(partitions=4, members=members, owners=owners, me="a")
    assert plan_moves(partitions=4, members=members, owners=owners, me="b").release == (3,)
    freed = {0: "a", 1: "a", 2: "b"}
    assert plan_moves(partitions=4, members=members, owners=freed, me="c").acquire == (3,)


def test_subjects_map_stored_partitioned_subjects_back_to_what_producers_publish() -> None:
    """A stored subject loses its partition token; a published one is left alone."""
    s = Subjects("fb")
    assert s.as_published("fb.sensor.3.bm.accel") == "fb.sensor.bm.accel"
    assert s.as_published("fb.frame.0.bm") == "fb.frame.bm"
    assert s.as_published("fb.result.2.bm") == "fb.result.bm"
    assert s.as_published("fb.sensor.7.accel") == "fb.sensor.7.accel"  # stream "7", unsplit
    assert s.partition_of("fb.status.1.x") == 1 and s.partition_of("fb.status.x") is None


def test_status_shows_a_line_per_owner_with_its_partitions() -> None:
    """``fusebus status`` says which coordinator and which fusion agent owns what."""
    status = BusStatus(
        agents={},
        components=[
            ("coordinator", {"member": "c0-ab", "partitions": [0, 2], "partitions_total": 4}),
            ("coordinator", {"member": "c1-cd", "partitions": [1, 3], "partitions_total": 4}),
            ("fusion", {"name": "fusion", "member": "fusion-ef", "partitions": [0, 1, 2, 3],
                        "partitions_total": 4}),
            ("coordinator", {"open_tasks": 3}),  # a coordinator of an unpartitioned deployment
        ],
    )  # fmt: skip
    assert partition_lines(status) == [
        "coordinator c0-ab: partitions 0, 2 (of 4)",
        "coordinator c1-cd: partitions 1, 3 (of 4)",
        "fusion fusion-ef: partitions 0, 1, 2, 3 (of 4)",
    ]
    assert "coordinator c1-cd: partitions 1, 3 (of 4)" in render_summary(status, None, 1.0)


# Across the server -----------------------------------------------------------------------
async def test_changing_the_partition_count_of_existing_streams_is_refused(
    connect_bus: Connect, subjects: Subjects
) -> None:
    """Streams made for four partitions refuse a component started with two, or none, in one
    line (the server itself would take the new transform and strand the stored data)."""
    js = (await connect_bus("test")).jetstream()
    await ensure_streams(js, subjects, TOPOLOGY, intake=True)
    await ensure_streams(js, subjects, TOPOLOGY, intake=True)  # the same count is fine
    for count in (2, 1):
        with pytest.raises(ConfigError, match="cannot change") as caught:
            await ensure_streams(js, subjects, TopologySettings(partitions=count), intake=True)
        assert "\n" not in str(caught.value)


async def lease_view(nc: Client, subjects: Subjects, group: str) -> LeaseView:
    """The lease group's members and owners as the bucket holds them now."""
    return await read_leases(await lease_bucket(nc, subjects, ttl_s=TTL_S), group)


async def settled_among(
    nc: Client, subjects: Subjects, group: str, members: int, *, timeout_s: float = 20.0
) -> LeaseView:
    """Wait until ``members`` members hold fair shares of every partition of ``group``."""
    view = LeaseView((), {})

    async def done() -> bool:
        nonlocal view
        view = await lease_view(nc, subjects, group)
        return len(view.members) == members and settled(
            partitions=P, members=view.members, owners=view.owners
        )

    await eventually(
        done, what=f"{members} members sharing {group}", timeout_s=timeout_s, state=lambda: view
    )
    return view


def coordinator(nc: Client, subjects: Subjects, name: str, **plan: float) -> Coordinator:
    return Coordinator(
        nc,
        plans=PlanBook(default=basicmotions_plan(**plan)),  # type: ignore[arg-type]
        subjects=subjects,
        topology=TOPOLOGY,
        settings=CoordinatorSettings(name=name, lease_ttl_s=TTL_S),
    )


async def opened_tasks(nc: Client, subjects: Subjects) -> set[str]:
    """The id of every task any coordinator opens, from the subtasks published."""
    ids: set[str] = set()

    async def on_msg(msg: Msg) -> None:
        ids.update(s.task_id for s in CODEC.decode_each(msg.data, Subtask))

    await nc.subscribe(subjects.all_tasks(), cb=on_msg)
    return ids


def feeders(
    nc: Client, subjects: Subjects, data: SensorDataset, *, start: int = 0
) -> list[FrameFeeder]:
    """One frame feeder per test stream."""
    started = []
    for stream in STREAMS:
        feeder = FrameFeeder(nc, subjects, data, every_s=0.05, stream=stream)
        feeder.sent = start
        started.append(feeder.start())
    return started


async def stop_all(running: list[FrameFeeder]) -> int:
    """Stop every feeder; returns how many frames were sent in all."""
    return sum([await f.stop() for f in running])


def one_each(decisions: list[Decision], tasks: set[str]) -> None:
    per_task = Counter(d.task_id for d in decisions)
    assert set(per_task) == tasks, (
        f"missing {len(tasks - set(per_task))}, extra {len(set(per_task) - tasks)}"
    )
    assert max(per_task.values()) == 1, [t for t, n in per_task.items() if n > 1][:5]


async def stop_components(*components: Coordinator | FusionAgent | AgentRuntime) -> None:
    for component in components:
        await component.stop()


async def agents(
    connect_bus: Connect, subjects: Subjects, *types: str, topology: TopologySettings = TOPOLOGY
) -> list[AgentRuntime]:
    return [
        await AgentRuntime(
            ModelAgent(models_dir() / f"{t}.tflite"),
            await connect_bus(t),
            subjects=subjects,
            topology=topology,
        ).start()
        for t in types
    ]


async def test_two_coordinators_and_two_fusion_agents_decide_every_window_once(
    connect_bus: Connect, subjects: Subjects, basicmotions: SensorDataset
) -> None:
    """Two coordinators and two fusion agents of one name share four partitions: each takes
    two, both open tasks, and every window of eight streams gets exactly one decision."""
    nc = await connect_bus("test")
    running = await agents(connect_bus, subjects, "accel", "gyro")
    fusions = [
        await FusionAgent(
            await connect_bus(f"fusion-{i}"),
            subjects=subjects,
            topology=TOPOLOGY,
            settings=FusionSettings(lease_ttl_s=TTL_S),
        ).start()
        for i in range(2)
    ]
    coordinators = [
        await coordinator(await connect_bus(f"c{i}"), subjects, f"c{i}", deadline_ms=1000).start()
        for i in range(2)
    ]
    await settled_among(nc, subjects, "coordinator", 2)
    await settled_among(nc, subjects, "fusion-fusion", 2)
    decisions = await Collector(Decision).start_stream(nc, f"{subjects.prefix}.decision.*")
    tasks = await opened_tasks(nc, subjects)
    feeding = feeders(nc, subjects, basicmotions)
    try:
        await decisions.wait_for(80)
        sent = await stop_all(feeding)
        await eventually(lambda: len(tasks) == sent, what=f"a task for each of {sent} frames")
        await decisions.wait_for(sent, timeout_s=30)
        await decisions.settle(1.0)
    finally:
        await stop_all(feeding)
        await stop_components(*coordinators, *fusions, *running)
    one_each(decisions.items, tasks)
    assert all(c.tracker.counts["opened"] > 0 for c in coordinators)
    assert all(sum(f.counts[f"decisions_{s}"] for s in ("complete", "partial")) for f in fusions)
    assert sum(d.status == "complete" for d in decisions.items) > sent / 2


async def test_a_third_coordinator_joining_gets_a_share(
    connect_bus: Connect, subjects: Subjects
) -> None:
    """One coordinator holds all four partitions; a second gets two; a third gets one, and
    when it stops its partition goes back to the others at once."""
    nc = await connect_bus("test")
    first = await coordinator(await connect_bus("c0"), subjects, "c0").start()
    started = [first]
    try:
        view = await settled_among(nc, subjects, "coordinator", 1)
        assert set(view.owners.values()) == {first.member_id}
        for i in (1, 2):
            started.append(await coordinator(await connect_bus(f"c{i}"), subjects, f"c{i}").start())
            await settled_among(nc, subjects, "coordinator", i + 1)
        await eventually(
            lambda: sorted(len(c.owned_partitions) for c in started) == [1, 1, 2],
            what="shares of 2, 1 and 1 at work",
            state=lambda: [c.owned_partitions for c in started],
        )
        third = started.pop()
        await third.stop()
        await settled_among(nc, subjects, "coordinator", 2, timeout_s=TTL_S * 3)
    finally:
        for c in started:
            await c.stop()


async def test_killed_coordinator_partitions_are_taken_over_and_every_window_decided_once(
    nats_server: EmbeddedServer,
    connect_bus: Connect,
    subjects: Subjects,
    spawn: Spawn,
    basicmotions: SensorDataset,
) -> None:
    """SIGKILL one of two coordinator processes mid-run: after its leases run out the other
    takes its partitions, restores their open tasks from the partitions' journals and is
    given their unacked data again; every window ends with exactly one decision in the
    decisions stream, and none is lost.

    Only accel agents run, so every task waits for its deadline status: tasks open at the
    kill can end only through the survivor's takeover of the journal.
    """
    await killed_coordinator_taken_over(
        nats_server.url, connect_bus, subjects, spawn, basicmotions, replicas=1
    )


async def test_on_a_cluster_a_killed_coordinator_is_taken_over_with_r3_streams(
    healthy_cluster: EmbeddedCluster,
    cluster_bus: Connect,
    subjects: Subjects,
    spawn: Spawn,
    basicmotions: SensorDataset,
) -> None:
    """The same takeover on a 3-node cluster with every stream, journal and bucket R3."""
    await killed_coordinator_taken_over(
        healthy_cluster.url, cluster_bus, subjects, spawn, basicmotions, replicas=3
    )


async def killed_coordinator_taken_over(
    url: str,
    connect_bus: Connect,
    subjects: Subjects,
    spawn: Spawn,
    basicmotions: SensorDataset,
    *,
    replicas: int,
) -> None:
    """Two coordinator processes, one SIGKILLed mid-run; see the tests above."""
    topology = TopologySettings(partitions=P, replicas=replicas)
    replicas_flag = str(replicas)
    nc = await connect_bus("test")
    bus = ("--nats-url", url, "--prefix", subjects.prefix, "--log-level", "warning")
    shard = ("--partitions", str(P), "--lease-ttl-s", str(TTL_S), "--deadline-ms", "1500",
             "--replicas", replicas_flag)  # fmt: skip
    running = await agents(connect_bus, subjects, "accel", topology=topology)
    fusion = await FusionAgent(
        await connect_bus("fusion"),
        subjects=subjects,
        topology=topology,
        settings=FusionSettings(lease_ttl_s=TTL_S),  # the first to make the bucket sets its TTL
    ).start()
    decisions = await Collector(Decision).start_stream(nc, f"{subjects.prefix}.decision.*")
    tasks = await opened_tasks(nc, subjects)
    victim = spawn(*FUSEBUS, "coordinator", "--name", "victim", *shard, *bus)
    await settled_among(nc, subjects, "coordinator", 1)
    spawn(*FUSEBUS, "coordinator", "--name", "survivor", *shard, *bus)
    view = await settled_among(nc, subjects, "coordinator", 2)
    await wait_for_agents(nc, subjects.prefix, {"accel": 1})
    feeding = feeders(nc, subjects, basicmotions)
    try:
        await decisions.wait_for(20)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        killed_at = time.monotonic()
        survivor = next(m for m in view.members if m.startswith("survivor"))
        after = await settled_among(nc, subjects, "coordinator", 1, timeout_s=TTL_S * 6)
        took_over_s = time.monotonic() - killed_at
        assert set(after.owners.values()) == {survivor}
        print(f"takeover after SIGKILL: {took_over_s:.2f} s (lease TTL {TTL_S} s)")
        await decisions.wait_for(len(tasks) + 20, timeout_s=20)  # the survivor serves all
        sent = await stop_all(feeding)
        await eventually(lambda: len(tasks) == sent, what=f"a task for each of {sent} frames")
        await decisions.wait_for(sent, timeout_s=30)
        await decisions.settle(1.0)
    finally:
        await stop_all(feeding)
        await fusion.stop()
        for agent in running:
            await agent.stop()
    one_each(decisions.items, tasks)
    assert {d.status for d in decisions.items} == {"partial"}
    assert took_over_s < TTL_S * 3


async def test_killed_fusion_agent_partitions_are_taken_over_by_its_peer(
    nats_server: EmbeddedServer,
    connect_bus: Connect,
    subjects: Subjects,
    spawn: Spawn,
    basicmotions: SensorDataset,
) -> None:
    """SIGKILL one of two fusion processes of one name: the other takes its partitions and
    every window still gets exactly one decision (``decision:<name>:<task_id>``)."""
    nc = await connect_bus("test")
    bus = ("--nats-url", nats_server.url, "--prefix", subjects.prefix, "--log-level", "warning")
    shard = ("--partitions", str(P), "--lease-ttl-s", str(TTL_S))
    running = await agents(connect_bus, subjects, "accel", "gyro")
    coordinators = [
        await coordinator(await connect_bus("c0"), subjects, "c0", deadline_ms=1000).start()
    ]
    decisions = await Collector(Decision).start_stream(nc, f"{subjects.prefix}.decision.*")
    tasks = await opened_tasks(nc, subjects)
    victim = spawn(*FUSEBUS, "fusion", *shard, *bus)
    await settled_among(nc, subjects, "fusion-fusion", 1)
    spawn(*FUSEBUS, "fusion", *shard, *bus)
    await settled_among(nc, subjects, "fusion-fusion", 2)
    feeding = feeders(nc, subjects, basicmotions)
    try:
        await decisions.wait_for(40)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        await settled_among(nc, subjects, "fusion-fusion", 1, timeout_s=TTL_S * 6)
        await decisions.wait_for(len(tasks) + 20, timeout_s=20)
        sent = await stop_all(feeding)
        await eventually(lambda: len(tasks) == sent, what=f"a task for each of {sent} frames")
        await decisions.wait_for(sent, timeout_s=30)
        await decisions.settle(1.0)
    finally:
        await stop_all(feeding)
        await stop_components(*coordinators, *running)
    one_each(decisions.items, tasks)


async def test_a_lease_that_ran_out_unnoticed_is_taken_again_without_restarting_the_work(
    connect_bus: Connect, subjects: Subjects
) -> None:
    """A member whose lease expired before its renewal (a stalled process) and that nobody
    else took finds the partition free in its next round: it takes the lease again and the
    work on the partition goes on, instead of being started a second time beside itself."""
    from bus import LeaseKeeper, LeaseSettings

    started: list[int] = []
    stopped: list[int] = []

    async def on_acquire(partition: int) -> None:
        started.append(partition)

    async def on_release(partition: int) -> None:
        stopped.append(partition)

    nc = await connect_bus("keeper")
    keeper = LeaseKeeper(
        nc,
        subjects=subjects,
        group="test",
        member="m0",
        partitions=2,
        on_acquire=on_acquire,
        on_release=on_release,
        settings=LeaseSettings(ttl_s=30.0),
    )
    await keeper.start()
    try:
        assert sorted(started) == [0, 1]
        kv = await lease_bucket(nc, subjects, ttl_s=30.0)
        await kv.delete(subjects.lease_key("test", 1))  # as if it had run out
        view = await keeper.rebalance()
        assert 1 not in view.owners  # the round saw it free...
        assert sorted(started) == [0, 1] and stopped == []  # ...and did not restart it
        again = await read_leases(kv, "test")
        assert again.owners == {0: "m0", 1: "m0"}
        await keeper.renew()  # the new revision renews
        assert sorted(keeper.owned) == [0, 1] and keeper.counts["lost"] == 0
    finally:
        await keeper.stop()
    assert sorted(stopped) == [0, 1]
