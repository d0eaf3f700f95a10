"""fusebus side by side with the in-process limit and a hand-written NATS pipeline.

    python -m bench [--frames 3000] [--repeats 3]

For each system: frames/s at maximum rate (median of ``--repeats``, at most ``--inflight``
frames in flight), latency p50/p99 from each frame's scheduled send time to its decision at
30, 200 and 1,000 frames/s (rates above 80% of capacity are skipped), CPU-ms per frame
summed over every process (nats-server included), RSS per process, and the time from
start to first decision. Then sharded coordinators (:mod:`bench.shards`): windows/s and
CPU-ms per window per component with 1, 2 and 4 shards, and 2 shards at R3. Then the
benchmark models as one stage against the same models cut into a two-stage chain
(:mod:`bench.chain`). Last, model rollout (:mod:`bench.rollout`): promotion to the last
replica serving, under load and idle, and the decision rate around it. Writes
``docs/benchmarks.md`` and ``docs/benchmarks-latency.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np
from nats.aio.client import Client
from nats.aio.msg import Msg

from bench.chain import ChainRun, measure_chain
from bench.chain_report import describe as describe_chain
from bench.chain_report import render_chain
from bench.procstat import cpu_seconds, memory_mb, spawn, stop_processes, stop_with_the_benchmark
from bench.rollout import RolloutRun, measure_rollout
from bench.rollout_report import describe as describe_rollout
from bench.rollout_report import render_rollout
from bench.shards import SCENARIOS, ShardMeasured, describe, measure_shards, render_shards
from bench.workload import SENSORS, TYPES, build_models, frames, plans_toml
from bus import BusSettings, EmbeddedServer, Subjects, connect, discover_agents, discover_components
from fusebus.logs import configure_logging
from schemas import SensorFrame, encode

ROOT = Path(__file__).resolve().parent.parent
RATES = (30, 200, 1000)
# Frame i of one stream starts at i * FRAME_STRIDE_NS (1 ns samples): frames of one stream
# must not overlap (the coordinator refuses an overlapping frame), and 1,000 > any window.
FRAME_STRIDE_NS = 1000


@dataclass
class Measured:
    """Everything measured for one system."""

    name: str
    frames_per_s: float = 0.0
    cpu_ms_per_frame: float = 0.0
    first_decision_s: float = 0.0
    latency: dict[int, tuple[float, float]] = field(default_factory=dict)  # rate -> (p50, p99) ms
    rss_mb: dict[str, float] = field(default_factory=dict)


class System:
    """A pipeline under test: processes to start, frames to send, decisions to read."""

    name = ""

    def __init__(self) -> None:
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, role: str, *argv: str) -> None:
        self.processes[role] = spawn(
            [sys.executable, *argv], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    async def start(self, url: str, nc: Client) -> None:
        raise NotImplementedError

    async def ready(self, nc: Client) -> None:
        raise NotImplementedError

    def encode(self, index: int, sensors: dict[str, np.ndarray]) -> tuple[str, bytes]:
        raise NotImplementedError

    def decision_subject(self) -> str:
        raise NotImplementedError

    def decided_index(self, data: bytes) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        stop_processes(self.processes.values())


class RawPipeline(System):
    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch = batch
        self.name = f"hand-written nats-py, LiteRT, {'batched up to 64' if batch > 1 else 'one frame per call'}"

    async def start(self, url: str, nc: Client) -> None:
        self._ready: set[str] = set()
        self._all_ready = asyncio.Event()

        async def on_ready(msg: Msg) -> None:
            self._ready.add(msg.subject.rsplit(".", 1)[1])
            if self._ready == {*TYPES, "fusion"}:
                self._all_ready.set()

        await nc.subscribe("raw.ready.*", cb=on_ready)
        await nc.flush()
        for t in TYPES:
            self.spawn(
                f"agent-{t}",
                "-m",
                "bench.raw",
                "agent",
                "--type",
                t,
                "--batch",
                str(self.batch),
                "--url",
                url,
            )
        self.spawn("fusion", "-m", "bench.raw", "fusion", "--url", url)

    async def ready(self, nc: Client) -> None:
        await self._all_ready.wait()

    def encode(self, index: int, sensors: dict[str, np.ndarray]) -> tuple[str, bytes]:
        body = {"id": index, "t": 0, **{s: sensors[s].tobytes() for s in SENSORS}}
        return "raw.frame", msgpack.packb(body)

    def decision_subject(self) -> str:
        return "raw.decision"

    def decided_index(self, data: bytes) -> int:
        return int(msgpack.unpackb(data)["id"])


class Fusebus(System):
    def __init__(self, replicas: int, *, durable_intake: bool = True) -> None:
        super().__init__()
        self.replicas = replicas
        self.durable_intake = durable_intake
        per_type = f"{replicas} replica{'s' if replicas > 1 else ''}/type"
        self.name = (
            f"fusebus default (JetStream tasks, LiteRT, micro-batching), {per_type}"
            if durable_intake
            else f"fusebus without durable intake (sensor data on core NATS), {per_type}"
        )
        self.subjects = Subjects("fb")

    async def start(self, url: str, nc: Client) -> None:
        folder = build_models()
        plans = Path(tempfile.mkdtemp(prefix="fusebus-bench-")) / "plans.toml"
        plans.write_text(plans_toml())
        common = ("--nats-url", url, "--log-level", "warning")
        intake = () if self.durable_intake else ("--no-durable-intake",)
        self.spawn(
            "coordinator", "-m", "fusebus", "coordinator", "--config", str(plans), *intake, *common
        )
        self.spawn("fusion", "-m", "fusebus", "fusion", *common)
        for t in TYPES:
            for r in range(self.replicas):
                self.spawn(
                    f"agent-{t}-{r}",
                    "-m",
                    "fusebus",
                    "agent",
                    "--model",
                    str(folder / f"{t}.tflite"),
                    *common,
                )

    async def ready(self, nc: Client) -> None:
        while True:
            roles = {
                (r.get("metadata") or {}).get("fusebus.role")
                for r in await discover_components(nc, prefix="fb", timeout_s=0.2)
            }
            agents = await discover_agents(nc, prefix="fb", timeout_s=0.2)
            if {"coordinator", "fusion"} <= roles and len(agents) == len(TYPES) * self.replicas:
                return

    def encode(self, index: int, sensors: dict[str, np.ndarray]) -> tuple[str, bytes]:
        frame = SensorFrame(
            stream="bench", t_ns=index * FRAME_STRIDE_NS, period_ns=1, sensors=sensors
        )
        return self.subjects.frame("bench"), encode(frame)

    def decision_subject(self) -> str:
        return self.subjects.decision("bench")

    def decided_index(self, data: bytes) -> int:
        from schemas import Decision, decode

        return decode(data, Decision).window.t_start_ns // FRAME_STRIDE_NS


class FusebusBasicMotions(Fusebus):
    """fusebus default with the shipped BasicMotions models (accel, gyro) on its TEST frames."""

    def __init__(self) -> None:
        super().__init__(1)
        self.name = "fusebus default, real BasicMotions models (accel + gyro, 100 x 3 each)"
        from fusebus.datasets import load_basicmotions

        dataset = load_basicmotions()
        self.cases = [
            {s: dataset.sensor_view(x, s) for s in dataset.sensors} for x in dataset.x_test
        ]

    async def start(self, url: str, nc: Client) -> None:
        common = ("--nats-url", url, "--log-level", "warning")
        self.spawn(
            "coordinator",
            "-m",
            "fusebus",
            "coordinator",
            "--plan",
            "basicmotions",
            "--max-inflight",
            "100000",
            *common,
        )
        self.spawn("fusion", "-m", "fusebus", "fusion", *common)
        for t in ("accel", "gyro"):
            self.spawn(f"agent-{t}", "-m", "fusebus", "agent", "--model", t, *common)

    async def ready(self, nc: Client) -> None:
        while True:
            roles = {
                (r.get("metadata") or {}).get("fusebus.role")
                for r in await discover_components(nc, prefix="fb", timeout_s=0.2)
            }
            if {"coordinator", "fusion"} <= roles and len(
                await discover_agents(nc, prefix="fb", timeout_s=0.2)
            ) == 2:
                return

    def encode(self, index: int, sensors: dict[str, np.ndarray]) -> tuple[str, bytes]:
        frame = SensorFrame(
            stream="bench",
            t_ns=index * FRAME_STRIDE_NS,
            period_ns=1,
            sensors=self.cases[index % len(self.cases)],
        )
        return self.subjects.frame("bench"), encode(frame)


class Run:
    """Sends frames of one system and matches decisions to their scheduled send times."""

    def __init__(self, system: System, nc: Client) -> None:
        self.system = system
        self.nc = nc
        self.scheduled: dict[int, float] = {}
        self.latencies: list[float] = []
        self.decided = 0
        self.changed = asyncio.Event()
        self.next_index = 1
        self.data = frames(64)

    async def listen(self) -> None:
        loop = asyncio.get_running_loop()

        async def on_decision(msg: Msg) -> None:
            index = self.system.decided_index(msg.data)
            sent = self.scheduled.pop(index, None)
            if sent is not None:
                self.latencies.append((loop.time() - sent) * 1e3)
                self.decided += 1
                self.changed.set()

        await self.nc.subscribe(self.system.decision_subject(), cb=on_decision)

    def prepared(self, count: int) -> list[tuple[int, str, bytes]]:
        out = []
        for _ in range(count):
            index = self.next_index
            self.next_index += 1
            out.append((index, *self.system.encode(index, self.data[index % len(self.data)])))
        return out

    async def wait_decided(self, target: int, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            while self.decided < target:
                self.changed.clear()
                await self.changed.wait()

    async def max_rate(self, count: int, inflight: int) -> float:
        messages = self.prepared(count)
        loop = asyncio.get_running_loop()
        start_decided = self.decided
        began = loop.time()
        for index, subject, data in messages:
            while index - 1 - (self.decided - start_decided) - (messages[0][0] - 1) >= inflight:
                self.changed.clear()
                await self.changed.wait()
            self.scheduled[index] = loop.time()
            await self.nc.publish(subject, data)
        await self.wait_decided(start_decided + count, 120)
        return count / (loop.time() - began)

    async def fixed_rate(self, rate: int, seconds: float) -> tuple[float, float]:
        count = max(60, int(rate * seconds))
        messages = self.prepared(count)
        loop = asyncio.get_running_loop()
        self.latencies = []
        start_decided = self.decided
        began = loop.time()
        for i, (index, subject, data) in enumerate(messages):
            due = began + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self.scheduled[index] = due
            await self.nc.publish(subject, data)
        await self.wait_decided(start_decided + count, 120)
        return float(np.percentile(self.latencies, 50)), float(np.percentile(self.latencies, 99))


async def measure(system: System, server: EmbeddedServer, args: argparse.Namespace) -> Measured:
    result = Measured(system.name)
    nc = await connect(BusSettings(url=server.url), name="bench-driver")
    run = Run(system, nc)
    await run.listen()
    began = time.perf_counter()
    await system.start(server.url, nc)
    try:
        # Time to first decision: keep sending a frame every 20 ms from the moment of start.
        first = asyncio.get_running_loop().create_task(run.wait_decided(1, 120))
        while not first.done():
            for index, subject, data in run.prepared(1):
                run.scheduled[index] = asyncio.get_running_loop().time()
                await nc.publish(subject, data)
            await asyncio.sleep(0.02)
        result.first_decision_s = time.perf_counter() - began
        await system.ready(nc)
        await asyncio.sleep(1.0)
        run.scheduled.clear()
        base = run.decided = 0
        del base
        pids = [p.pid for p in system.processes.values()] + [server.pid or 0]
        rates, cpus = [], []
        for _ in range(args.repeats):
            cpu0 = sum(cpu_seconds(pid) for pid in pids)
            rates.append(await run.max_rate(args.frames, args.inflight))
            cpus.append((sum(cpu_seconds(pid) for pid in pids) - cpu0) * 1e3 / args.frames)
        result.frames_per_s = statistics.median(rates)
        result.cpu_ms_per_frame = statistics.median(cpus)
        print(
            f"    {system.name}: frames/s {', '.join(f'{r:,.0f}' for r in rates)}; "
            f"CPU-ms/frame {', '.join(f'{c:.3f}' for c in cpus)}",
            file=sys.stderr,
            flush=True,
        )
        for rate in RATES:
            if rate <= 0.8 * result.frames_per_s:
                result.latency[rate] = await run.fixed_rate(rate, args.seconds)
        for role, process in system.processes.items():
            result.rss_mb[role] = memory_mb(process.pid)[0]
    finally:
        system.stop()
        await nc.drain()
    return result


def limit(runtime: str, batch: int, count: int) -> Measured:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.limit",
            "--runtime",
            runtime,
            "--batch",
            str(batch),
            "--frames",
            str(count),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    values = json.loads(done.stdout.strip().splitlines()[-1])
    name = f"in-process limit, {'LiteRT' if runtime == 'litert' else 'TensorFlow tf.function'}, {'batched 64' if batch > 1 else 'one frame per call'}"
    return Measured(
        name,
        values["frames_per_s"],
        values["cpu_ms_per_frame"],
        values["first_decision_s"],
        {},
        {"process": values["rss_mb"]},
    )


def render(
    results: list[Measured],
    raw_batched: Measured,
    fusebus_default: Measured,
    core_intake: Measured | None = None,
) -> str:
    lines = [
        "# fusebus benchmarks",
        "",
        "Made by `python -m bench` on one 2-core machine, in one run. Workload: 3 sensors,",
        "windows of 128 samples x 3 axes (float32), 3 agent types each a small Conv1D with 6",
        "classes (seeded random weights), weighted-mean fusion. Latency is from each frame's",
        "scheduled send time to its decision; rates above 80% of a system's capacity are skipped.",
        "",
        "| system | frames/s (max) | x limit LiteRT batched | x hand-written batched | p50/p99 ms @30 | @200 | @1000 | CPU-ms/frame | first decision s | RSS MB per process |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    limit_batched = next(
        r for r in results if r.name.startswith("in-process limit, LiteRT, batched")
    )
    for r in results:
        lat = [
            f"{r.latency[rate][0]:.1f} / {r.latency[rate][1]:.1f}" if rate in r.latency else "-"
            for rate in RATES
        ]
        rss = ", ".join(f"{k} {v:.0f}" for k, v in r.rss_mb.items())
        lines.append(
            f"| {r.name} | {r.frames_per_s:,.0f} | {r.frames_per_s / limit_batched.frames_per_s:.2f} | "
            f"{r.frames_per_s / raw_batched.frames_per_s:.2f} | {' | '.join(lat)} | {r.cpu_ms_per_frame:.3f} | "
            f"{r.first_decision_s:.2f} | {rss} |"
        )
    p99 = (
        fusebus_default.latency.get(200, (0, 0))[1] / raw_batched.latency.get(200, (0, 1))[1]
        if 200 in raw_batched.latency
        else float("nan")
    )
    lines += [
        "",
        f"fusebus default / hand-written batched, max rate: **{fusebus_default.frames_per_s / raw_batched.frames_per_s:.2f}x** (target 0.6x); "
        f"p99 at 200 frames/s: **{p99:.2f}x** the hand-written pipeline's (target at most 2x).",
        "",
    ]
    if core_intake is not None:
        lines += [
            "Durable intake (sensor data through the INTAKE work queue, acked at durability "
            f"points) against core NATS intake: max rate **{fusebus_default.frames_per_s:,.0f}** "
            f"against {core_intake.frames_per_s:,.0f} frames/s "
            f"(**{fusebus_default.frames_per_s / core_intake.frames_per_s:.2f}x**), "
            f"CPU-ms per frame **{fusebus_default.cpu_ms_per_frame:.3f}** against "
            f"{core_intake.cpu_ms_per_frame:.3f} "
            f"(**{fusebus_default.cpu_ms_per_frame / core_intake.cpu_ms_per_frame:.2f}x**).",
            "",
        ]
    lines += [
        "![latency against offered load](benchmarks-latency.png)",
    ]
    return "\n".join(lines) + "\n"


def draw(results: list[Measured], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=120)
    for r in results:
        if r.latency:
            rates = sorted(r.latency)
            axes.plot(rates, [r.latency[x][1] for x in rates], marker="o", label=f"{r.name} (p99)")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("offered load, frames/s")
    axes.set_ylabel("latency p99, ms")
    axes.legend(fontsize=6)
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


async def main_async(args: argparse.Namespace) -> None:
    only = set(args.only.split(",")) if args.only else None
    if only is None or only - {"rollout"}:  # the rollout runs the shipped models
        build_models()
    results = []
    if only is None or "limit" in only:
        results = [limit(rt, b, args.frames) for rt in ("litert", "tf") for b in (1, 64)]
    for r in results:
        print(f"  {r.name}: {r.frames_per_s:,.0f} frames/s", file=sys.stderr, flush=True)
    systems: dict[str, Callable[[], System]] = {
        "raw1": lambda: RawPipeline(1),
        "raw64": lambda: RawPipeline(64),
        "fusebus1": lambda: Fusebus(1),
        "fusebus1-core": lambda: Fusebus(1, durable_intake=False),
        "fusebus2": lambda: Fusebus(2),
        "fusebus4": lambda: Fusebus(4),
        "basicmotions": FusebusBasicMotions,
    }
    measured = {}
    for key, make in systems.items():
        if only is not None and key not in only:
            continue
        system = make()
        with EmbeddedServer() as server:
            measured[system.name] = await measure(system, server, args)
        print(
            f"  {system.name}: {measured[system.name].frames_per_s:,.0f} frames/s",
            file=sys.stderr,
            flush=True,
        )
    results += list(measured.values())
    sharded: list[ShardMeasured] = []
    for key, (shards, replicas) in SCENARIOS.items():
        if only is not None and key not in only:
            continue
        sharded.append(
            await measure_shards(
                shards,
                replicas=replicas,
                windows=args.frames,
                repeats=args.repeats,
                inflight=args.inflight,
                rate=args.shard_rate,
            )
        )
    chained: ChainRun | None = None
    if only is None or "chain" in only:
        chained = await measure_chain(
            frames_count=args.frames,
            repeats=args.repeats,
            inflight=args.inflight,
            seconds=args.seconds,
        )
    rolled: RolloutRun | None = None
    if only is None or "rollout" in only:
        rolled = await measure_rollout(
            replicas=args.rollout_replicas,
            rate=args.rollout_rate,
            promotions=args.promotions,
            idle_promotions=args.idle_promotions,
            window_s=args.rollout_window_s,
        )
    raw_batched = next((r for r in results if "batched up to 64" in r.name), None)
    fusebus_default = next(
        (r for r in results if r.name.startswith("fusebus default") and "1 replica/" in r.name),
        None,
    )
    core = next((r for r in results if "without durable intake" in r.name), None)
    if only is not None:  # a partial run: figures on the terminal, the docs left alone
        for r in results:
            print(
                f"{r.name}: {r.frames_per_s:,.0f} frames/s, {r.cpu_ms_per_frame:.3f} CPU-ms/frame"
            )
        if fusebus_default is not None and core is not None:
            print(
                f"durable intake / core intake: {fusebus_default.frames_per_s / core.frames_per_s:.2f}x "
                f"frames/s, {fusebus_default.cpu_ms_per_frame / core.cpu_ms_per_frame:.2f}x CPU-ms/frame"
            )
        for m in sharded:
            print(describe(m))
        if sharded:
            print("\n" + render_shards(sharded, args.repeats))
        if chained is not None:
            print(describe_chain(chained))
            print("\n" + render_chain(chained))
        if rolled is not None:
            print(describe_rollout(rolled))
            print("\n" + render_rollout(rolled))
        return
    assert raw_batched is not None and fusebus_default is not None
    table = render(results, raw_batched, fusebus_default, core)
    if sharded:
        table += "\n" + render_shards(sharded, args.repeats)
    if chained is not None:
        table += "\n" + render_chain(chained)
    if rolled is not None:
        table += "\n" + render_rollout(rolled)
    print(table)
    docs = ROOT / "docs"
    (docs / "benchmarks.md").write_text(table, encoding="utf-8")
    draw(results, docs / "benchmarks-latency.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=3000, help="frames per max-rate run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--inflight", type=int, default=512, help="most frames in flight at max rate"
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each fixed-rate run")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated systems to measure (limit, raw1, raw64, fusebus1, fusebus1-core, "
        "fusebus2, fusebus4, basicmotions, shards1, shards2, shards4, shards2-r3, chain, "
        "rollout); a "
        "partial run prints its figures and leaves docs/ alone",
    )
    parser.add_argument(
        "--shard-rate",
        type=float,
        default=300.0,
        help="windows/s of the sharded scenarios' fixed-rate phase (at most 80%% of their max)",
    )
    rollout = parser.add_argument_group("rollout (see bench/rollout.py)")
    rollout.add_argument(
        "--promotions", type=int, default=10, help="promotions under load (default: 10)"
    )
    rollout.add_argument(
        "--idle-promotions", type=int, default=8, help="promotions with no load (default: 8)"
    )
    rollout.add_argument(
        "--rollout-replicas", type=int, default=3, help="accel replicas following the registry"
    )
    rollout.add_argument(
        "--rollout-rate", type=float, default=200.0, help="frames/s of the load (default: 200)"
    )
    rollout.add_argument(
        "--rollout-window-s",
        type=float,
        default=1.5,
        help="seconds of decisions counted on each side of a promotion (default: 1.5)",
    )
    args = parser.parse_args()
    configure_logging(level="warning")  # the driver's own registry calls log at info
    stop_with_the_benchmark()
    try:
        asyncio.run(main_async(args))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: every run stopped what it started
        print("bench: stopped", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
