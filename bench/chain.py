"""Model chains: the benchmark models as one stage, and the same models cut in two stages.

Each benchmark model (:mod:`bench.workload`: Conv1D, Conv1D, pooling, Dense) is cut after
its pooling: ``<type>_enc`` reads the sensor and answers the 32 pooled features, and
``<type>`` (a head, the Dense layer) reads them and answers the class scores, so the chain
computes what the one-stage model does (checked at build), with the same weights, and fuses
the same three types. What the chain adds is the bus: per frame, three more subtasks and
results, and on each frame's path one more trip coordinator -> agent -> coordinator.

A third deployment is the yardstick for that: one stage plus the three heads beside it,
each reading its features from a sensor of the frame (``<type>_head``: the same Dense
layer behind a crop and a flatten, since a frame's sensors all have 128 samples: 128 x 1
values in, the first 32 read), all six types fused. It has the chain's three more subtasks
and results per frame, with about the same payloads and the same compute, but nothing
sequential and no stage bookkeeping. What the chain adds to one stage, over what the
yardstick adds, is the second stage counted in hops (1.0: one more hop coordinator ->
agent -> coordinator per model, as cheap as any other).

The three deployments run at once, each on its own embedded nats-server (one coordinator,
one fusion agent, one LiteRT agent per type), and are measured in turns, so that they see
the same noise: per repeat, frames/s at maximum rate (at most ``--inflight`` in flight)
with CPU-ms per frame by component (nats-server included) and the server's messages per
frame (``/varz`` in + out, the driver's frames and decisions included); then latency
p50/p99 from each frame's scheduled send time to its decision at 200 frames/s, with
CPU-ms per frame at that rate.

    python -m bench --only chain [--frames 3000] [--repeats 3] [--seconds 2]
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from nats.aio.client import Client
from nats.aio.msg import Msg

from bench.procstat import cpu_seconds, memory_mb, stop_processes
from bench.workload import (
    LABELS,
    SAMPLES,
    SEED,
    SENSORS,
    TYPES,
    build_models,
    cache_dir,
    frames,
)
from bus import BusSettings, EmbeddedServer, Subjects, connect, discover_agents, free_port
from fusebus.status import collect_status
from schemas import Decision, InputSpec, SensorFrame, decode, encode

ROOT = Path(__file__).resolve().parent.parent
RATE = 200  # frames/s offered for latency
FEATURES = 32  # the pooled features of a benchmark model (its second Conv1D's filters)
STRIDE_NS = 1000  # frame i starts at i * STRIDE_NS (1 ns samples: frames never overlap)
#: Deployment kinds: the models as one stage, with the heads beside them, and cut in two.
KINDS = {
    "one": "one stage",
    "beside": "one stage + the heads fed from the frame (6 types)",
    "chain": "two-stage chain",
}
#: CPU is counted by component; "added agents" are the heads (of the chain, or beside).
COMPONENTS = ("coordinator", "fusion", "agents", "added agents", "nats-server")


def encoder(type_name: str) -> str:
    """The stage-1 type of a benchmark type in the chain."""
    return f"{type_name}_enc"


def head(type_name: str) -> str:
    """The type of a benchmark model's head beside it, reading features from the frame."""
    return f"{type_name}_head"


def features_sensor(type_name: str) -> str:
    """The frame's sensor that carries a head's features beside the model."""
    return f"{type_name}_features"


def build_split_models(out: Path | None = None) -> Path:
    """Make (or reuse) each benchmark model cut in two: ``<type>_enc.tflite`` (sensor in,
    pooled features out) and ``<type>.tflite`` (features in, scores out), and its head
    reading the features from a ``[128, 1]`` sensor (``<type>_head.tflite``: the first 32
    values), with cards.
    Returns their folder.

    Raises:
        RuntimeError: the two halves, run one after the other, do not give what the whole
            model gives.
    """
    whole = build_models()
    out = out or cache_dir() / "split"
    if all((out / f"{name}.tflite").exists() for t in TYPES for name in (t, encoder(t), head(t))):
        return out
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from agents.model_card import ModelCard
    from agents.runtimes.litert import LiteRTModel
    from agents.training import export_tflite

    out.mkdir(parents=True, exist_ok=True)
    data = frames(16)
    for type_name, sensor in zip(TYPES, SENSORS, strict=True):
        model = keras.models.load_model(whole / f"{type_name}.keras")
        pooled = model.layers[-2].output
        export_tflite(keras.Model(model.inputs, pooled), out / f"{encoder(type_name)}.tflite")
        dense = model.layers[-1]
        features = keras.Input((FEATURES,))
        export_tflite(keras.Model(features, dense(features)), out / f"{type_name}.tflite")
        rows = keras.Input((SAMPLES, 1))
        cropped = keras.layers.Cropping1D((0, SAMPLES - FEATURES))(rows)
        beside = keras.Model(rows, dense(keras.layers.Flatten()(cropped)))
        export_tflite(beside, out / f"{head(type_name)}.tflite")
        card = ModelCard.for_model(whole / f"{type_name}.tflite")
        (out / f"{encoder(type_name)}.json").write_text(
            ModelCard(
                type=encoder(type_name),
                name=f"{card.name}-enc",
                version=card.version,
                labels=(),
                inputs=card.inputs,
                notes=f"the convolutions and pooling of {card.name}: its pooled features",
                output="features",
                output_shape=(FEATURES,),
            ).to_json(),
            encoding="utf-8",
        )
        (out / f"{type_name}.json").write_text(
            ModelCard(
                type=type_name,
                name=f"{card.name}-head",
                version=card.version,
                labels=LABELS,
                inputs=(InputSpec(encoder(type_name), stage=True, shape=(FEATURES,)),),
                weight=card.weight,
                notes=f"the last Dense layer of {card.name}, reading {encoder(type_name)}",
            ).to_json(),
            encoding="utf-8",
        )
        (out / f"{head(type_name)}.json").write_text(
            ModelCard(
                type=head(type_name),
                name=f"{card.name}-head-beside",
                version=card.version,
                labels=LABELS,
                inputs=(InputSpec(features_sensor(type_name), SAMPLES, 1),),
                weight=card.weight,
                notes=f"the last Dense layer of {card.name}, reading features from the frame",
            ).to_json(),
            encoding="utf-8",
        )
        x = np.stack([f[sensor] for f in data])
        full = LiteRTModel(whole / f"{type_name}.tflite").predict([x])
        enc = LiteRTModel(out / f"{encoder(type_name)}.tflite").predict([x])
        split = LiteRTModel(out / f"{type_name}.tflite").predict([enc])
        padded = np.pad(enc, ((0, 0), (0, SAMPLES - FEATURES)))[:, :, None]
        side = LiteRTModel(out / f"{head(type_name)}.tflite").predict([padded])
        if not (np.allclose(full, split, atol=1e-5) and np.allclose(split, side, atol=1e-6)):
            raise RuntimeError(f"{type_name} cut in two answers differently from the whole model")
    return out


def model_us_per_frame(batch: int) -> tuple[float, float]:
    """In this process, no bus: the microseconds per frame of the three whole models, and
    of the three cut in two (encoder then head), called ``batch`` frames at a time (the
    median of 5 timings of about 2,000 frames each)."""
    from agents.runtimes.litert import LiteRTModel

    whole, split = build_models(), build_split_models()
    rounds = max(20, 2000 // batch)
    data = frames(batch)
    x = {s: np.stack([f[s] for f in data]) for s in SENSORS}

    def load(path: Path) -> LiteRTModel:
        model = LiteRTModel(path, buckets=(batch,))
        model.warm_up()
        return model

    models = [load(whole / f"{t}.tflite") for t in TYPES]
    halves = [(load(split / f"{encoder(t)}.tflite"), load(split / f"{t}.tflite")) for t in TYPES]

    def one_stage() -> None:
        for model, sensor in zip(models, SENSORS, strict=True):
            model.predict([x[sensor]])

    def two_stages() -> None:
        for (enc, head), sensor in zip(halves, SENSORS, strict=True):
            head.predict([enc.predict([x[sensor]])])

    def timed(run: Callable[[], None]) -> float:
        times = []
        for _ in range(5):
            began = time.perf_counter()
            for _ in range(rounds):
                run()
            times.append((time.perf_counter() - began) * 1e6 / (rounds * batch))
        return statistics.median(times)

    return timed(one_stage), timed(two_stages)


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
            self.processes[role] = subprocess.Popen(
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

    async def listen(self) -> None:
        loop = asyncio.get_running_loop()

        async def on_decision(msg: Msg) -> None:
            sent = self.scheduled.pop(decode(msg.data, Decision).window.t_start_ns, None)
            if sent is not None:
                self.latencies_ms.append((loop.time() - sent) * 1e3)
                self.decided += 1
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
            await self.nc.publish(subject, data)
        async with asyncio.timeout(120):
            while self.decided < target:
                self.changed.clear()
                await self.changed.wait()
        return loop.time() - began


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
    """Everything measured for one deployment: a max-rate and a fixed-rate phase per repeat."""

    name: str
    max_rate: list[Phase] = field(default_factory=list)
    fixed_rate: list[Phase] = field(default_factory=list)
    rss_mb: dict[str, float] = field(default_factory=dict)

    def values(self, figure: str) -> list[float]:
        """One value per repeat: ``frames_per_s``, ``p50``, ``p99``, ``cpu`` (total CPU-ms per
        frame at maximum rate), ``cpu@rate`` (at the fixed rate), ``cpu:<component>``, or
        ``msgs`` (server messages in + out per frame at maximum rate)."""
        if figure == "frames_per_s":
            return [p.frames_per_s for p in self.max_rate]
        if figure in ("p50", "p99"):
            return [p.percentile(float(figure[1:])) for p in self.fixed_rate]
        if figure == "cpu":
            return [p.cpu_ms_per_frame() for p in self.max_rate]
        if figure == "cpu@rate":
            return [p.cpu_ms_per_frame() for p in self.fixed_rate]
        if figure.startswith("cpu:"):
            return [p.cpu_ms_per_frame(figure[4:]) for p in self.max_rate]
        if figure == "msgs":
            return [p.server_msgs / p.frames for p in self.max_rate]
        raise ValueError(f"unknown figure {figure!r}")

    def median(self, figure: str) -> float:
        return statistics.median(self.values(figure))


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

    def in_hops(self, figure: str) -> list[float]:
        """What the second stage adds to one stage, over what three more subtasks and
        results per frame add without a chain (``beside``), repeat by repeat: 1.0 is one
        more hop coordinator -> agent -> coordinator per model."""
        pairs = zip(self.added("chain", figure), self.added("beside", figure), strict=True)
        return [c / t if t > 0 else float("nan") for c, t in pairs]


async def measure_chain(
    *, frames_count: int, repeats: int, inflight: int, seconds: float
) -> ChainRun:
    """Start the three deployments side by side and measure them in turns (the order
    rotates between repeats)."""
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
        fixed = max(100, int(RATE * seconds))
        for repeat in range(repeats):
            turn = [(i + repeat) % len(deployments) for i in range(len(deployments))]
            for i in turn:
                phased = await phase(deployments[i], drivers[i], frames_count, inflight=inflight)
                results[i].max_rate.append(phased)
            for i in turn:
                phased = await phase(
                    deployments[i], drivers[i], fixed, inflight=inflight, rate=RATE
                )
                results[i].fixed_rate.append(phased)
            for i in turn:
                m = results[i]
                print(
                    f"    {m.name}: {m.max_rate[-1].frames_per_s:,.0f} frames/s, "
                    f"{m.max_rate[-1].cpu_ms_per_frame():.3f} CPU-ms/frame; at {RATE}/s p50/p99 "
                    f"{m.fixed_rate[-1].percentile(50):.1f}/{m.fixed_rate[-1].percentile(99):.1f} ms",
                    file=sys.stderr,
                    flush=True,
                )
        for deployment, result in zip(deployments, results, strict=True):
            deployment.check_running()
            for role, process in deployment.processes.items():
                result.rss_mb[role] = memory_mb(process.pid)[0]
    return ChainRun(dict(zip(KINDS, results, strict=True)), model_us, repeats)


FIGURES = ("frames_per_s", "p50", "p99", "cpu", "cpu@rate", "msgs")
DIGITS = {"frames_per_s": 0, "p50": 1, "p99": 1, "cpu": 3, "cpu@rate": 3, "msgs": 1}
#: The ratios shown: (kind, over kind).
PAIRS = (("chain", "one"), ("beside", "one"), ("chain", "beside"))


def describe(run: ChainRun) -> str:
    """Every repeat's figures and ratios, a line each (for the terminal and for
    aggregating runs)."""

    def each(values: Sequence[float], digits: int = 3) -> str:
        return ", ".join(f"{v:.{digits}f}" for v in values)

    lines = []
    for m in run.measured.values():
        parts = [f"{f} {each(m.values(f))}" for f in FIGURES]
        parts.append(
            "CPU-ms/frame " + "; ".join(f"{c} {each(m.values('cpu:' + c))}" for c in COMPONENTS)
        )
        lines.append(f"{m.name}: " + " | ".join(parts))
    for kind, base in PAIRS:
        ratios = " | ".join(f"{f} {each(run.ratios(kind, base, f))}" for f in FIGURES)
        lines.append(f"{kind} / {base}: {ratios}")
    lines.append(
        "second stage in hops: "
        + " | ".join(f"{f} {each(run.in_hops(f), 2)}" for f in ("cpu", "cpu@rate", "p50", "msgs"))
    )
    lines.append(_compute(run))
    return "\n".join(lines)


def _compute(run: ChainRun) -> str:
    return (
        "Model compute in one process without the bus, µs per frame for the three models "
        "whole / cut in two: "
        + "; ".join(f"batch {b}: {w:.0f} / {c:.0f}" for b, (w, c) in sorted(run.model_us.items()))
    )


def _range(values: Sequence[float], digits: int) -> str:
    low, high = min(values), max(values)
    return f"{statistics.median(values):,.{digits}f} ({low:,.{digits}f}-{high:,.{digits}f})"


def render_chain(run: ChainRun) -> str:
    """The model-chains section of ``docs/benchmarks.md``, from one run."""
    lines = [
        "## Model chains",
        "",
        "The benchmark models as one stage; each cut after its pooling into a two-stage chain "
        "(`<type>_enc`: the convolutions, answering 32 features; `<type>`: the Dense head "
        "reading them) with the same weights and the same fused types; and, as the yardstick "
        "for three more subtasks and results per frame without a chain, one stage with the "
        "three heads beside it, fed their 32 features in the frame (six types, all fused; "
        "`--only chain`). The deployments run side by side on their own servers "
        f"and are measured in turns; median of {run.repeats} repeats (min-max in brackets), "
        "ratios taken repeat by repeat. CPU-ms per frame sums every fusebus process and "
        "nats-server; server messages are `/varz` in + out per frame.",
        "",
        _compute(run) + ".",
        "",
        f"| deployment | frames/s (max) | p50 ms @{RATE} | p99 ms @{RATE} | CPU-ms/frame (max) "
        f"| CPU-ms/frame @{RATE} | server msgs/frame |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in run.measured.values():
        cells = " | ".join(_range(m.values(f), DIGITS[f]) for f in FIGURES)
        lines.append(f"| {m.name} | {cells} |")
    for kind, base in PAIRS:
        cells = " | ".join(_range(run.ratios(kind, base, f), 2) for f in FIGURES)
        lines.append(f"| {KINDS[kind]} / {KINDS[base]} | {cells} |")
    lines += [
        "",
        "| deployment | " + " | ".join(f"CPU-ms/frame {c}" for c in COMPONENTS) + " |",
        "|---|" + "---:|" * len(COMPONENTS),
    ]
    for m in run.measured.values():
        cells = " | ".join(_range(m.values("cpu:" + c), 3) for c in COMPONENTS)
        lines.append(f"| {m.name} | {cells} |")
    hops = {f: _range(run.in_hops(f), 2) for f in ("cpu", "cpu@rate", "p50")}
    lines += [
        "",
        "The second stage in hops (what the chain adds to one stage, over what the heads "
        "beside it add: "
        "1.0 is one more hop coordinator -> agent -> coordinator per model): CPU at maximum "
        f"rate {hops['cpu']}, CPU at {RATE} frames/s {hops['cpu@rate']}, p50 at {RATE} "
        f"frames/s {hops['p50']}.",
    ]
    return "\n".join(lines) + "\n"
