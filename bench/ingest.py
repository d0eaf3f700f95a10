"""Coordinator ingestion, and end to end with per-sensor streams.

1. The coordinator alone, as its own process: per-sensor chunks (1 s, 10 samples x 3
   channels) for 1, 100 and 1,000 streams are published as fast as possible; the clock runs
   until every window's subtasks are in the work queue. Reported: sensor samples/s, windows/s
   and the coordinator's CPU per second of work (1.0 = one full core).
2. End to end with 100 streams: coordinator, accel and gyro agents and fusion as separate
   processes; decisions/s from the first chunk sent to the last decision stored.

    python -m bench.ingest [--windows 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from nats.aio.client import Client
from nats.aio.msg import Msg

from bench.procstat import cpu_seconds, memory_mb
from bus import (
    BusSettings,
    EmbeddedServer,
    Subjects,
    TopologySettings,
    connect,
    discover_components,
    ensure_streams,
    follow_stored,
)
from fusebus.datasets import load_basicmotions
from fusebus.replay import aligned_start_ns, chunk_schedule, stream_names
from schemas import encode

ROOT = Path(__file__).resolve().parent.parent


async def start(args: list[str], url: str, prefix: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fusebus",
        *args,
        "--nats-url",
        url,
        "--prefix",
        prefix,
        "--log-level",
        "warning",
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def wait_roles(nc: Client, prefix: str, roles: set[str]) -> None:
    for _ in range(300):
        replies = await discover_components(nc, prefix=prefix, timeout_s=0.2)
        seen = {(r.get("metadata") or {}).get("fusebus.role") for r in replies}
        seen |= {
            f"agent-{r.get('name')}"
            for r in replies
            if (r.get("metadata") or {}).get("fusebus.role") == "agent"
        }
        if roles <= seen:
            return
    raise RuntimeError(f"components {roles} did not start")


def encoded_chunks(
    subjects: Subjects, streams: int, windows: int
) -> tuple[list[tuple[str, bytes]], int]:
    """All chunks for ``windows`` windows spread over ``streams`` streams, pre-encoded."""
    dataset = load_basicmotions()
    per_stream = max(1, windows // streams)
    schedule, _ = chunk_schedule(
        dataset,
        streams=stream_names("bench", streams),
        speed=1e9,
        chunk_ms=1000,
        start_ns=aligned_start_ns(dataset),
        limit=min(per_stream, len(dataset.x_test)),
    )
    rounds = max(1, per_stream // len(dataset.x_test))
    messages = []
    samples = 0
    for r in range(rounds):
        shift = r * len(dataset.x_test) * 10**10
        for item in schedule:
            c = item.chunk
            moved = type(c)(
                stream=c.stream,
                sensor=c.sensor,
                t0_ns=c.t0_ns + shift,
                period_ns=c.period_ns,
                samples=c.samples,
            )
            messages.append((subjects.sensor(c.stream, c.sensor), encode(moved)))
            samples += len(c.samples)
    return messages, samples


async def publish_all(nc: Client, messages: list[tuple[str, bytes]]) -> None:
    for i, (subject, data) in enumerate(messages):
        await nc.publish(subject, data)
        if i % 2000 == 1999:
            await nc.flush()
    await nc.flush()


async def coordinator_alone(
    url: str, streams: int, windows: int
) -> tuple[float, float, float, float]:
    """Returns samples/s, windows/s, CPU share and RSS MB of the coordinator."""
    subjects = Subjects(f"ing{uuid.uuid4().hex[:8]}")
    nc = await connect(BusSettings(url=url, prefix=subjects.prefix), name="bench")
    await ensure_streams(nc.jetstream(), subjects, TopologySettings())
    process = await start(
        ["coordinator", "--deadline-ms", "600000", "--max-inflight", "1000000"],
        url,
        subjects.prefix,
    )
    try:
        await wait_roles(nc, subjects.prefix, {"coordinator"})
        messages, samples = encoded_chunks(subjects, streams, windows)
        expected = len(messages) // 20 * 2  # 20 chunks a window, 2 subtasks a window
        seen = 0
        done = asyncio.Event()

        async def on_task(_: Msg) -> None:
            nonlocal seen
            seen += 1
            if seen >= expected:
                done.set()

        await nc.subscribe(subjects.all_tasks(), cb=on_task)
        cpu0 = cpu_seconds(process.pid)
        began = time.perf_counter()
        await publish_all(nc, messages)
        await asyncio.wait_for(done.wait(), timeout=600)
        elapsed = time.perf_counter() - began
        cpu = cpu_seconds(process.pid) - cpu0
        rss, _ = memory_mb(process.pid)
    finally:
        process.terminate()
        await process.wait()
        await nc.drain()
    return samples / elapsed, expected / 2 / elapsed, cpu / elapsed, rss


async def end_to_end(url: str, streams: int, windows: int) -> tuple[float, float]:
    """Returns decisions/s and the median decision latency (ms) with the whole pipeline."""
    subjects = Subjects(f"e2e{uuid.uuid4().hex[:8]}")
    nc = await connect(BusSettings(url=url, prefix=subjects.prefix), name="bench")
    await ensure_streams(nc.jetstream(), subjects, TopologySettings())
    processes = [
        await start(
            ["coordinator", "--deadline-ms", "30000", "--max-inflight", "100000"],
            url,
            subjects.prefix,
        ),
        await start(["agent", "--model", "accel"], url, subjects.prefix),
        await start(["agent", "--model", "gyro"], url, subjects.prefix),
        await start(["fusion"], url, subjects.prefix),
    ]
    try:
        await wait_roles(
            nc, subjects.prefix, {"coordinator", "fusion", "agent-accel", "agent-gyro"}
        )
        messages, _ = encoded_chunks(subjects, streams, windows)
        expected = len(messages) // 20
        latencies: list[float] = []
        done = asyncio.Event()

        async def on_decision(msg: Msg) -> None:
            from schemas import Decision, decode

            latencies.append(decode(msg.data, Decision).latency_ms)
            if len(latencies) >= expected:
                done.set()

        await follow_stored(nc, f"{subjects.prefix}.decision.*", on_decision)
        began = time.perf_counter()
        await publish_all(nc, messages)
        await asyncio.wait_for(done.wait(), timeout=600)
        elapsed = time.perf_counter() - began
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            await process.wait()
        await nc.drain()
    return expected / elapsed, statistics.median(latencies)


async def main_async(args: argparse.Namespace) -> None:
    with EmbeddedServer() as server:
        rows = []
        for streams in (1, 100, 1000):
            runs = [
                await coordinator_alone(server.url, streams, args.windows)
                for _ in range(args.repeats)
            ]
            rows.append((streams, *(statistics.median(r[i] for r in runs) for i in range(4))))
            print(
                f"  coordinator, {streams} streams: {rows[-1][1]:,.0f} samples/s",
                file=sys.stderr,
                flush=True,
            )
        e2e = [await end_to_end(server.url, 100, args.windows) for _ in range(args.repeats)]
    print(
        f"\nCoordinator ingestion alone ({args.windows} windows of 2 sensors x 100 samples x 3 channels, "
        f"1 s chunks; median of {args.repeats})\n"
    )
    print(
        "| streams | samples/s | windows/s | coordinator CPU (cores) | samples per CPU-s | RSS MB |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for streams, rate, windows_s, cpu, rss in rows:
        print(
            f"| {streams} | {rate:,.0f} | {windows_s:,.0f} | {cpu:.2f} | {rate / cpu:,.0f} | {rss:.0f} |"
        )
    base = rows[0][1]
    print("\nratio to 1 stream: " + ", ".join(f"{s} streams {r / base:.2f}x" for s, r, *_ in rows))
    rate = statistics.median(r[0] for r in e2e)
    latency = statistics.median(r[1] for r in e2e)
    print(
        f"\nEnd to end, 100 streams, LiteRT accel + gyro agents, weighted-mean fusion: "
        f"{rate:,.0f} decisions/s (median of {args.repeats}), median decision latency {latency:.0f} ms under that burst"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
