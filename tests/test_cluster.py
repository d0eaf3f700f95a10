"""fusebus on a real 3-node NATS cluster: replicated streams, leaders killed mid-run, a
component whose node dies, pre-created streams left as they are, and `fusebus topology`."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from bus import (
    EmbeddedCluster,
    Producer,
    Subjects,
    TopologySettings,
    ensure_streams,
    inspect_topology,
    read_stored,
    reconcile,
)
from bus.topology import changes
from fusebus.datasets import SensorDataset
from schemas import CODEC, BusError, Decision, SensorFrame
from tests.helpers import (
    Collector,
    Pipeline,
    eventually,
    start_pipeline,
    wait_for_agents,
)

ROOT = Path(__file__).resolve().parent.parent
R3 = TopologySettings(replicas=3)
Connect = Callable[[str], Awaitable[Client]]


@pytest.fixture
def healthy(healthy_cluster: EmbeddedCluster) -> EmbeddedCluster:
    """The session's 3-node cluster, every node running."""
    return healthy_cluster


@pytest.fixture
async def cluster_pipeline(
    cluster_bus: Connect, subjects: Subjects
) -> AsyncIterator[Callable[..., Awaitable[Pipeline]]]:
    """An in-process pipeline whose components connect to all three nodes, on R3 streams."""
    started: list[Pipeline] = []

    async def start(**options: object) -> Pipeline:
        options.setdefault("topology", R3)
        return await start_pipeline(cluster_bus, subjects, started=started, **options)  # type: ignore[arg-type]

    yield start
    for parts in started:
        await asyncio.gather(*(c.stop() for c in parts.components()), return_exceptions=True)


def frame(dataset: SensorDataset, i: int) -> SensorFrame:
    case = dataset.x_test[i % len(dataset.x_test)]
    return SensorFrame(
        stream="bm",
        t_ns=(i + 1) * 10**10,
        period_ns=dataset.period_ns,
        sensors={name: dataset.sensor_view(case, name) for name in dataset.sensors},
    )


async def send_until_accepted(producer: Producer, frame: SensorFrame) -> int:
    """Send a frame as a request until the coordinator answers (a producer's part in a
    failover: a frame or its answer in flight when a node dies may be lost, so it is sent
    again, and the coordinator answers a repeat of a window it has taken as a duplicate,
    without opening it twice); returns the attempts."""
    for attempt in range(1, 60):
        try:
            answer = await producer.frame(frame, wait_s=1.0)
        except (TimeoutError, Exception):
            continue
        repeat = answer is not None and answer.startswith(b"rejected: duplicate_window:")
        assert answer == b"accepted" or (attempt > 1 and repeat), answer
        return attempt
    raise AssertionError(f"frame {frame.t_ns} was never accepted")


async def stored_decisions(nc: Client, subjects: Subjects) -> list[Decision]:
    stored = await read_stored(nc.jetstream(), subjects.decisions_stream)
    prefix = f"{subjects.prefix}.decision."
    return [CODEC.decode(m.data, Decision) for m in stored if m.subject.startswith(prefix)]


async def all_led(nc: Client, subjects: Subjects, *, timeout_s: float = 60.0) -> None:
    """Wait until every stream of the deployment and each of its durable consumers has a
    leader (after a node loss, the elections are over)."""
    views: list[object] = []

    async def led() -> bool:
        nonlocal views
        try:
            found = [v for v in await inspect_topology(nc.jetstream(), subjects) if v.exists]
        except Exception as exc:  # the JetStream API may not answer during an election
            views = [exc]
            return False
        views = list(found)
        return all(v.leader and all(c.leader for c in v.consumers if c.durable) for v in found)

    await eventually(led, what="a leader for every stream and consumer", timeout_s=timeout_s,
                     state=lambda: views)  # fmt: skip


def test_an_update_that_changes_nothing_is_not_sent() -> None:
    """A stream as the server reports it (defaults filled in) needs no update for the
    config fusebus asked for; another max age, subject or replica count does."""
    wanted = R3.stream_config(name="FB_DLQ", subjects=["fb.dlq.*"], max_age=60.0)
    stored = dataclasses.replace(
        wanted, duplicate_window=120.0, max_msgs=-1, allow_direct=True, sealed=False
    )
    if wanted.duplicate_window is None:
        wanted = dataclasses.replace(wanted, duplicate_window=0)  # the server's default
    assert not changes(stored, wanted)
    assert changes(stored, dataclasses.replace(wanted, max_age=30.0))
    assert changes(stored, dataclasses.replace(wanted, subjects=["fb.dlq.>"]))
    assert changes(stored, dataclasses.replace(wanted, num_replicas=5))


async def test_components_starting_together_on_a_fresh_cluster_all_start(
    cluster_bus: Connect, subjects: Subjects
) -> None:
    """Four components making the same R3 streams at the same moment (on connections to
    any of the nodes) all succeed, and every stream has a leader when they return: an
    update racing another's create, or a request to a stream still electing its leader,
    used to go unanswered (about every other run with two components)."""
    clients = [await cluster_bus(f"starter-{i}") for i in range(4)]
    shards = TopologySettings(replicas=3, partitions=4)
    await asyncio.gather(
        *(ensure_streams(nc.jetstream(), subjects, shards, intake=True) for nc in clients)
    )
    js = clients[0].jetstream()
    for name in (subjects.tasks_stream, subjects.results_stream, subjects.intake_stream):
        info = await js.stream_info(name)
        assert info.cluster is not None and info.cluster.leader, name


def test_reconcile_keeps_replicas_and_refuses_what_cannot_change() -> None:
    """A stream with more replicas than asked keeps them; fewer are raised; storage asked
    for explicitly must match; retention must match; placement not asked for is kept."""
    existing = StreamConfig(
        name="FB_TASKS", retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
        num_replicas=3,
    )  # fmt: skip
    wanted = TopologySettings().stream_config(name="FB_TASKS", retention=RetentionPolicy.WORK_QUEUE)
    assert reconcile(existing, wanted, TopologySettings()).num_replicas == 3
    up = TopologySettings(replicas=5).stream_config(
        name="FB_TASKS", retention=RetentionPolicy.WORK_QUEUE
    )
    assert reconcile(existing, up, TopologySettings(replicas=5)).num_replicas == 5
    memory = TopologySettings(storage="memory")
    with pytest.raises(BusError, match="FB_TASKS is stored in file, the settings ask for memory"):
        reconcile(
            existing,
            memory.stream_config(name="FB_TASKS", retention=RetentionPolicy.WORK_QUEUE),
            memory,
        )
    kept = reconcile(
        existing,
        TopologySettings().stream_config(name="FB_TASKS", retention=RetentionPolicy.WORK_QUEUE),
        TopologySettings(),
    )
    assert kept.storage == StorageType.FILE
    with pytest.raises(BusError, match="retention limits, fusebus needs workqueue"):
        reconcile(
            StreamConfig(name="FB_TASKS", retention=RetentionPolicy.LIMITS),
            wanted,
            TopologySettings(),
        )
    unset = StreamConfig(name="FB_OPEN_TASKS")  # retention left to the server: limits
    limits = TopologySettings().stream_config(
        name="FB_OPEN_TASKS", retention=RetentionPolicy.LIMITS
    )
    assert reconcile(unset, limits, TopologySettings()).retention == RetentionPolicy.LIMITS
    with pytest.raises(Exception, match="replicas must be 1 to 5"):
        TopologySettings(replicas=7)


async def test_the_pipeline_on_r3_streams_decides_every_window(
    cluster_pipeline: Callable[..., Awaitable[Pipeline]],
    basicmotions: SensorDataset,
    subjects: Subjects,
    healthy: EmbeddedCluster,
) -> None:
    """With replicas 3 every stream, the journal, the key bucket and every consumer are R3
    with two current followers, each window is decided once, and `fusebus topology --check`
    agrees (and finds a mismatch when asked for 5)."""
    parts = await cluster_pipeline()
    decided = await Collector(Decision).start_stream(parts.nc, subjects.decision("bm"))
    producer = Producer(parts.nc, subjects)
    for i in range(12):
        await send_until_accepted(producer, frame(basicmotions, i))
    await decided.wait_for(12)
    assert {d.status for d in decided.items} == {"complete"}
    views = {v.name: v for v in await inspect_topology(parts.nc.jetstream(), subjects)}
    for name in (subjects.tasks_stream, subjects.results_stream, subjects.decisions_stream,
                 subjects.dlq_stream, subjects.intake_stream, subjects.journal_stream,
                 f"KV_{subjects.keys_bucket}"):  # fmt: skip
        view = views[name]
        assert view.exists and view.replicas == 3 and len(view.followers) == 2, view
        assert all(c.replicas == 3 for c in view.consumers if c.durable), view.consumers
    assert {c.name for c in views[subjects.tasks_stream].consumers} == {"agent-accel", "agent-gyro"}
    assert all(c.leader and len(c.followers) == 2 for c in views[subjects.tasks_stream].consumers)

    def topology(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fusebus", "topology", "--nats-url", healthy.url,
             "--prefix", subjects.prefix, *args],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip

    ok = await asyncio.to_thread(topology, "--check", "--replicas", "3")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"{subjects.tasks_stream:<22} file     3 " in ok.stdout
    assert "ok: every stream and consumer matches" in ok.stdout
    short = await asyncio.to_thread(topology, "--check", "--replicas", "5")
    assert short.returncode == 1
    assert (
        f"mismatch: stream {subjects.tasks_stream} has 3 replica(s), the settings ask for 5"
        in short.stdout
    )


@pytest.mark.parametrize("victim", ["tasks stream leader", "meta leader"])
async def test_a_leader_killed_mid_run_leaves_every_window_one_decision(
    cluster_pipeline: Callable[..., Awaitable[Pipeline]],
    basicmotions: SensorDataset,
    subjects: Subjects,
    healthy: EmbeddedCluster,
    victim: str,
) -> None:
    """Frames keep coming while the node leading the tasks stream (or the JetStream meta
    leader) is SIGKILLed: every window still ends with exactly one decision, the windows
    after the election are complete again, and the pause is measured."""
    parts = await cluster_pipeline()
    await wait_for_agents(parts.nc, subjects.prefix, {"accel": 1, "gyro": 1})
    decided = await Collector(Decision).start_stream(parts.nc, subjects.decision("bm"))
    producer = Producer(parts.nc, subjects)
    for i in range(10):
        await send_until_accepted(producer, frame(basicmotions, i))
    await decided.wait_for(10)
    server: str | None
    if victim == "meta leader":
        server = healthy.wait_for_meta_leader()
    else:
        tasks = await parts.nc.jetstream().stream_info(subjects.tasks_stream)
        server = tasks.cluster.leader if tasks.cluster else None
    assert server is not None
    killed_at = time.monotonic()
    killed_ns = time.time_ns()
    healthy.node(server).kill()
    arrivals: list[float] = []
    retries = 0
    for i in range(10, 40):
        began = time.monotonic()
        retries += await send_until_accepted(producer, frame(basicmotions, i)) - 1
        arrivals.append(time.monotonic() - began)
    await decided.wait_for(40, timeout_s=90)
    pause = time.monotonic() - killed_at
    await all_led(parts.nc, subjects)
    for i in range(40, 45):  # once every stream and consumer has a leader again
        await send_until_accepted(producer, frame(basicmotions, i))
    await decided.wait_for(45, timeout_s=60)
    decisions = await stored_decisions(parts.nc, subjects)
    per_task = Counter(d.task_id for d in decisions)
    assert len(per_task) == 45 and set(per_task.values()) == {1}, per_task.most_common(3)
    by_window = sorted(decisions, key=lambda d: d.window.t_start_ns)
    statuses = Counter(d.status for d in by_window)
    assert all(d.status == "complete" for d in by_window[:10])
    assert all(d.status == "complete" for d in by_window[-5:]), [d.status for d in by_window]
    # When fusion decided (its own clock), against when this test's reader saw it: the
    # reader's ordered consumer may have lived on the killed node and be recreated late.
    decided_s = (max(d.decided_ns for d in by_window[10:40]) - killed_ns) / 1e9
    print(
        f"{victim} {server} killed: statuses {dict(statuses)}, frames resent {retries}, "
        f"slowest frame accepted after {max(arrivals):.2f} s, the 30 sent after the kill "
        f"decided {decided_s:.1f} s after it (seen by the test after {pause:.1f} s)"
    )


async def test_a_component_whose_node_dies_goes_on_on_another(
    cluster_bus: Connect,
    basicmotions: SensorDataset,
    subjects: Subjects,
    healthy: EmbeddedCluster,
    cluster_pipeline: Callable[..., Awaitable[Pipeline]],
) -> None:
    """The node an agent is connected to is killed: once the streams that had leaders there
    have new ones, the agent, reconnected to another node, serves every next window."""
    parts = await cluster_pipeline()
    decided = await Collector(Decision).start_stream(parts.nc, subjects.decision("bm"))
    producer = Producer(parts.nc, subjects)
    for i in range(4):
        await send_until_accepted(producer, frame(basicmotions, i))
    await decided.wait_for(4)
    agent = parts.agents[0]
    url = agent.nc.connected_url
    assert url is not None
    node = next(n for n in healthy.nodes if n.port == url.port)
    began = time.monotonic()
    node.kill()
    await all_led(parts.nc, subjects)
    elected = time.monotonic() - began
    before = agent.counts["processed"]
    for i in range(4, 12):
        await send_until_accepted(producer, frame(basicmotions, i))
    await decided.wait_for(12, timeout_s=60)
    moved = agent.nc.connected_url
    assert moved is not None and moved.port != url.port
    assert agent.counts["processed"] - before == 8
    later = sorted(decided.items, key=lambda d: d.window.t_start_ns)[-8:]
    assert {d.status for d in later} == {"complete"}
    print(
        f"agent moved from :{url.port} to :{moved.port}; leaders again {elected:.2f} s after "
        f"the kill, 8 more windows decided {time.monotonic() - began:.2f} s after it"
    )


async def test_a_pre_created_r3_stream_stays_r3_and_storage_is_never_switched(
    cluster_bus: Connect, subjects: Subjects
) -> None:
    """An operator's R3 tasks stream is left R3 by a component with the default settings;
    a results stream in memory is kept in memory, unless file is asked for explicitly,
    which is refused with one line naming the stream."""
    nc = await cluster_bus("operator")
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(name=subjects.tasks_stream, subjects=[subjects.all_tasks()],
                     retention=RetentionPolicy.WORK_QUEUE, num_replicas=3)
    )  # fmt: skip
    await js.add_stream(
        StreamConfig(name=subjects.results_stream, subjects=[subjects.all_results(), subjects.all_statuses()],
                     storage=StorageType.MEMORY, num_replicas=3)
    )  # fmt: skip
    await ensure_streams(js, subjects, TopologySettings())
    tasks = await js.stream_info(subjects.tasks_stream)
    results = await js.stream_info(subjects.results_stream)
    assert tasks.config.num_replicas == 3 and results.config.num_replicas == 3
    assert results.config.storage == StorageType.MEMORY
    assert tasks.config.max_age == TopologySettings().task_max_age_s  # the rest is fusebus's
    with pytest.raises(BusError, match=f"stream {subjects.results_stream} is stored in memory"):
        await ensure_streams(js, subjects, TopologySettings(storage="file"))
