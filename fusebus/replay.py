"""Replaying a recorded dataset onto the bus as a live stream of frames."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from bus import Producer
from fusebus.datasets import SensorDataset
from schemas import ConfigError, SensorFrame


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
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    x = dataset.x_test if split == "test" else dataset.x_train
    y = dataset.y_test if split == "test" else dataset.y_train
    count = len(x) if limit is None else min(limit, len(x))
    period_ns = dataset.period_ns
    case_ns = x.shape[1] * period_ns
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
