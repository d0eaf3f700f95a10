"""Nothing lost, whatever arrives: poison messages, oversized input, forged results, missing
acks and a closed connection. Each test is a failure that was seen from the outside, and
each crosses a real nats-server."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable

import msgpack
import numpy as np
import pytest
from nats.aio.client import Client

from agents.fusion import FusionAgent, FusionSettings
from bus import (
    BusSettings,
    EmbeddedServer,
    Producer,
    Subjects,
    TopologySettings,
    ensure_streams,
    ticket_key,
)
from fusebus.components import serve
from fusebus.datasets import SensorDataset
from schemas import (
    DeadLetter,
    Decision,
    ModelRef,
    Result,
    SensorChunk,
    SensorFrame,
    Subtask,
    Task,
    Window,
    encode,
)
from schemas.tickets import seal
from tests.helpers import Collector, Pipeline, eventually

Connect = Callable[[str], Awaitable[Client]]
StartPipeline = Callable[..., Awaitable[Pipeline]]


def result_bytes(**fields: object) -> bytes:
    """A ``result`` map with the given fields, packed without the codec's checks (as a
    careless or hostile publisher would)."""
    body: dict[str, object] = {
        "v": 1,
        "kind": "result",
        "task_id": "t1",
        "stream": "bm",
        "type": "accel",
        "agent_id": "hand-made",
        "model": {"name": "m", "version": "1"},
        "output": {"dtype": "float32", "shape": [2], "data": b"\x00" * 8},
        "labels": ["a", "b"],
        "latency_ms": 1.0,
    }
    body.update(fields)
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


def frame_of(dataset: SensorDataset, stream: str, i: int) -> SensorFrame:
    """Test case ``i`` of BasicMotions as the frame of window ``i`` of ``stream``."""
    case = dataset.x_test[i % len(dataset.x_test)]
    return SensorFrame(
        stream=stream,
        t_ns=(i + 1) * 10**10,
        period_ns=dataset.period_ns,
        sensors={name: dataset.sensor_view(case, name) for name in dataset.sensors},
    )


async def decide_frames(
    parts: Pipeline, dataset: SensorDataset, stream: str, count: int
) -> list[Decision]:
    """Send ``count`` frames on ``stream`` and wait for their decisions (from the stream)."""
    decisions = await Collector(Decision).start_stream(parts.nc, parts.subjects.decision(stream))
    producer = Producer(parts.nc, parts.subjects)
    for i in range(count):
        await producer.frame(frame_of(dataset, stream, i))
    await decisions.wait_for(count)
    return await decisions.settle(0.3)


async def test_a_megabyte_task_id_is_a_dead_letter_and_fusion_stays_on_the_bus(
    pipeline: StartPipeline, basicmotions: SensorDataset
) -> None:
    """A result whose task id is almost 1 MB is refused at decode (it would have become a 2 MB
    decision and header, and the server would have closed fusion's connection): it becomes
    a dead letter that fits the payload limit, and later windows are still decided."""
    parts = await pipeline()
    subjects = parts.subjects
    letters = await Collector(DeadLetter).start(parts.nc, subjects.dlq("fusion"))
    huge = result_bytes(task_id="x" * 900_000)
    await parts.nc.jetstream().publish(subjects.result("bm"), huge)
    [letter] = await letters.wait_for(1)
    assert letter.reason == "bad_name" and "longer than 160 bytes" in letter.error
    assert letter.size == len(huge) and letter.sha256 == hashlib.sha256(huge).hexdigest()
    assert len(letter.data) == 4096 and huge.startswith(letter.data)
    assert len(encode(letter)) < 16_384
    decisions = await decide_frames(parts, basicmotions, "after", 5)
    assert [d.status for d in decisions] == ["complete"] * 5
    assert parts.fusion is not None and parts.fusion.nc.is_connected


async def test_a_dead_letter_of_a_huge_bad_input_fits_and_the_batch_behind_it_is_served(
    pipeline: StartPipeline, basicmotions: SensorDataset
) -> None:
    """Garbage close to the payload limit sent to an agent's work queue is kept as a bounded
    dead letter and terminated; the agent serves the subtasks behind it."""
    parts = await pipeline()
    subjects = parts.subjects
    letters = await Collector(DeadLetter).start(parts.nc, subjects.dlq("agent-accel"))
    garbage = b"\xc1" * 1_000_000  # 0xc1 is never valid msgpack
    await parts.nc.jetstream().publish(subjects.task("accel"), garbage)
    [letter] = await letters.wait_for(1)
    assert letter.reason == "not_msgpack" and letter.size == len(garbage)
    assert len(letter.data) == 4096 and len(letter.error) <= 1024
    decisions = await decide_frames(parts, basicmotions, "behind", 3)
    assert [d.status for d in decisions] == ["complete"] * 3
    assert (await parts.nc.jetstream().stream_info(subjects.tasks_stream)).state.messages == 0


async def test_names_that_cannot_be_subject_tokens_are_dead_letters_everywhere(
    pipeline: StartPipeline, basicmotions: SensorDataset
) -> None:
    """A result for stream "bad stream" and chunks whose sensor is "a b" or empty are refused
    where they arrive (fusion and the coordinator), with reason bad_name; the windows after
    them are decided."""
    parts = await pipeline()
    subjects = parts.subjects
    fusion_letters = await Collector(DeadLetter).start(parts.nc, subjects.dlq("fusion"))
    coordinator_letters = await Collector(DeadLetter).start(parts.nc, subjects.dlq("coordinator"))
    await parts.nc.jetstream().publish(subjects.result("bm"), result_bytes(stream="bad stream"))
    samples = {"dtype": "float32", "shape": [1, 3], "data": b"\x00" * 12}
    for sensor in ("a b", ""):
        chunk = {
            "v": 1,
            "kind": "sensor_chunk",
            "stream": "bm",
            "sensor": sensor,
            "t0_ns": 10**18,
            "period_ns": 10**7,
            "samples": samples,
        }
        await parts.nc.publish(subjects.sensor("bm", "accel"), msgpack.packb(chunk))
    [fusion_letter] = await fusion_letters.wait_for(1)
    assert fusion_letter.reason == "bad_name" and "'bad stream'" in fusion_letter.error
    # The coordinator reads results too: it refuses the bad result as well as both chunks.
    refused = await coordinator_letters.wait_for(3)
    assert [letter.reason for letter in refused] == ["bad_name"] * 3
    assert sorted(letter.subject for letter in refused) == sorted(
        [subjects.result("bm"), subjects.sensor("bm", "accel"), subjects.sensor("bm", "accel")]
    )
    decisions = await decide_frames(parts, basicmotions, "next", 4)
    assert [d.status for d in decisions] == ["complete"] * 4


async def test_results_for_tasks_the_coordinator_never_opened_are_not_decided(
    pipeline: StartPipeline, basicmotions: SensorDataset
) -> None:
    """A hand-made result, an error result and a result with a forged ticket name tasks the
    coordinator never opened: each is a dead letter (unknown_task) and no decision is made
    for them, while real windows are decided."""
    parts = await pipeline()
    subjects, js = parts.subjects, parts.nc.jetstream()
    letters = await Collector(DeadLetter).start(parts.nc, subjects.dlq("fusion"))
    forged_decisions = await Collector(Decision).start_stream(parts.nc, subjects.decision("bm"))
    error = {"code": "model_error", "text": "made up"}
    for message in (
        result_bytes(task_id="bm:1"),
        result_bytes(task_id="bm:2", output=None, error=error),
        result_bytes(task_id="bm:3", ticket=b"\x01" * 16, expected=["accel"]),
    ):
        await js.publish(subjects.result("bm"), message)
    refused = await letters.wait_for(3)
    assert {letter.reason for letter in refused} == {"unknown_task"}
    decisions = await decide_frames(parts, basicmotions, "real", 3)
    assert [d.status for d in decisions] == ["complete"] * 3
    assert await forged_decisions.settle(0.5) == []
    assert parts.fusion is not None and parts.fusion.counts["unknown_task"] == 3


async def test_fusion_decides_a_task_the_coordinator_forgot_soon_after_its_deadline(
    connect_bus: Connect, subjects: Subjects
) -> None:
    """Results of a real (sealed) task arrive but no status ever comes (its coordinator died
    and lost it): fusion decides it partial a grace period after the task's own deadline,
    not after a fixed minute."""
    nc = await connect_bus("test")
    await ensure_streams(nc.jetstream(), subjects, TopologySettings())
    key = await ticket_key(nc.jetstream(), subjects, TopologySettings())
    fusion = await FusionAgent(
        await connect_bus("fusion"),
        subjects=subjects,
        settings=FusionSettings(status_grace_s=0.3, pending_ttl_s=600),
    ).start()
    decisions = await Collector(Decision).start_stream(nc, subjects.decision("bm"))
    try:
        now = time.time_ns()
        task = Task("bm:42", "bm", Window(42, 43), ("accel", "gyro"), now, now + 500_000_000)
        result = Result(
            task_id="bm:42",
            stream="bm",
            type="accel",
            agent_id="a1",
            model=ModelRef("m", "1"),
            output=np.array([0.9, 0.1], np.float32),
            labels=("walking", "running"),
            latency_ms=1.0,
            window=Window(42, 43),
            expected=("accel", "gyro"),
            ingest_ns=now,
            deadline_ns=now + 500_000_000,
            ticket=seal(key, task),
        )
        await Producer(nc, subjects).js.publish(subjects.result("bm"), encode(result))
        [decision] = await decisions.wait_for(1, timeout_s=10)
    finally:
        await fusion.stop()
    waited_s = (decision.decided_ns - now) / 1e9
    assert decision.status == "partial" and decision.missing == ("gyro",)
    assert 0.7 <= waited_s < 3.0, waited_s


async def test_a_publish_nobody_acknowledges_is_sent_again_with_the_same_id(
    connect_bus: Connect, subjects: Subjects
) -> None:
    """A subtask published while no stream takes it (as while a stream leader is elected) is
    retried with its Nats-Msg-Id until a stream exists, and stored once."""
    nc = await connect_bus("producer")
    producer = Producer(nc, subjects, ack_timeout_s=0.2)
    try:
        await producer.subtasks_unconfirmed("accel", plain_subtasks(1))
        await eventually(lambda: producer.retries >= 2, what="two retries", state=lambda: producer)
        await ensure_streams(nc.jetstream(), subjects, TopologySettings())
        await eventually(
            lambda: producer.unconfirmed == 0,
            what="the retried subtask stored",
            state=lambda: producer,
        )
    finally:
        await producer.close()
    assert producer.refused == 0 and producer.retries >= 2
    info = await nc.jetstream().stream_info(subjects.tasks_stream)
    assert info.state.messages == 1


def plain_subtasks(count: int) -> list[Subtask]:
    """``count`` accel subtasks of zeros, due in 30 s."""
    return [
        Subtask(
            task_id=f"s:{i}",
            stream="s",
            type="accel",
            window=Window(i, i + 1),
            inputs={"accel": np.zeros((100, 3), np.float32)},
            deadline_ns=time.time_ns() + 30 * 10**9,
            expected=("accel",),
        )
        for i in range(count)
    ]


async def test_a_component_whose_connection_closes_for_good_exits_non_zero(
    nats_server: EmbeddedServer, subjects: Subjects
) -> None:
    """When the connection is closed and will not come back, ``serve`` returns 1 at once
    instead of leaving a process that has no bus."""
    connections: list[Client] = []

    class Idle:
        async def stop(self) -> None:
            return None

    async def start(nc: Client) -> Idle:
        connections.append(nc)
        return Idle()

    serving = asyncio.ensure_future(
        serve(start, bus=BusSettings(url=nats_server.url, prefix=subjects.prefix), name="idle")
    )
    await eventually(lambda: bool(connections), what="serve connected")
    await connections[0].close()
    async with asyncio.timeout(10):
        code = await serving
    assert code == 1


@pytest.mark.parametrize("sensor", ["ok", "a b"])
def test_a_chunk_names_only_subject_tokens(sensor: str) -> None:
    """Building a chunk with a sensor name that is not a token is possible in memory, but it
    never decodes: the codec is where the wire is checked."""
    from schemas import CODEC, SchemaError

    chunk = SensorChunk(
        stream="s", sensor=sensor, t0_ns=0, period_ns=1, samples=np.zeros((1, 1), np.float32)
    )
    if sensor == "ok":
        assert CODEC.decode(encode(chunk), SensorChunk).sensor == "ok"
    else:
        with pytest.raises(SchemaError, match="bad_name"):
            CODEC.decode(encode(chunk), SensorChunk)


async def test_chunks_far_ahead_in_event_time_are_refused_not_walked_to(
    pipeline: StartPipeline, basicmotions: SensorDataset
) -> None:
    """A chunk whose clock jumped by decades (ahead of the coordinator's clock: future), or
    whose period spans decades (time_jump), is a dead letter: the coordinator does not try to
    cut every window up to it, and the next windows of other streams are decided at once."""
    parts = await pipeline()
    subjects = parts.subjects
    letters = await Collector(DeadLetter).start(parts.nc, subjects.dlq("coordinator"))
    producer = Producer(parts.nc, subjects)
    samples = np.zeros((10, 3), np.float32)
    for t0_ns, period_ns in ((10**10, 10**7), (4 * 10**18, 10**7), (2 * 10**10, 10**16)):
        await producer.chunk(
            SensorChunk(
                stream="jump", sensor="accel", t0_ns=t0_ns, period_ns=period_ns, samples=samples
            )
        )
    refused = await letters.wait_for(2)
    assert [letter.reason for letter in refused] == ["future", "time_jump"]
    decisions = await decide_frames(parts, basicmotions, "steady", 3)
    assert [d.status for d in decisions] == ["complete"] * 3
