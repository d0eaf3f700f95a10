"""Every input subject fuzzed across a real server: a few hundred mutated messages of each
kind, then every component must still be connected, have answered every message, and decide
the next windows once each."""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import numpy as np

from bus import Subjects, discover_components
from fusebus.datasets import SensorDataset
from schemas import (
    ModelRef,
    Result,
    ResultBatch,
    SensorChunk,
    Subtask,
    SubtaskBatch,
    TaskStatus,
    Window,
    encode,
)
from tests.helpers import Pipeline, eventually
from tests.test_reliability import decide_frames, frame_of

StartPipeline = Callable[..., Awaitable[Pipeline]]
PER_KIND = 200

EVIL: list[Any] = [
    None,
    -1,
    2**64 - 1,
    2**63,
    1.5,
    True,
    "",
    "a b",
    "a.b",
    "*",
    ">",
    "\x00",
    "x" * 5000,
    b"\x00" * 17,
    [],
    {},
    [[[[[[[[[[[[[[[[["deep"]]]]]]]]]]]]]]]]],
    list(range(20_000)),
    {"dtype": "float32", "shape": [10**9, 10**9], "data": b""},
    {"dtype": "float32", "shape": [2, 2], "data": b"\x00"},
    {"dtype": "object", "shape": [1], "data": b"\x00" * 8},
    {"dtype": "float32", "shape": [1] * 40, "data": b"\x00" * 4},
]


def samples_of(dataset: SensorDataset) -> dict[str, bytes]:
    """One valid message of each kind a component reads, encoded."""
    case = dataset.x_test[0]
    accel = dataset.sensor_view(case, "accel")
    window = Window(10**10, 2 * 10**10)
    subtask = Subtask(
        task_id="fz:1",
        stream="fz",
        type="accel",
        window=window,
        inputs={"accel": accel},
        deadline_ns=time.time_ns() + 60 * 10**9,
        expected=("accel", "gyro"),
        ticket=b"\x07" * 16,
    )
    result = Result(
        task_id="fz:1",
        stream="fz",
        type="accel",
        agent_id="fuzzer",
        model=ModelRef("m", "1"),
        output=np.full(4, 0.25, np.float32),
        labels=("a", "b", "c", "d"),
        latency_ms=1.0,
        window=window,
        expected=("accel", "gyro"),
        ticket=b"\x07" * 16,
    )
    return {
        "sensor_chunk": encode(
            SensorChunk(
                stream="fz", sensor="accel", t0_ns=10**10, period_ns=10**8, samples=accel[:10]
            )
        ),
        "sensor_frame": encode(frame_of(dataset, "fz", 0)),
        "subtask": encode(subtask),
        "subtask_batch": encode(SubtaskBatch.of([subtask, subtask])),
        "result": encode(result),
        "result_batch": encode(
            ResultBatch(
                stream="fz",
                type="accel",
                agent_id="fuzzer",
                model=ModelRef("m", "1"),
                labels=result.labels,
                weight=1.0,
                latency_ms=1.0,
                task_ids=("fz:1", "fz:2"),
                outputs=np.full((2, 4), 0.25, np.float32),
                windows=np.array([[1, 2], [3, 4]], np.int64),
                expected=(("accel",), ("accel",)),
                ingest_ns=np.zeros(2, np.int64),
            )
        ),
        "task_status": encode(
            TaskStatus(task_id="fz:1", stream="fz", state="partial", missing=("gyro",), reason="x")
        ),
    }


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One mutation of a valid message: noise, a cut, flipped bytes, or a field changed,
    dropped or retyped in its msgpack map."""
    how = rng.randrange(6)
    if how == 0:
        return rng.randbytes(rng.randrange(0, 3000))
    if how == 1:
        return data[: rng.randrange(0, len(data))]
    if how == 2:
        out = bytearray(data)
        for _ in range(rng.randrange(1, 6)):
            out[rng.randrange(len(out))] = rng.randrange(256)
        return bytes(out)
    body = msgpack.unpackb(data, raw=False)
    key = rng.choice(sorted(body))
    if how == 3:
        body[key] = rng.choice(EVIL)
    elif how == 4:
        del body[key]
    else:
        body["kind"] = rng.choice(["result", "subtask", "sensor_chunk", "decision", "nope", 7])
        body["v"] = rng.choice([1, 2, -1, "1"])
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


def targets(subjects: Subjects, kind: str) -> list[tuple[str, bool]]:
    """Where a message of ``kind`` goes in, and whether it is published through JetStream."""
    return {
        "sensor_chunk": [(subjects.sensor("fz", "accel"), False)],
        "sensor_frame": [(subjects.frame("fz"), False)],
        "subtask": [(subjects.task("accel"), True)],
        "subtask_batch": [(subjects.task("gyro"), True)],
        "result": [(subjects.result("fz"), True)],
        "result_batch": [(subjects.result("fz"), True)],
        "task_status": [(subjects.status("fz"), True)],
    }[kind]


async def test_every_input_subject_fuzzed_leaves_every_component_answering(
    pipeline: StartPipeline, basicmotions: SensorDataset
) -> None:
    """Mutated messages of every kind on every input subject (core and JetStream), plus junk
    on the discovery and status subjects: afterwards every component is connected, every
    JetStream message was answered (nothing left pending), and fresh windows each get one
    decision."""
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    parts = await pipeline()
    subjects, nc = parts.subjects, parts.nc
    js = nc.jetstream()
    all_subjects = [t for kind in samples_of(basicmotions) for t in targets(subjects, kind)]
    sent = 0
    for kind, data in samples_of(basicmotions).items():
        for _ in range(PER_KIND):
            bad = mutate(data, rng)
            own = targets(subjects, kind)[0]
            subject, durable = own if rng.random() < 0.8 else rng.choice(all_subjects)
            if durable:
                await js.publish(subject, bad)
            else:
                await nc.publish(subject, bad)
            sent += 1
    for subject in ("$SRV.PING", "$SRV.INFO", "$SRV.STATS.accel", "$SRV.PING.fusebus-fusion"):
        for _ in range(20):
            await nc.publish(subject, rng.randbytes(rng.randrange(0, 200)))
    await nc.flush()
    await eventually(
        lambda: all(c.nc.is_connected for c in parts.components()), what="all connected"
    )

    async def pending() -> dict[str, int]:
        names = [
            (subjects.results_stream, subjects.coordinator_consumer),
            (subjects.results_stream, "fusion"),
            (subjects.tasks_stream, subjects.task_consumer("accel")),
            (subjects.tasks_stream, subjects.task_consumer("gyro")),
        ]
        counts = {}
        for stream, consumer in names:
            info = await js.consumer_info(stream, consumer)
            counts[consumer] = info.num_pending + info.num_ack_pending
        return counts

    left: dict[str, int] = {}

    async def all_answered() -> bool:
        nonlocal left
        left = await pending()
        return not any(left.values())

    await eventually(  # within a few durability intervals and nak backoffs
        all_answered,
        what=f"every fuzzed message answered (seed {seed})",
        timeout_s=30,
        state=lambda: left,
        every_s=0.2,
    )
    replies = await discover_components(nc, prefix=subjects.prefix, timeout_s=0.5)
    roles = sorted((r.get("metadata") or {}).get("fusebus.role", "") for r in replies)
    assert roles == ["agent", "agent", "coordinator", "fusion"]
    decisions = await decide_frames(parts, basicmotions, "clean", 10)
    assert [d.status for d in decisions] == ["complete"] * 10
    letters = (await js.stream_info(subjects.dlq_stream)).state.messages
    print(f"{letters} dead letters for {sent} mutated messages")
    assert letters >= sent // 2, f"{letters} dead letters for {sent} mutated messages"
