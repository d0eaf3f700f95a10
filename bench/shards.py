"""Sharded coordinators on one machine: windows/s and the cost of a window by component.

One deployment with ``--partitions`` (8) and leases: 1, 2 or 4 coordinator processes and as
many fusion agents of one name share the partitions, with one agent replica per type (the
benchmark workload's three LiteRT agents). Frames of 64 stream ids (spread over the
partitions by the server's ``partition()`` hash) are sent at maximum rate, at most
``--inflight`` windows in flight, and then at a fixed rate (``--shard-rate``, the same for
every shard count, capped at 80% of the maximum). Measured per
window: CPU-ms of each component (the coordinators together, the fusion agents together,
each agent type, nats-server), the server's messages and bytes in and out (``/varz``
deltas: the driver's frames and its decision subscription included), and each agent type's
subtasks per model call. On 2 cores throughput cannot grow with shards; what the figures
say is what each shard and each hop costs. ``shards2-r3`` runs two shards on a 3-node
cluster (every node on this machine) with every stream, bucket and consumer at R3: the
server figures are summed over the nodes, to show what replication multiplies.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.client import Client
from nats.aio.msg import Msg

from bench.procstat import cpu_seconds, memory_mb, spawn, stop_processes
from bench.workload import TYPES, build_models, frames, plans_toml
from bus import (
    BusSettings,
    EmbeddedCluster,
    EmbeddedServer,
    Subjects,
    TopologySettings,
    connect,
    ensure_streams,
    free_port,
    lease_bucket,
)
from fusebus.status import BusStatus, collect_status
from schemas import Decision, SensorFrame, decode, encode

ROOT = Path(__file__).resolve().parent.parent
PARTITIONS = 8
STREAMS = tuple(f"sh{i}" for i in range(64))
STRIDE_NS = 1000  # a stream's k-th frame starts at k * STRIDE_NS (1 ns samples: no overlap)
COUNTERS = ("in_msgs", "out_msgs", "in_bytes", "out_bytes")
LEASE_TTL_S = 6.0  # the components' default
SCENARIOS = {"shards1": (1, 1), "shards2": (2, 1), "shards4": (4, 1), "shards2-r3": (2, 3)}


@dataclass
class Phase:
    """One measured interval: windows decided, seconds, CPU-s by component, server counters."""

    windows: int
    seconds: float
    cpu_s: dict[str, float]
    server: dict[str, float]
    batches: dict[str, tuple[float, float]]  # agent type -> (subtasks, model calls)

    @property
    def windows_per_s(self) -> float:
        return self.windows / self.seconds

    def cpu_ms_per_window(self) -> dict[str, float]:
        per = {k: v * 1e3 / self.windows for k, v in self.cpu_s.items()}
        per["total"] = sum(per.values())
        return per

    def per_window(self, counter: str) -> float:
        return self.server[counter] / self.windows

    def mean_batch(self, type_name: str) -> float:
        subtasks, calls = self.batches.get(type_name, (0.0, 0.0))
        return subtasks / calls if calls else 0.0


@dataclass
class ShardMeasured:
    """Everything measured with one shard count."""

    shards: int
    replicas: int = 1
    partitions: int = PARTITIONS
    max_rate: list[Phase] = field(default_factory=list)  # one per repeat
    fixed_rate: Phase | None = None
    offered_per_s: float = 0.0
    rss_mb: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        name = f"{self.shards} coordinator shard{'s' if self.shards > 1 else ''}"
        return name if self.replicas == 1 else f"{name}, R{self.replicas} on {self.replicas} nodes"

    def median(self, value: str, component: str = "") -> float:
        """Median over the max-rate repeats of ``windows_per_s``, a component's CPU-ms per
        window (``cpu``), a server counter per window, or an agent type's mean batch."""
        return statistics.median(_value(p, value, component) for p in self.max_rate)

    def spread(self, value: str, component: str = "") -> tuple[float, float]:
        values = [_value(p, value, component) for p in self.max_rate]
        return min(values), max(values)


def _value(phase: Phase, value: str, component: str) -> float:
    if value == "windows_per_s":
        return phase.windows_per_s
    if value == "cpu":
        return phase.cpu_ms_per_window()[component]
    if value == "batch":
        return phase.mean_batch(component)
    return phase.per_window(value)


class ShardedDeployment:
    """The processes of one sharded deployment, grouped by component for CPU accounting."""

    def __init__(self, shards: int, url: str, *, replicas: int = 1) -> None:
        self.shards = shards
        self.url = url
        self.replicas = replicas
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.folder = Path(tempfile.mkdtemp(prefix="fusebus-bench-shards-"))  # plans, logs

    def component(self, role: str) -> str:
        """The component a process counts under (coordinators and fusion agents together)."""
        return role.rsplit("-", 1)[0] if role.startswith(("coordinator", "fusion")) else role

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
                raise RuntimeError(f"{role} exited with {process.returncode}:\n{tail}")

    def start(self) -> None:
        models = build_models()
        plans = self.folder / "plans.toml"
        plans.write_text(plans_toml())
        common = (
            "--nats-url",
            self.url,
            "--log-level",
            "warning",
            "--partitions",
            str(PARTITIONS),
            *(("--replicas", str(self.replicas)) if self.replicas > 1 else ()),
        )
        for i in range(self.shards):
            self.spawn(
                f"coordinator-{i}",
                "coordinator",
                "--config",
                str(plans),
                "--name",
                f"c{i}",
                *common,
            )
            self.spawn(f"fusion-{i}", "fusion", *common)
        for t in TYPES:
            self.spawn(f"agent-{t}", "agent", "--model", str(models / f"{t}.tflite"), *common)

    def cpu_s(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for role, process in self.processes.items():
            key = self.component(role)
            out[key] = out.get(key, 0.0) + cpu_seconds(process.pid)
        return out

    def stop(self) -> None:
        stop_processes(self.processes.values())


def settled(status: BusStatus, shards: int) -> bool:
    """Every coordinator and fusion agent runs and holds its fair share of the partitions,
    each partition held once, and every agent type has its replica."""
    for role in ("coordinator", "fusion"):
        owners = [c for r, c in status.components if r == role]
        held = [len(c.get("partitions") or []) for c in owners]
        every = sorted(p for c in owners for p in c.get("partitions") or [])
        if len(owners) != shards or every != list(range(PARTITIONS)) or max(held) - min(held) > 1:
            return False
    return set(status.agents) == set(TYPES)


class Driver:
    """Sends frames round-robin over the stream ids and counts their decisions."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.subjects = Subjects("fb")
        self.sent = 0
        self.decided = 0
        self.open: set[tuple[str, int]] = set()
        self.changed = asyncio.Event()
        self.data = frames(64)

    async def listen(self) -> None:
        async def on_decision(msg: Msg) -> None:
            decision = decode(msg.data, Decision)
            key = (decision.stream, decision.window.t_start_ns)
            if key in self.open:
                self.open.discard(key)
                self.decided += 1
                self.changed.set()

        await self.nc.subscribe(self.subjects.all_decisions(), cb=on_decision)
        await self.nc.flush()

    def next_frame(self) -> tuple[str, bytes]:
        index = self.sent
        self.sent += 1
        stream = STREAMS[index % len(STREAMS)]
        t_ns = (1 + index // len(STREAMS)) * STRIDE_NS
        self.open.add((stream, t_ns))
        frame = SensorFrame(
            stream=stream, t_ns=t_ns, period_ns=1, sensors=self.data[index % len(self.data)]
        )
        return self.subjects.frame(stream), encode(frame)

    async def wait_decided(self, target: int, timeout_s: float = 120.0) -> None:
        async with asyncio.timeout(timeout_s):
            while self.decided < target:
                self.changed.clear()
                await self.changed.wait()

    async def send(self, count: int, *, inflight: int, rate: float | None = None) -> None:
        """Send ``count`` frames, at most ``inflight`` undecided (or at ``rate`` frames/s),
        and wait for their decisions."""
        loop = asyncio.get_running_loop()
        target = self.decided + count
        began = loop.time()
        for i in range(count):
            if rate is not None:
                delay = began + i / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            while self.sent - self.decided >= inflight:
                self.changed.clear()
                await self.changed.wait()
            await self.nc.publish(*self.next_frame())
        await self.wait_decided(target)


async def agent_batches(nc: Client) -> dict[str, tuple[float, float]]:
    status = await collect_status(nc, prefix="fb", timeout_s=0.3)
    return {t: (s.total("processed"), s.total("batches")) for t, s in status.agents.items()}


def server_counters(nodes: Sequence[EmbeddedServer]) -> dict[str, float]:
    """``/varz`` counters summed over the nodes (a routed message counts on each it crosses)."""
    replies = [node.varz() for node in nodes]
    return {k: sum(float(r[k]) for r in replies) for k in COUNTERS}


async def phase(
    driver: Driver,
    deployment: ShardedDeployment,
    nodes: Sequence[EmbeddedServer],
    count: int,
    *,
    inflight: int,
    rate: float | None = None,
) -> Phase:
    """Measure one interval of ``count`` windows."""
    nc = driver.nc

    def cpu_s() -> dict[str, float]:
        return {
            **deployment.cpu_s(),
            "nats-server": sum(cpu_seconds(node.pid or 0) for node in nodes),
        }

    batches0 = await agent_batches(nc)
    cpu0 = cpu_s()
    varz0 = server_counters(nodes)
    began = time.perf_counter()
    await driver.send(count, inflight=inflight, rate=rate)
    seconds = time.perf_counter() - began
    varz1 = server_counters(nodes)
    cpu1 = cpu_s()
    batches1 = await agent_batches(nc)
    return Phase(
        windows=count,
        seconds=seconds,
        cpu_s={k: cpu1[k] - cpu0[k] for k in cpu1},
        server={k: varz1[k] - varz0[k] for k in COUNTERS},
        batches={
            t: (
                batches1[t][0] - batches0.get(t, (0, 0))[0],
                batches1[t][1] - batches0.get(t, (0, 0))[1],
            )
            for t in batches1
        },
    )


async def measure_shards(
    shards: int, *, replicas: int = 1, windows: int, repeats: int, inflight: int, rate: float
) -> ShardMeasured:
    """Start a deployment with ``shards`` coordinators and fusion agents (on a cluster of
    ``replicas`` nodes, everything at that replica count, when above 1), and measure it."""
    result = ShardMeasured(shards, replicas)
    with ExitStack() as stack:
        if replicas > 1:
            cluster = stack.enter_context(EmbeddedCluster(replicas))
            nodes, url = cluster.nodes, cluster.url
        else:
            server = stack.enter_context(EmbeddedServer(monitor_port=free_port()))
            nodes, url = [server], server.url
        deployment = ShardedDeployment(shards, url, replicas=replicas)
        nc = await connect(BusSettings(url=url), name="bench-driver")
        if replicas > 1:
            # On a fresh cluster on a busy 2-core machine, R3 streams take longer to create
            # than a component's JetStream API timeout: make them first, with time to spare.
            topology = TopologySettings(partitions=PARTITIONS, replicas=replicas)
            await ensure_streams(nc.jetstream(timeout=60), Subjects("fb"), topology, intake=True)
            await lease_bucket(nc, Subjects("fb"), ttl_s=LEASE_TTL_S, topology=topology)
        driver = Driver(nc)
        await driver.listen()
        deployment.start()
        try:
            async with asyncio.timeout(120):  # each status round waits 0.3 s for replies
                while not settled(await collect_status(nc, prefix="fb", timeout_s=0.3), shards):
                    deployment.check_running()
            await driver.send(512, inflight=inflight)  # warm-up: every consumer and journal
            for _ in range(repeats):
                result.max_rate.append(
                    await phase(driver, deployment, nodes, windows, inflight=inflight)
                )
            # The same offered rate for every shard count (below capacity: at most 80% of it).
            result.offered_per_s = min(rate, 0.8 * result.median("windows_per_s"))
            result.fixed_rate = await phase(
                driver,
                deployment,
                nodes,
                max(200, int(result.offered_per_s * 4)),
                inflight=inflight,
                rate=result.offered_per_s,
            )
            for role, process in deployment.processes.items():
                result.rss_mb[role] = memory_mb(process.pid)[0]
            for index, node in enumerate(nodes):
                result.rss_mb[f"nats-server-{index}"] = memory_mb(node.pid or 0)[0]
        finally:
            deployment.stop()
            await nc.drain()
            shutil.rmtree(deployment.folder, ignore_errors=True)
    print(f"    {describe(result)}", file=sys.stderr, flush=True)
    return result


COMPONENTS = ("coordinator", "fusion", *(f"agent-{t}" for t in TYPES), "nats-server", "total")


def describe(m: ShardMeasured) -> str:
    """Every repeat's figures on one line (for the terminal and for aggregating runs)."""

    def each(value: str, component: str = "", digits: int = 3) -> str:
        return ", ".join(f"{_value(p, value, component):.{digits}f}" for p in m.max_rate)

    parts = [
        f"{m.name}: windows/s {each('windows_per_s', digits=0)}",
        "CPU-ms/window " + "; ".join(f"{c} {each('cpu', c)}" for c in COMPONENTS),
        "server msgs/window in "
        + each("in_msgs", digits=2)
        + "; out "
        + each("out_msgs", digits=2),
        "server bytes/window in "
        + each("in_bytes", digits=0)
        + "; out "
        + each("out_bytes", digits=0),
        "subtasks/model call " + "; ".join(f"{t} {each('batch', t, 1)}" for t in TYPES),
    ]
    if m.fixed_rate is not None:
        f = m.fixed_rate
        cpu = f.cpu_ms_per_window()
        parts.append(
            f"at {m.offered_per_s:,.0f} windows/s: CPU-ms/window "
            + "; ".join(f"{c} {cpu[c]:.3f}" for c in COMPONENTS)
            + f"; msgs/window in {f.per_window('in_msgs'):.2f} out {f.per_window('out_msgs'):.2f}"
            + "; subtasks/model call "
            + ", ".join(f"{t} {f.mean_batch(t):.1f}" for t in TYPES)
        )
    return " | ".join(parts)


def _range(m: ShardMeasured, value: str, component: str = "", digits: int = 3) -> str:
    low, high = m.spread(value, component)
    return f"{m.median(value, component):,.{digits}f} ({low:,.{digits}f}-{high:,.{digits}f})"


def _label(m: ShardMeasured) -> str:
    return str(m.shards) if m.replicas == 1 else f"{m.shards}, R{m.replicas} ({m.replicas} nodes)"


def render_shards(results: Sequence[ShardMeasured], repeats: int) -> str:
    """The sharded-coordinators section of ``docs/benchmarks.md``."""
    if not results:
        return ""
    base = results[0]
    lines = [
        "## Sharded coordinators",
        "",
        f"One deployment with `--partitions {PARTITIONS}` and leases: N coordinator processes and "
        "N fusion agents of one name share the partitions, one LiteRT agent replica per type; "
        f"frames of {len(STREAMS)} stream ids at maximum rate (`--only shards1,shards2,shards4,shards2-r3`). "
        f"Median of {repeats} repeats in one run (min-max in brackets); the R3 row runs on a "
        "3-node cluster on the same machine, its server figures summed over the nodes. On 2 "
        "cores more shards "
        "cannot add throughput; CPU-ms per window per component is the figure that carries to "
        "a larger deployment. See [scaling.md](scaling.md) for what it means at scale.",
        "",
        "| shards | windows/s (max) | x 1 shard | "
        + " | ".join(f"CPU-ms/window {c}" for c in COMPONENTS)
        + " |",
        "|---:|---:|---:|" + "---:|" * len(COMPONENTS),
    ]
    for m in results:
        cpu = " | ".join(_range(m, "cpu", c) for c in COMPONENTS)
        lines.append(
            f"| {_label(m)} | {_range(m, 'windows_per_s', digits=0)} | "
            f"{m.median('windows_per_s') / base.median('windows_per_s'):.2f} | {cpu} |"
        )
    lines += [
        "",
        "Server messages and bytes per window are nats-server's `/varz` deltas (in: published "
        "to the server, acks included; out: delivered by it; the driver's frames and its "
        "decision subscription included). The fixed-rate column is the same deployment at a "
        "steady rate below capacity, where batches are smaller.",
        "",
        "| shards | server msgs in / out per window | server KB in / out per window "
        "| subtasks per model call | fixed rate: windows/s | CPU-ms/window total | subtasks per model call |",
        "|---:|---:|---:|---|---:|---:|---|",
    ]
    for m in results:
        batch = ", ".join(f"{t} {m.median('batch', t):.1f}" for t in TYPES)
        f = m.fixed_rate
        fixed = (
            f"{m.offered_per_s:,.0f} | {f.cpu_ms_per_window()['total']:.3f} | "
            + ", ".join(f"{t} {f.mean_batch(t):.1f}" for t in TYPES)
            if f is not None
            else "- | - | -"
        )
        lines.append(
            f"| {_label(m)} | {_range(m, 'in_msgs', digits=1)} / {_range(m, 'out_msgs', digits=1)} | "
            f"{m.median('in_bytes') / 1e3:.1f} / {m.median('out_bytes') / 1e3:.1f} | {batch} | {fixed} |"
        )
    return "\n".join(lines) + "\n"
