"""Replaying a recorded dataset onto the bus as live sensors: pre-aligned frames, or per-sensor
chunks with optional, seeded imperfections (jitter, reordering, gaps, a sensor dropping out)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bus import Producer, Subjects, last_stored
from bus.types import Connection
from fusebus.datasets import SensorDataset
from schemas import (
    CODEC,
    BusError,
    ConfigError,
    Decision,
    FusebusError,
    SensorChunk,
    SensorFrame,
)

#: How long one read of where a stream has reached may take, and how many go at once.
ASK_TIMEOUT_S = 2.0
ASKS_AT_ONCE = 64


@dataclass(frozen=True)
class ReplayedWindow:
    """One window sent, with its true label."""

    t_start_ns: int
    label: str
    answer: bytes | None = None  # the coordinator's answer when sent with wait_s


async def replay_frames(
    producer: Producer,
    dataset: SensorDataset,
    *,
    stream: str,
    rate_hz: float,
    split: str = "test",
    limit: int | None = None,
    start_ns: int | None = None,
    wait_s: float | None = None,
) -> list[ReplayedWindow]:
    """Publish each case of a split as one pre-aligned frame, ``rate_hz`` frames a second.

    Frames are timestamped in event time as if the cases had been recorded back to back
    from ``start_ns`` (default: now). Sending is paced against a fixed schedule, so a slow
    send does not drift the rate. With ``wait_s`` each frame waits for the coordinator's
    answer (back-pressure: a blocking plan slows the replay down). Returns the windows sent.
    """
    if rate_hz <= 0:
        raise ConfigError(f"rate must be > 0 frames/s, got {rate_hz}")
    x, y = dataset.split(split)
    count = len(x) if limit is None else min(limit, len(x))
    period_ns = dataset.period_ns
    case_ns = dataset.case_ns
    t0 = time.time_ns() if start_ns is None else start_ns
    sent: list[ReplayedWindow] = []
    loop = asyncio.get_running_loop()
    schedule_start = loop.time()
    for i in range(count):
        delay = schedule_start + i / rate_hz - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        t_ns = t0 + i * case_ns
        frame = SensorFrame(
            stream=stream,
            t_ns=t_ns,
            period_ns=period_ns,
            sensors={name: dataset.sensor_view(x[i], name) for name in dataset.sensors},
        )
        answer = await producer.frame(frame, wait_s=wait_s)
        sent.append(ReplayedWindow(t_ns, dataset.labels[int(y[i])], answer))
    await producer.nc.flush()
    return sent


@dataclass(frozen=True)
class Imperfections:
    """What real sensors do, injected into a replay; each draw comes from ``seed``.

    ``jitter_ms``: each chunk is sent up to this much late (uniform). ``reorder``: chunks of a
    sensor are shuffled within groups of this many. ``gap_rate``: share of chunks lost.
    ``dropout``: ``(sensor, start, end)``: that sensor sends nothing between these fractions
    of the replay (0.3, 0.6 = from 30% to 60% of its duration).
    """

    jitter_ms: float = 0.0
    reorder: int = 0
    gap_rate: float = 0.0
    dropout: tuple[str, float, float] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.jitter_ms < 0 or self.reorder < 0 or not 0 <= self.gap_rate < 1:
            raise ConfigError("jitter_ms and reorder must be >= 0, gap_rate within [0, 1)")
        if self.dropout is not None and not 0 <= self.dropout[1] < self.dropout[2] <= 1:
            raise ConfigError(
                f"dropout range must satisfy 0 <= start < end <= 1, got {self.dropout[1:]}"
            )


@dataclass(frozen=True)
class ScheduledChunk:
    """A chunk and when to send it, in seconds from the start of the replay."""

    send_at_s: float
    chunk: SensorChunk


def stream_names(base: str, count: int) -> list[str]:
    """``count`` stream ids: ``base`` alone, or ``base-0000``, ``base-0001``..."""
    return [base] if count == 1 else [f"{base}-{i:04d}" for i in range(count)]


def chunk_schedule(
    dataset: SensorDataset,
    *,
    streams: list[str],
    speed: float,
    chunk_ms: float,
    start_ns: int,
    split: str = "test",
    limit: int | None = None,
    imperfections: Imperfections = Imperfections(),
) -> tuple[list[ScheduledChunk], dict[str, list[ReplayedWindow]]]:
    """Every chunk to send, in send order, and the true label of every window of each stream.

    Stream ``i`` plays the cases from case ``i`` on (wrapping), so streams differ. A chunk is
    due when its last sample has been taken (divided by ``speed``), plus jitter.
    """
    if speed <= 0 or chunk_ms <= 0:
        raise ConfigError("speed and chunk_ms must be > 0")
    x, y = dataset.split(split)
    cases = len(x) if limit is None else min(limit, len(x))
    period_ns = dataset.period_ns
    per_chunk = max(1, round(chunk_ms * 1e6 / period_ns))
    case_samples = x.shape[1]
    rng = np.random.default_rng(imperfections.seed)
    total_ns = cases * case_samples * period_ns
    schedule: list[ScheduledChunk] = []
    truth: dict[str, list[ReplayedWindow]] = {}
    for index, stream in enumerate(streams):
        order = [(index + c) % len(x) for c in range(cases)]
        truth[stream] = [
            ReplayedWindow(start_ns + c * case_samples * period_ns, dataset.labels[int(y[case])])
            for c, case in enumerate(order)
        ]
        for sensor in dataset.sensors:
            samples = np.concatenate([dataset.sensor_view(x[case], sensor) for case in order])
            chunks = [
                SensorChunk(
                    stream=stream,
                    sensor=sensor,
                    t0_ns=start_ns + i * period_ns,
                    period_ns=period_ns,
                    samples=np.ascontiguousarray(samples[i : i + per_chunk]),
                )
                for i in range(0, len(samples), per_chunk)
            ]
            due = [
                ((c.t0_ns - start_ns) + len(c.samples) * period_ns) / 1e9 / speed for c in chunks
            ]
            if imperfections.reorder > 1:
                group = imperfections.reorder
                for g in range(0, len(chunks), group):
                    block = chunks[g : g + group]
                    rng.shuffle(block)
                    chunks[g : g + group] = block
            for when, chunk in zip(due, chunks, strict=True):
                offset_ns = chunk.t0_ns - start_ns
                if imperfections.gap_rate and rng.random() < imperfections.gap_rate:
                    continue
                dropout = imperfections.dropout
                if (
                    dropout
                    and dropout[0] == sensor
                    and dropout[1] * total_ns <= offset_ns < dropout[2] * total_ns
                ):
                    continue
                jitter = (
                    rng.uniform(0, imperfections.jitter_ms / 1e3)
                    if imperfections.jitter_ms
                    else 0.0
                )
                schedule.append(ScheduledChunk(when + jitter, chunk))
    schedule.sort(key=lambda s: s.send_at_s)
    return schedule, truth


async def send_schedule(producer: Producer, schedule: list[ScheduledChunk]) -> int:
    """Publish each chunk at its time (from now); returns how many were sent."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    for sent, item in enumerate(schedule):
        delay = began + item.send_at_s - loop.time()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        await producer.chunk(item.chunk)
        if sent % 1000 == 999:
            await asyncio.sleep(0)  # let the client flush between bursts
    await producer.nc.flush()
    return len(schedule)


def aligned_start_ns(dataset: SensorDataset, *, after_ns: int | None = None) -> int:
    """The next instant, from now, on the grid of the dataset's case length (window hop)."""
    case_ns = dataset.case_ns
    now = time.time_ns() if after_ns is None else after_ns
    return int(-(-now // case_ns) * case_ns)


def replay_start_ns(
    *, now_ns: int, grid_ns: int, span_ns: int, send_s: float, after_ns: int | None = None
) -> int:
    """Event time of a replay's first sample, on the ``grid_ns`` grid (the case length).

    A replay sends ``span_ns`` of event time over ``send_s`` seconds. Faster than real time,
    its event time would run ahead of the wall clock (and past the coordinator's one-hour
    limit on future data), so it starts that far in the past: no sample is stamped later than
    the moment it is sent. It never starts before ``after_ns``, the end of what the bus
    already holds for its streams, so a second replay onto the same stream ids continues
    them instead of sending windows that are already closed (which the coordinator would
    drop as late, or answer as duplicates).
    """
    lead_ns = max(0, span_ns - round(send_s * 1e9))
    start = now_ns - lead_ns
    if after_ns is not None:
        start = max(start, after_ns)
    return int(-(-start // grid_ns) * grid_ns)


async def stream_end_ns(
    nc: Connection, subjects: Subjects, streams: Iterable[str], sensors: Iterable[str]
) -> int | None:
    """The end, in event time, of the newest data the bus holds for ``streams``: their last
    decided window and the sensor data still waiting in the intake stream. None when it
    holds nothing for them (new streams, or a server that has forgotten them).

    Raises:
        BusError: the server does not answer such reads (a sensor's user may lack the right
            to read the streams); the first unanswered read stops the asking.
    """
    js = nc.jetstream(timeout=ASK_TIMEOUT_S)
    sensors = tuple(sensors)
    asks: list[tuple[str, str, type[Decision] | type[SensorFrame] | type[SensorChunk]]] = []
    for stream in streams:
        asks.append((subjects.decisions_stream, subjects.decision(stream), Decision))
        asks.append((subjects.intake_stream, subjects.frame(stream), SensorFrame))
        asks.extend(
            (subjects.intake_stream, subjects.sensor(stream, sensor), SensorChunk)
            for sensor in sensors
        )
    ends: list[int] = []
    for first in range(0, len(asks), ASKS_AT_ONCE):
        batch = asks[first : first + ASKS_AT_ONCE]
        found = await asyncio.gather(
            *(last_stored(js, name, subject) for name, subject, _ in batch)
        )
        for data, (_, _, kind) in zip(found, batch, strict=True):
            if data is not None:
                ends.extend(_end_of(data, kind))
    return max(ends, default=None)


def _end_of(data: bytes, kind: type[Decision] | type[SensorFrame] | type[SensorChunk]) -> list[int]:
    """The event-time end of one stored message; nothing when it does not decode (someone
    else's bytes: they say nothing about where the stream is)."""
    try:
        message = CODEC.decode(data, kind)
    except FusebusError:
        return []
    match message:
        case Decision():
            return [message.window.t_end_ns]
        case SensorFrame():
            samples = next(iter(message.sensors.values())).shape[0]
            return [message.t_ns + samples * message.period_ns]
        case SensorChunk():
            return [message.t0_ns + message.samples.shape[0] * message.period_ns]
    return []


def _utc(t_ns: int) -> str:
    return datetime.fromtimestamp(t_ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class ReplayRequest:
    """What ``fusebus replay`` was asked to send."""

    source: str  # a shipped dataset's name, a user's .npz, or a recording file
    spec: Path | None = None  # a .npz's spec, when not the .toml beside it
    stream: str | None = None
    streams: int = 1
    speed: float = 1.0
    chunk_ms: float = 1000.0
    split: str = "test"
    limit: int | None = None
    frames: bool = False
    rate_hz: float = 10.0
    wait: bool = False
    imperfections: Imperfections = Imperfections()


def is_recording(source: str) -> bool:
    """Whether ``source`` names a recording file rather than a dataset (shipped or ``.npz``).

    Raises:
        ConfigError: it is neither a known dataset nor something that looks like a file.
    """
    from fusebus.datasets import DATASETS, is_dataset_file

    if source in DATASETS or is_dataset_file(source):
        return False
    if "." in source or "/" in source:
        return True
    raise ConfigError(
        f"unknown dataset {source!r}; known: {', '.join(sorted(DATASETS))}, "
        "a .npz dataset file, or a recording file"
    )


async def run_replay(nc: Any, subjects: Subjects, request: ReplayRequest) -> str:
    """Send what ``request`` asks for; returns a one-line summary."""
    from fusebus.datasets import load_dataset
    from fusebus.recording import describe, play, read_recording

    producer = Producer(nc, subjects)
    if is_recording(request.source):
        entries = await asyncio.to_thread(read_recording, Path(request.source))
        await play(nc, subjects, entries, speed=request.speed)
        facts = describe(entries)
        return f"played {facts['messages']} messages of {facts['streams']} streams from {request.source}"
    dataset = load_dataset(request.source, spec=request.spec)
    x, _ = dataset.split(request.split)
    cases = len(x) if request.limit is None else min(request.limit, len(x))
    base = request.stream or dataset.name
    names = [base] if request.frames else stream_names(base, request.streams)
    unasked = ""
    try:
        after_ns = await stream_end_ns(nc, subjects, names, dataset.sensors)
    except BusError as exc:  # e.g. a sensor's user, who may publish but not read streams
        after_ns = None
        unasked = "; could not read where the stream(s) had reached, so a replay onto "
        unasked += f"stream ids already used may be dropped as late ({exc})"
    span_ns = cases * dataset.case_ns
    start_ns = replay_start_ns(
        now_ns=time.time_ns(),
        grid_ns=dataset.case_ns,
        span_ns=span_ns,
        send_s=cases / request.rate_hz if request.frames else span_ns / 1e9 / request.speed,
        after_ns=after_ns,
    )
    anchor = (
        f"event time from {_utc(start_ns)}"
        + (f", after the {_utc(after_ns)} the stream(s) already reached" if after_ns else "")
        + unasked
    )
    if request.frames:
        sent = await replay_frames(
            producer,
            dataset,
            stream=base,
            rate_hz=request.rate_hz,
            split=request.split,
            limit=request.limit,
            start_ns=start_ns,
            wait_s=30.0 if request.wait else None,
        )
        rejected = sum(1 for w in sent if w.answer and w.answer != b"accepted")
        return (
            f"replayed {len(sent)} frames of {dataset.name} on {subjects.frame(base)} ({anchor})"
            + (f", {rejected} rejected" if rejected else "")
        )
    schedule, truth = chunk_schedule(
        dataset,
        streams=names,
        speed=request.speed,
        chunk_ms=request.chunk_ms,
        start_ns=start_ns,
        split=request.split,
        limit=request.limit,
        imperfections=request.imperfections,
    )
    count = await send_schedule(producer, schedule)
    windows = sum(len(w) for w in truth.values())
    return (
        f"replayed {count} chunks ({windows} windows) of {dataset.name} on {len(names)} "
        f"stream(s) ({anchor})"
    )
