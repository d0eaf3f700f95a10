"""Model chains: the benchmark models as one stage, and the same models cut in two stages.

The chain cuts each benchmark model after its pooling (:mod:`bench.split_models`):
``<type>_enc`` reads the sensor and answers 32 features, ``<type>`` (the Dense head) reads
them and answers the class scores, with the same weights, so it computes what the one-stage
model does and fuses the same three types. What it adds is the bus: per frame, three more
subtasks and results, and on each frame's path one more trip coordinator -> agent ->
coordinator.

A third deployment is the yardstick for what that should cost: one stage with the three
heads beside the models (``<type>_head``), each reading its features from a sensor of the
frame, all six types fused. It has the chain's three more subtasks and results per frame,
with about the same payloads and the same compute, but nothing sequential and no stage
bookkeeping. What the chain adds to one stage, over what the yardstick adds, is the second
stage counted in hops (1.0: one more hop per model, as cheap as any other).

The three deployments run at once, each on its own embedded nats-server (one coordinator,
one fusion agent, one LiteRT agent per type), and are measured in turns so that they see
the same noise. Per repeat: frames/s at maximum rate (at most ``--inflight`` in flight)
with CPU-ms per frame by component (nats-server included) and the server's messages per
frame (``/varz`` in + out, the driver's frames and decisions included); then at 30 and 200
frames/s, latency p50/p99 from each frame's scheduled send time to its decision and CPU-ms
per frame. Last, a traced run at 30 frames/s (not counted in the figures above), where the
driver also watches every subtask and result, times each leg of a frame's path.

    python -m bench --only chain [--frames 3000] [--repeats 3] [--seconds 2]

The figures are printed by :mod:`bench.chain_report`.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from nats.aio.client import Client
from nats.aio.msg import Msg

from bench.procstat import cpu_seconds, memory_mb, spawn, stop_processes
from bench.split_models import (
    build_split_models,
    encoder,
    features_sensor,
    head,
    model_us_per_frame,
)
from bench.workload import SAMPLES, SEED, SENSORS, TYPES, build_models, frames
from bus import BusSettings, EmbeddedServer, Subjects, connect, discover_agents, free_port
from fusebus.status import collect_status
from schemas import (
    CODEC,
    Decision,
    Result,
    ResultBatch,
    SensorFrame,
    Subtask,
    SubtaskBatch,
    decode,
    encode,
)

ROOT = Path(__file__).resolve().parent.parent
RATES = (30, 200)  # frames/s offered for latency
TRACE_RATE = 30  # frames/s of the traced run
STRIDE_NS = 1000  # frame i starts at i * STRIDE_NS (1 ns samples: frames never overlap)
#: Deployment kinds: the models as one stage, with the heads beside them, and cut in two.
KINDS = {
    "one": "one stage",
    "beside": "one stage + the heads fed from the frame (6 types)",
    "chain": "two-stage chain",
}
#: CPU is counted by component; "added agents" are the heads (of the chain, or beside).
COMPONENTS = ("coordinator", "fusion", "agents", "added agents", "nats-server")
#: The legs of a frame's path that the traced run times, in order.
LEGS = ("to subtasks", "stage 1 trip", "coordinator turn", "stage 2 trip", "to decision")


def plans_toml(kind: str, *, deadline_ms: float = 5000, max_inflight: int = 100_000) -> str:
    """A plans file for a deployment ``kind`` (see :data:`KINDS`): each type reads its
    sensor; ``beside``, each head too reads its features sensor; with ``chain`` each type
    reads its encoder, which reads the sensor."""
    lines = ["[default]", f"deadline_ms = {deadline_ms}", f"max_inflight = {max_inflight}", ""]
    for type_name, sensor in zip(TYPES, SENSORS, strict=True):
        reads = f'sensors = ["{sensor}"]'
        if kind == "chain":
            lines += [f"[default.subtasks.{encoder(type_name)}]", reads, ""]
            reads = f'after = ["{encoder(type_name)}"]'
        lines += [f"[default.subtasks.{type_name}]", reads, ""]
        if kind == "beside":
            reads = f'sensors = ["{features_sensor(type_name)}"]'
            lines += [f"[default.subtasks.{head(type_name)}]", reads, ""]
    return "\n".join(lines)


class Deployment:
    """One fusebus deployment of a ``kind`` (see :data:`KINDS`) on its own server: a
    coordinator, a fusion agent, and one LiteRT agent per type."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.name = KINDS[kind]
        self.server = EmbeddedServer(monitor_port=free_port())
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.folder = Path(tempfile.mkdtemp(prefix="fusebus-bench-chain-"))  # plans, logs
        self.added: set[str] = set()  # roles counted as added agents

    def spawn(self, role: str, *argv: str) -> None:
        with (self.folder / f"{role}.log").open("wb") as log:
            self.processes[role] = spawn(
                [sys.executable, "-m", "fusebus", *argv],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def check_running(self) -> None:
        """Raises RuntimeError naming a process that has exited, with the end of its log."""
        for role, process in self.processes.items():
            if process.poll() is not None:
                tail = (self.folder / f"{role}.log").read_text(errors="replace")[-1500:]
                raise RuntimeError(f"{self.name}: {role} exited with {process.returncode}:\n{tail}")

    def start(self) -> None:
        self.server.start()
        plans = self.folder / "plans.toml"
        plans.write_text(plans_toml(self.kind))
        common = ("--nats-url", self.server.url, "--log-level", "warning")
        self.spawn("coordinator", "coordinator", "--config", str(plans), *common)
        self.spawn("fusion", "fusion", *common)
        whole, split = build_models(), build_split_models()
        agents: list[tuple[str, Path, bool]] = []  # type, model, added
        for t in TYPES:
            if self.kind == "chain":
                agents += [(encoder(t), split / f"{encoder(t)}.tflite", False)]
                agents += [(t, split / f"{t}.tflite", True)]
            else:
                agents += [(t, whole / f"{t}.tflite", False)]
                if self.kind == "beside":
                    agents += [(head(t), split / f"{head(t)}.tflite", True)]
        for type_name, model, added in agents:
            role = f"agent-{type_name}"
            self.spawn(role, "agent", "--model", str(model), "--type", type_name, *common)
            if added:
                self.added.add(role)

    @property
    def agent_count(self) -> int:
        return len(TYPES) * (1 if self.kind == "one" else 2)

    @property
    def upstream(self) -> dict[str, str]:
        """Each type of the plan, with the type it reads after ("" for none)."""
        if self.kind == "chain":
            return {**{encoder(t): "" for t in TYPES}, **{t: encoder(t) for t in TYPES}}
        return {
            name: "" for t in TYPES for name in (t, head(t))[: 2 if self.kind == "beside" else 1]
        }

    def frame_data(self) -> list[dict[str, np.ndarray]]:
        """The frames to send: the workload's, and beside the models the heads' features."""
        data = frames(64)
        if self.kind != "beside":
            return data
        rng = np.random.default_rng(SEED)
        return [
            {
                **frame,
                **{
                    features_sensor(t): rng.standard_normal((SAMPLES, 1)).astype(np.float32)
                    for t in TYPES
                },
            }
            for frame in data
        ]

    def component(self, role: str) -> str:
        """The component a process counts under."""
        if role.startswith("agent-"):
            return "added agents" if role in self.added else "agents"
        return role

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds used so far by component."""
        out = dict.fromkeys(COMPONENTS, 0.0)
        for role, process in self.processes.items():
            out[self.component(role)] += cpu_seconds(process.pid)
        out["nats-server"] = cpu_seconds(self.server.pid or 0)
        return out

    def stop(self) -> None:
        stop_processes(self.processes.values())
        self.server.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def _window_starts(message: Subtask | SubtaskBatch | Result | ResultBatch) -> list[int]:
    if isinstance(message, Subtask | Result):
        return [message.window.t_start_ns]
    return [int(t) for t in message.windows[:, 0]]


class Driver:
    """Sends frames of one stream to a deployment and matches decisions to their
    scheduled send times."""

    def __init__(self, nc: Client, data: list[dict[str, np.ndarray]]) -> None:
        self.nc = nc
        self.subjects = Subjects("fb")
        self.sent = 0
        self.decided = 0
        self.scheduled: dict[int, float] = {}  # frame start ns -> scheduled send time
        self.latencies_ms: list[float] = []
        self.changed = asyncio.Event()
        self.data = data
        self.seen: dict[int, dict[tuple[str, str], float]] | None = None  # while tracing

    async def listen(self) -> None:
        loop = asyncio.get_running_loop()

        async def on_decision(msg: Msg) -> None:
            t_ns = decode(msg.data, Decision).window.t_start_ns
            sent = self.scheduled.pop(t_ns, None)
            if sent is not None:
                self.latencies_ms.append((loop.time() - sent) * 1e3)
                self.decided += 1
                if self.seen is not None:
                    self.seen.setdefault(t_ns, {})[("decision", "")] = loop.time()
                self.changed.set()

        await self.nc.subscribe(self.subjects.decision("bench"), cb=on_decision)
        await self.nc.flush()

    def prepared(self, count: int) -> list[tuple[int, bytes]]:
        """The next ``count`` frames, encoded before the clock starts."""
        out = []
        for _ in range(count):
            self.sent += 1
            frame = SensorFrame(
                stream="bench",
                t_ns=self.sent * STRIDE_NS,
                period_ns=1,
                sensors=self.data[self.sent % len(self.data)],
            )
            out.append((frame.t_ns, encode(frame)))
        return out

    async def send(self, count: int, *, inflight: int, rate: float | None = None) -> float:
        """Send ``count`` frames, at most ``inflight`` undecided (and at ``rate`` frames/s
        when given), wait for their decisions; returns the seconds it took."""
        messages = self.prepared(count)
        subject = self.subjects.frame("bench")
        loop = asyncio.get_running_loop()
        target = self.decided + count
        self.latencies_ms = []
        began = loop.time()
        for i, (t_ns, data) in enumerate(messages):
            due = loop.time()
            if rate is not None:
                due = began + i / rate
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
            while len(self.scheduled) >= inflight:
                self.changed.clear()
                await self.changed.wait()
            self.scheduled[t_ns] = due
            if self.seen is not None:
                self.seen.setdefault(t_ns, {})[("sent", "")] = due
            await self.nc.publish(subject, data)
        async with asyncio.timeout(120):
            while self.decided < target:
                self.changed.clear()
                await self.changed.wait()
        return loop.time() - began

    async def trace(self, count: int, *, rate: float, upstream: dict[str, str]) -> Trace:
        """Send ``count`` frames at ``rate`` while watching every subtask and result, and
        time each leg of each frame's path (``upstream``: each type, with the type it
        reads after, or "")."""
        loop = asyncio.get_running_loop()
        seen: dict[int, dict[tuple[str, str], float]] = {}  # frame -> (what, type) -> time

        async def on_task(msg: Msg) -> None:
            at = loop.time()
            message: Subtask | SubtaskBatch = CODEC.decode_one_of(msg.data, (Subtask, SubtaskBatch))
            for t_ns in _window_starts(message):
                seen.setdefault(t_ns, {}).setdefault(("task", message.type), at)

        async def on_result(msg: Msg) -> None:
            at = loop.time()
            message: Result | ResultBatch = CODEC.decode_one_of(msg.data, (Result, ResultBatch))
            for t_ns in _window_starts(message):
                seen.setdefault(t_ns, {}).setdefault(("result", message.type), at)

        subs = [
            await self.nc.subscribe(self.subjects.all_tasks(), cb=on_task),
            await self.nc.subscribe(self.subjects.all_results(), cb=on_result),
        ]
        await self.nc.flush()
        first = self.sent + 1
        self.seen = seen
        try:
            await self.send(count, inflight=count, rate=rate)
        finally:
            self.seen = None
            for sub in subs:
                await sub.unsubscribe()
        return Trace.of(seen, range(first, first + count), upstream)


@dataclass
class Trace:
    """Milliseconds of each leg of each frame's path (per type where a leg is per type)."""

    legs: dict[str, list[float]]

    @classmethod
    def of(
        cls, seen: dict[int, dict[tuple[str, str], float]], frames: range, upstream: dict[str, str]
    ) -> Trace:
        """From the first time each frame was sent, each of its subtasks and results was
        seen, and its decision came."""
        first = [t for t, up in upstream.items() if not up]
        second = [t for t, up in upstream.items() if up]
        fused = [t for t in upstream if t not in set(upstream.values())]
        legs: dict[str, list[float]] = {leg: [] for leg in LEGS}

        def ms(since: float, until: float) -> float:
            return (until - since) * 1e3

        for index in frames:
            at = seen[index * STRIDE_NS]
            sent, decided = at[("sent", "")], at[("decision", "")]
            legs["to subtasks"].append(ms(sent, min(at[("task", t)] for t in first)))
            legs["stage 1 trip"] += [ms(at[("task", t)], at[("result", t)]) for t in first]
            for t in second:
                legs["coordinator turn"].append(ms(at[("result", upstream[t])], at[("task", t)]))
                legs["stage 2 trip"].append(ms(at[("task", t)], at[("result", t)]))
            legs["to decision"].append(ms(max(at[("result", t)] for t in fused), decided))
        return cls({leg: values for leg, values in legs.items() if values})

    def p50(self, leg: str) -> float:
        values = self.legs.get(leg)
        return float(np.percentile(values, 50)) if values else float("nan")

    @property
    def stage_ms(self) -> tuple[float, float]:
        """The p50 ms of reaching and running the first stage (to subtasks + stage 1 trip),
        and of the second (coordinator turn + stage 2 trip; nan without one)."""
        first = self.p50("to subtasks") + self.p50("stage 1 trip")
        return first, self.p50("coordinator turn") + self.p50("stage 2 trip")


@dataclass
class Phase:
    """One measured interval: frames decided, seconds, CPU-s by component, server messages,
    latencies."""

    frames: int
    seconds: float
    cpu_s: dict[str, float]
    server_msgs: float  # in + out
    latencies_ms: list[float]

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds

    def cpu_ms_per_frame(self, component: str = "total") -> float:
        if component == "total":
            return sum(self.cpu_s.values()) * 1e3 / self.frames
        return self.cpu_s[component] * 1e3 / self.frames

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q))


@dataclass
class ChainMeasured:
    """Everything measured for one deployment: per repeat a max-rate phase and a phase at
    each of :data:`RATES`; then one traced run."""

    name: str
    max_rate: list[Phase] = field(default_factory=list)
    fixed_rate: dict[int, list[Phase]] = field(default_factory=lambda: {r: [] for r in RATES})
    trace: Trace | None = None
    rss_mb: dict[str, float] = field(default_factory=dict)

    def values(self, figure: str) -> list[float]:
        """One value per repeat: ``frames_per_s``, ``msgs`` (server messages in + out per
        frame), ``cpu`` (CPU-ms per frame, all components) or ``cpu:<component>`` at maximum
        rate; ``p50@<rate>``, ``p99@<rate>`` or ``cpu@<rate>`` at a fixed rate."""
        what, _, rate = figure.partition("@")
        phases = self.fixed_rate[int(rate)] if rate else self.max_rate
        if what == "frames_per_s":
            return [p.frames_per_s for p in phases]
        if what in ("p50", "p99"):
            return [p.percentile(float(what[1:])) for p in phases]
        if what == "cpu":
            return [p.cpu_ms_per_frame() for p in phases]
        if what.startswith("cpu:"):
            return [p.cpu_ms_per_frame(what[4:]) for p in phases]
        if what == "msgs":
            return [p.server_msgs / p.frames for p in phases]
        raise ValueError(f"unknown figure {figure!r}")


async def phase(
    deployment: Deployment, driver: Driver, count: int, *, inflight: int, rate: float | None = None
) -> Phase:
    """Measure one interval of ``count`` frames."""
    cpu0, varz0 = deployment.cpu_s(), deployment.server.varz()
    seconds = await driver.send(count, inflight=inflight, rate=rate)
    cpu1, varz1 = deployment.cpu_s(), deployment.server.varz()
    messages = sum(float(varz1[k]) - float(varz0[k]) for k in ("in_msgs", "out_msgs"))
    return Phase(
        frames=count,
        seconds=seconds,
        cpu_s={k: cpu1[k] - cpu0[k] for k in cpu1},
        server_msgs=messages,
        latencies_ms=list(driver.latencies_ms),
    )


async def ready(deployment: Deployment, nc: Client) -> None:
    """Wait until the coordinator, the fusion agent and every agent answer discovery."""
    async with asyncio.timeout(120):
        while True:
            deployment.check_running()
            status = await collect_status(nc, prefix="fb", timeout_s=0.3)
            roles = {role for role, _ in status.components}
            agents = await discover_agents(nc, prefix="fb", timeout_s=0.2)
            if {"coordinator", "fusion"} <= roles and len(agents) == deployment.agent_count:
                return


@dataclass
class ChainRun:
    """One run: each deployment kind's figures, and the models' compute without the bus."""

    measured: dict[str, ChainMeasured]  # by kind (see KINDS)
    model_us: dict[int, tuple[float, float]]  # batch -> µs per frame, (whole, cut in two)
    repeats: int

    def ratios(self, kind: str, base: str, figure: str) -> list[float]:
        """``kind`` over ``base``, repeat by repeat (the two measured back to back)."""
        pairs = zip(
            self.measured[kind].values(figure), self.measured[base].values(figure), strict=True
        )
        return [k / b for k, b in pairs]

    def added(self, kind: str, figure: str) -> list[float]:
        """What ``kind`` adds to one stage, repeat by repeat."""
        pairs = zip(
            self.measured[kind].values(figure), self.measured["one"].values(figure), strict=True
        )
        return [k - b for k, b in pairs]

    def latency_in_hops(self) -> float:
        """The chain's second stage over its first, in p50 ms of the traced run: 1.0 is one
        more hop like the one that brings a frame's subtasks to their agents and back."""
        trace = self.measured["chain"].trace
        if trace is None:
            return float("nan")
        first, second = trace.stage_ms
        return second / first

    def in_hops(self, figure: str) -> list[float]:
        """What the second stage adds to one stage, over what three more subtasks and
        results per frame add without a chain (``beside``), repeat by repeat: 1.0 is one
        more hop per model."""
        pairs = zip(self.added("chain", figure), self.added("beside", figure), strict=True)
        return [c / b if b > 0 else float("nan") for c, b in pairs]


async def measure_chain(
    *, frames_count: int, repeats: int, inflight: int, seconds: float
) -> ChainRun:
    """Start the three deployments side by side and measure them in turns (the order
    rotates between repeats), then trace each once."""
    model_us = {batch: model_us_per_frame(batch) for batch in (1, 64)}  # nothing else runs yet
    deployments = [Deployment(kind) for kind in KINDS]
    results = [ChainMeasured(d.name) for d in deployments]
    async with AsyncExitStack() as stack:
        drivers = []
        for deployment in deployments:
            stack.callback(deployment.stop)
            deployment.start()
            nc = await connect(BusSettings(url=deployment.server.url), name="bench-driver")
            stack.push_async_callback(nc.drain)
            drivers.append(Driver(nc, deployment.frame_data()))
        for deployment, driver in zip(deployments, drivers, strict=True):
            await driver.listen()
            await ready(deployment, driver.nc)
            await driver.send(512, inflight=inflight)  # warm-up: consumers, journal, buckets
        for repeat in range(repeats):
            turn = [(i + repeat) % len(deployments) for i in range(len(deployments))]
            for i in turn:
                phased = await phase(deployments[i], drivers[i], frames_count, inflight=inflight)
                results[i].max_rate.append(phased)
            for rate in RATES:
                for i in turn:
                    count = max(100, int(rate * seconds))
                    phased = await phase(
                        deployments[i], drivers[i], count, inflight=inflight, rate=rate
                    )
                    results[i].fixed_rate[rate].append(phased)
            for i in turn:
                print(f"    {_progress(results[i])}", file=sys.stderr, flush=True)
        for deployment, driver, result in zip(deployments, drivers, results, strict=True):
            count = max(100, int(TRACE_RATE * seconds))
            result.trace = await driver.trace(count, rate=TRACE_RATE, upstream=deployment.upstream)
            deployment.check_running()
            for role, process in deployment.processes.items():
                result.rss_mb[role] = memory_mb(process.pid)[0]
    return ChainRun(dict(zip(KINDS, results, strict=True)), model_us, repeats)


def _progress(m: ChainMeasured) -> str:
    at = "; ".join(
        f"@{r}/s p50/p99 {m.values(f'p50@{r}')[-1]:.1f}/{m.values(f'p99@{r}')[-1]:.1f} ms"
        for r in RATES
    )
    return f"{m.name}: {m.values('frames_per_s')[-1]:,.0f} frames/s, {m.values('cpu')[-1]:.3f} CPU-ms/frame; {at}"
