"""One agent process draining a backlog: subtasks/s by batch size and runtime.

For LiteRT (``.tflite``) and Keras (``.keras``) and for ``max_batch`` 1, 8 and 64, a backlog
of subtasks is published first, then one ``fusebus agent`` process is started; the clock
runs from its first result to its last. Each configuration is run ``--repeats`` times and
the median is reported, with the agent process's CPU-ms per subtask and its RSS.

    python -m bench.agent_throughput [--subtasks 3000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from nats.aio.msg import Msg

from bench.procstat import cpu_seconds, memory_mb
from bus import (
    BusSettings,
    EmbeddedServer,
    Producer,
    Subjects,
    TopologySettings,
    connect,
    ensure_streams,
)
from fusebus.datasets import load_basicmotions
from fusebus.paths import models_dir
from schemas import Subtask, Window

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    """One measured drain of the backlog."""

    rate: float  # subtasks per second
    cpu_ms_per_subtask: float
    rss_mb: float
    peak_rss_mb: float


async def drain_once(url: str, model: Path, batch: int, count: int) -> Run:
    """Publish ``count`` subtasks, start one agent, time it from first to last result."""
    subjects = Subjects(f"bench{uuid.uuid4().hex[:8]}")
    nc = await connect(BusSettings(url=url, prefix=subjects.prefix), name="bench")
    dataset = load_basicmotions()
    await ensure_streams(nc.jetstream(), subjects, TopologySettings())
    producer = Producer(nc, subjects)
    x = dataset.sensor_view(dataset.x_test, "accel")
    backlog = [
        Subtask(
            task_id=f"t{i}",
            stream="bench",
            type="accel",
            window=Window(i, i + 1),
            inputs={"accel": x[i % len(x)]},
            deadline_ns=2**62,
            expected=("accel",),
        )
        for i in range(count)
    ]
    for start in range(0, count, 500):
        await producer.subtasks(backlog[start : start + 500])

    seen = 0
    first_at = 0.0
    first_cpu = 0.0
    done = asyncio.Event()
    process: asyncio.subprocess.Process | None = None

    async def on_result(_: Msg) -> None:
        nonlocal seen, first_at, first_cpu
        seen += 1
        if seen == 1:
            first_at = time.perf_counter()
            first_cpu = cpu_seconds(process.pid) if process else 0.0
        if seen == count:
            done.set()

    await nc.subscribe(subjects.result("bench"), cb=on_result)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fusebus",
        "agent",
        "--model",
        str(model),
        "--max-batch",
        str(batch),
        "--max-wait-ms",
        "0",
        "--nats-url",
        url,
        "--prefix",
        subjects.prefix,
        "--log-level",
        "warning",
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await asyncio.wait_for(done.wait(), timeout=600)
        elapsed = time.perf_counter() - first_at
        cpu = cpu_seconds(process.pid) - first_cpu
        rss, peak = memory_mb(process.pid)
    finally:
        process.terminate()
        await process.wait()
        await nc.drain()
    # The first result's subtask was processed before the clock started.
    return Run((count - 1) / elapsed, cpu * 1e3 / (count - 1), rss, peak)


async def main_async(args: argparse.Namespace) -> None:
    configs = [("litert", models_dir() / "accel.tflite"), ("keras", models_dir() / "accel.keras")]
    with EmbeddedServer() as server:
        rows = []
        for runtime, model in configs:
            base_rate = None
            for batch in (1, 8, 64):
                runs = [
                    await drain_once(server.url, model, batch, args.subtasks)
                    for _ in range(args.repeats)
                ]
                rate = statistics.median(r.rate for r in runs)
                base_rate = base_rate or rate
                rows.append(
                    (
                        runtime,
                        batch,
                        rate,
                        rate / base_rate,
                        statistics.median(r.cpu_ms_per_subtask for r in runs),
                        statistics.median(r.rss_mb for r in runs),
                        max(r.peak_rss_mb for r in runs),
                    )
                )
                print(
                    f"  {runtime:<7} batch {batch:>2}: {rate:8.0f} subtasks/s",
                    file=sys.stderr,
                    flush=True,
                )
    print(
        f"\nOne agent process draining {args.subtasks} subtasks (median of {args.repeats} runs)\n"
    )
    print(
        "| runtime | max_batch | subtasks/s | x batch 1 | CPU-ms/subtask | RSS MB | peak RSS MB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for runtime, batch, rate, ratio, cpu, rss, peak in rows:
        print(
            f"| {runtime} | {batch} | {rate:,.0f} | {ratio:.1f} | {cpu:.3f} | {rss:.0f} | {peak:.0f} |"
        )
    lite64 = next(r[2] for r in rows if r[0] == "litert" and r[1] == 64)
    keras64 = next(r[2] for r in rows if r[0] == "keras" and r[1] == 64)
    print(f"\nLiteRT / Keras at batch 64: {lite64 / keras64:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subtasks", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
