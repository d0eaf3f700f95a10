"""Per-sensor streams across a real nats-server: order, lateness, silent sensors, mixed rates,
a thousand streams, and record-then-replay."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

from bus import Producer, Subjects, TopologySettings
from coordinator import CoordinatorSettings, basicmotions_plan
from fusebus.datasets import SensorDataset
from fusebus.recording import play, read_recording, record
from fusebus.replay import (
    Imperfections,
    ReplayedWindow,
    ScheduledChunk,
    aligned_start_ns,
    chunk_schedule,
    send_schedule,
    stream_names,
)
from schemas import Decision, SensorChunk, SensorStatus
from tests.helpers import Collector, Pipeline, eventually

StartPipeline = Callable[..., Awaitable[Pipeline]]
SEED = 7


def schedule_for(
    dataset: SensorDataset,
    start: int,
    *,
    streams: list[str] | None = None,
    speed: float = 200,
    chunk_ms: float = 1000,
    limit: int,
    **imperfect: object,
) -> tuple[list[ScheduledChunk], dict[str, list[ReplayedWindow]]]:
    """The chunks of ``limit`` TEST cases per stream (``["s"]`` by default), from ``start``."""
    return chunk_schedule(
        dataset,
        streams=streams or ["s"],
        speed=speed,
        chunk_ms=chunk_ms,
        start_ns=start,
        limit=limit,
        imperfections=Imperfections(**imperfect),  # type: ignore[arg-type]
    )


def by_window(decisions: list[Decision], start_ns: int) -> dict[int, Decision]:
    return {d.window.t_start_ns - start_ns: d for d in decisions}


async def test_shuffled_jittered_chunks_give_the_same_decisions_as_ordered_ones(
    pipeline: StartPipeline, basicmotions: SensorDataset
) -> None:
    """The same data sent in order, and reordered with jitter within the allowed lateness,
    yields the same windows and the same decisions."""
    print(f"seed {SEED}")
    parts = await pipeline()
    start = aligned_start_ns(basicmotions)
    ordered, _ = schedule_for(basicmotions, start, streams=["ordered"], speed=100, limit=12)
    shuffled, _ = schedule_for(
        basicmotions,
        start,
        streams=["shuffled"],
        speed=100,
        limit=12,
        reorder=2,
        jitter_ms=4,
        seed=SEED,
    )
    assert [s.chunk.t0_ns for s in shuffled] != sorted(s.chunk.t0_ns for s in shuffled)
    a = await Collector(Decision).start_stream(parts.nc, parts.subjects.decision("ordered"))
    b = await Collector(Decision).start_stream(parts.nc, parts.subjects.decision("shuffled"))
    merged = sorted(ordered + shuffled, key=lambda s: s.send_at_s)
    await send_schedule(Producer(parts.nc, parts.subjects), merged)
    await a.wait_for(12)
    await b.wait_for(12)
    first, second = by_window(a.items, start), by_window(b.items, start)
    assert sorted(first) == sorted(second) == [i * 10**10 for i in range(12)]
    for offset, decision in first.items():
        other = second[offset]
        assert (
            (decision.label, decision.status)
            == (other.label, other.status)
            == (decision.label, "complete")
        )
        assert decision.scores == other.scores
    assert parts.coordinator is not None and parts.coordinator.stats()["late_chunks"] == 0


async def test_late_chunks_are_counted_and_leave_closed_windows_alone(
    pipeline: StartPipeline, basicmotions: SensorDataset
) -> None:
    """A chunk older than the allowed lateness is counted as late and changes no decision."""
    parts = await pipeline()
    start = aligned_start_ns(basicmotions)
    schedule, _ = schedule_for(basicmotions, start, limit=4)
    decisions = await Collector(Decision).start_stream(parts.nc, parts.subjects.decision("s"))
    await send_schedule(Producer(parts.nc, parts.subjects), schedule)
    await decisions.wait_for(4)
    late = SensorChunk(
        stream="s",
        sensor="accel",
        t0_ns=start,
        period_ns=10**8,
        samples=np.full((10, 3), 50, np.float32),
    )
    await Producer(parts.nc, parts.subjects).chunk(late)
    await parts.nc.flush()
    coordinator = parts.coordinator
    assert coordinator is not None
    await eventually(
        lambda: coordinator.stats()["late_chunks"] >= 1,
        what="the late chunk counted",
        state=coordinator.stats,
    )
    assert coordinator.stats()["late_chunks"] == 1
    await decisions.settle(0.5)
    assert len(decisions.items) == 4


async def test_a_silent_sensor_goes_down_decisions_name_it_then_it_comes_back(
    pipeline: StartPipeline, basicmotions: SensorDataset
) -> None:
    """The gyroscope stops mid-stream: a down event, partial decisions naming it, an up event
    when it resumes, and complete decisions again."""
    parts = await pipeline(plan=basicmotions_plan(max_silence_ms=300, deadline_ms=1000))
    start = aligned_start_ns(basicmotions)
    schedule, _ = schedule_for(basicmotions, start, speed=50, limit=20, dropout=("gyro", 0.3, 0.6))
    events = await Collector(SensorStatus).start(parts.nc, parts.subjects.sensor_status("s"))
    decisions = await Collector(Decision).start_stream(parts.nc, parts.subjects.decision("s"))
    await send_schedule(Producer(parts.nc, parts.subjects), schedule)
    await decisions.wait_for(20, timeout_s=30)
    await decisions.settle(0.5)
    changes = [(e.sensor, e.state) for e in events.items]
    assert changes[:2] == [("gyro", "down"), ("gyro", "up")]
    assert all(state == "down" for _, state in changes[2:])  # the replay ended: all fall silent
    assert events.items[0].silent_ms >= 300
    ordered = [by_window(decisions.items, start)[i * 10**10] for i in range(20)]
    states = [d.status for d in ordered]
    assert states[:5] == ["complete"] * 5 and states[-5:] == ["complete"] * 5
    partial = [d for d in ordered if d.status == "partial"]
    assert len(partial) >= 3
    assert all(
        d.missing_sensors == ("gyro",) and d.missing == ("gyro",) and d.contributors == ("accel",)
        for d in partial
    )


async def test_sensors_at_different_rates_are_aligned_into_the_same_windows(
    pipeline: StartPipeline, basicmotions: SensorDataset
) -> None:
    """A gyroscope at half the rate is resampled onto the window grid: every window complete."""
    parts = await pipeline()
    start = aligned_start_ns(basicmotions)
    schedule, truth = schedule_for(basicmotions, start, limit=16)
    halved = [
        ScheduledChunk(
            item.send_at_s,
            SensorChunk(
                stream="s",
                sensor="gyro",
                t0_ns=item.chunk.t0_ns,
                period_ns=2 * item.chunk.period_ns,
                samples=np.ascontiguousarray(item.chunk.samples[::2]),
            ),
        )
        if item.chunk.sensor == "gyro"
        else item
        for item in schedule
    ]
    decisions = await Collector(Decision).start_stream(parts.nc, parts.subjects.decision("s"))
    await send_schedule(Producer(parts.nc, parts.subjects), halved)
    await decisions.wait_for(16)
    labels = {w.t_start_ns: w.label for w in truth["s"]}
    assert all(d.status == "complete" and d.missing_sensors == () for d in decisions.items)
    assert sum(d.label == labels[d.window.t_start_ns] for d in decisions.items) / 16 >= 0.9


async def test_a_thousand_streams_are_decided_once_each_with_bounded_memory(
    pipeline: StartPipeline, basicmotions: SensorDataset
) -> None:
    """1,000 concurrent streams: every window gets one decision, per-stream buffers stay
    within a window or two, and idle streams are forgotten."""
    parts = await pipeline(coordinator_settings=CoordinatorSettings(forget_stream_after_s=4.0))
    start = aligned_start_ns(basicmotions)
    names = stream_names("fleet", 1000)
    schedule, _ = schedule_for(
        basicmotions, start, streams=names, speed=500, chunk_ms=10_000, limit=3
    )
    decisions = await Collector(Decision).start_stream(
        parts.nc, f"{parts.subjects.prefix}.decision.*"
    )
    await send_schedule(Producer(parts.nc, parts.subjects), schedule)
    await decisions.wait_for(3000, timeout_s=90)
    await decisions.settle(0.5)
    keys = [(d.stream, d.window.t_start_ns) for d in decisions.items]
    assert len(keys) == len(set(keys)) == 3000
    coordinator = parts.coordinator
    assert coordinator is not None
    assert len(coordinator.tracker) == 0
    per_stream = list(coordinator.intake.buffered_samples().values())
    assert max(per_stream, default=0) <= 2 * 2 * 100  # two sensors, at most about a window each
    await eventually(
        lambda: coordinator.stats()["streams"] == 0,
        what="every idle stream forgotten",
        state=coordinator.stats,
    )
    # Each stream was forgotten once it fell idle, and only then.
    assert coordinator.stats()["streams_forgotten"] == 1000 and coordinator.stats()["streams"] == 0


async def test_record_then_replay_gives_identical_decisions(
    pipeline: StartPipeline, basicmotions: SensorDataset, tmp_path: Path
) -> None:
    """Live chunks recorded in the SENSORS stream, written to a file and played back twice,
    onto fresh deployments, give the live run's decisions both times."""
    recording = TopologySettings(record_sensors=True)
    live = await pipeline(topology=recording)
    start = aligned_start_ns(basicmotions)
    schedule, _ = schedule_for(
        basicmotions, start, speed=100, limit=8, jitter_ms=3, reorder=2, seed=SEED
    )
    original = await Collector(Decision).start_stream(live.nc, live.subjects.decision("s"))
    await send_schedule(Producer(live.nc, live.subjects), schedule)
    await original.wait_for(8)
    path = tmp_path / "run.fbrec"
    assert await record(live.nc, live.subjects, path) == len(schedule)
    entries = read_recording(path)

    for _ in range(2):
        fresh = await pipeline(on=Subjects(f"t{uuid.uuid4().hex[:10]}"))
        replayed = await Collector(Decision).start_stream(fresh.nc, fresh.subjects.decision("s"))
        await play(fresh.nc, fresh.subjects, entries, speed=2.0)
        await replayed.wait_for(8)
        first, again = by_window(original.items, start), by_window(replayed.items, start)
        assert sorted(first) == sorted(again)
        for offset, decision in first.items():
            assert (again[offset].label, again[offset].status) == (decision.label, decision.status)
            assert again[offset].scores == decision.scores


async def test_windows_missing_a_required_sensor_fail_and_say_which(
    pipeline: StartPipeline, basicmotions: SensorDataset
) -> None:
    """With the gyroscope required, windows it left empty are reported failed, naming it."""
    from coordinator.plan import SensorSpec

    plan = dataclasses.replace(
        basicmotions_plan(max_silence_ms=300, deadline_ms=1000),
        sensors=(SensorSpec("accel", True, 300), SensorSpec("gyro", True, 300)),
    )
    parts = await pipeline(plan=plan)
    start = aligned_start_ns(basicmotions)
    schedule, _ = schedule_for(
        basicmotions, start, speed=50, limit=12, dropout=("gyro", 0.25, 0.75)
    )
    decisions = await Collector(Decision).start_stream(parts.nc, parts.subjects.decision("s"))
    await send_schedule(Producer(parts.nc, parts.subjects), schedule)
    await decisions.wait_for(12, timeout_s=30)
    failed = [d for d in decisions.items if d.status == "failed"]
    assert len(failed) >= 3
    assert all(
        d.missing_sensors == ("gyro",) and d.contributors == () and d.label == "" for d in failed
    )
    assert sum(d.status == "complete" for d in decisions.items) >= 4
