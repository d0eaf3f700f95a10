"""``fusebus up``: the whole system on one machine, fed with recorded sensor data.

Starts ``nats-server`` (unless a URL is given), the coordinator, one agent process per
type and the fusion agent as separate processes, waits until each has registered on the
bus, replays a dataset's TEST split as live sensors (per-sensor chunks, or frames), prints every decision as it arrives
and a summary, then stops everything.

With a config (``--config examples/chain.toml``) the coordinator and fusion read its plan
and fusion tables, and the agents are the ones its ``[agents]`` table names, checked
against the plan before anything starts (see :mod:`fusebus.lineup`).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from bus import (
    BusSettings,
    EmbeddedServer,
    Producer,
    Subjects,
    TopologySettings,
    connect,
    discover_components,
    ensure_streams,
    follow_stored,
)
from bus.discovery import ROLE
from bus.types import Connection, Message
from fusebus.config import Deployment, load_deployment
from fusebus.datasets import SensorDataset, load_dataset
from fusebus.lineup import agent_command, check_lineup, describe, plan_for
from fusebus.paths import models_dir
from fusebus.replay import aligned_start_ns, chunk_schedule, replay_frames, send_schedule
from fusebus.status import collect_status
from schemas import CODEC, BusError, ConfigError, Decision, SchemaError


@dataclass(frozen=True)
class UpSettings:
    """What ``fusebus up`` runs."""

    nats_url: str | None = None  # None: start an embedded nats-server
    prefix: str = "fb"
    dataset: str = "basicmotions"
    stream: str = "basicmotions"
    agents: tuple[str, ...] = ("accel", "gyro")
    frames: bool = False  # send pre-aligned frames instead of per-sensor chunks
    speed: float = 100.0  # chunks: x real time (a 10 s case every 0.1 s)
    rate_hz: float = 10.0  # frames: per second
    deadline_ms: float = 2000.0
    ready_timeout_s: float = 60.0
    log_dir: Path | None = None  # where each process writes its log; default a temp folder
    log_level: str = "info"
    # A plans file with an [agents] table: its plan, fusion and agents replace the built-in
    # demo's (``agents`` and ``deadline_ms`` then do not apply).
    config: Path | None = None


@dataclass
class Child:
    """A component process started by ``up``."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the process's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM, wait, then SIGKILL; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MB (Linux), or ``None`` when unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclass
class Tally:
    """Decisions seen so far, and how they compare to the truth."""

    truth: dict[int, str]
    decisions: list[Decision] = field(default_factory=list)
    seen_tasks: set[str] = field(default_factory=set)
    first_at: float | None = None

    @property
    def correct(self) -> int:
        """Decisions whose label matches the true label."""
        return sum(d.label == self.truth.get(d.window.t_start_ns) for d in self.decisions)


async def run_up(settings: UpSettings, *, out: TextIO = sys.stdout) -> int:
    """Run the demo end to end; returns 0 when every window got exactly one decision."""
    started = time.perf_counter()
    dataset = load_dataset(settings.dataset)
    deployment = None
    if settings.config is not None:
        deployment = load_deployment(settings.config)
        deadline_ms = _check_deployment(deployment, dataset, settings)
        agent_types = tuple(deployment.agents)
    else:
        for agent in settings.agents:
            if not (models_dir() / f"{agent}.tflite").exists():
                raise ConfigError(f"no model for agent {agent!r} in {models_dir()}")
        deadline_ms, agent_types = settings.deadline_ms, settings.agents
    log_dir = settings.log_dir or Path(tempfile.mkdtemp(prefix="fusebus-up-"))
    log_dir.mkdir(parents=True, exist_ok=True)

    server: EmbeddedServer | None = None
    if settings.nats_url is None:
        server = EmbeddedServer(store_dir=log_dir / "nats").start()
    url = server.url if server else str(settings.nats_url)
    bus = BusSettings(url=url, prefix=settings.prefix)
    config = f" · config {settings.config}" if settings.config is not None else ""
    print(
        f"fusebus up · NATS {url}{' (embedded)' if server else ''}{config} · logs {log_dir}",
        file=out,
    )

    children: list[Child] = []
    nc = None
    try:
        children = _spawn_components(settings, url, log_dir, deployment)
        nc = await connect(bus, name="fusebus-up")
        await _wait_ready(nc, settings, children, agent_types)
        if deployment is not None:
            # A chain's optional upstreams are waited for only once the coordinator has
            # seen an agent serving them: let it see every one before the first window.
            await _wait_served(nc, settings)
        subjects = Subjects(settings.prefix)
        start_ns = aligned_start_ns(dataset)
        schedule, windows = chunk_schedule(
            dataset,
            streams=[settings.stream],
            speed=settings.speed,
            chunk_ms=1000.0,
            start_ns=start_ns,
        )
        tally = Tally(truth={w.t_start_ns: w.label for w in windows[settings.stream]})
        all_in = asyncio.Event()

        async def on_decision(msg: Message) -> None:
            try:
                decision = CODEC.decode(msg.data, Decision)
            except SchemaError as exc:
                print(f"  unreadable decision: {exc}", file=out)
                return
            if decision.task_id in tally.seen_tasks:
                print(f"  DUPLICATE decision for {decision.task_id}", file=out)
                return
            tally.seen_tasks.add(decision.task_id)
            if tally.first_at is None:
                tally.first_at = time.perf_counter()
            tally.decisions.append(decision)
            _print_decision(out, len(tally.decisions), decision, tally.truth, start_ns)
            if len(tally.decisions) >= len(tally.truth):
                all_in.set()

        await ensure_streams(nc.jetstream(), subjects, TopologySettings())
        sub = await follow_stored(
            nc, subjects.decision(settings.stream), on_decision, from_now=True
        )
        print(
            f"{'#':>3}  {'window (s)':<13} {'predicted':<10} {'true':<10}    {'status':<9} latency",
            file=out,
        )
        if settings.frames:
            await replay_frames(
                Producer(nc, subjects),
                dataset,
                stream=settings.stream,
                rate_hz=settings.rate_hz,
                start_ns=start_ns,
            )
        else:
            await send_schedule(Producer(nc, subjects), schedule)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(deadline_ms / 1e3 + 10.0):
                await all_in.wait()
        await sub.unsubscribe()
        memory = {c.name: rss_mb(c.process.pid) for c in children}
        if server is not None and server.pid is not None:
            memory["nats-server"] = rss_mb(server.pid)
        _print_summary(out, tally, started, memory)
        return 0 if len(tally.decisions) == len(tally.truth) else 1
    finally:
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.drain()
        codes = {c.name: c.stop() for c in children}
        failed = {name: code for name, code in codes.items() if code != 0}
        if failed:
            print(f"components exited with errors: {failed} (logs in {log_dir})", file=out)
        if server is not None:
            server.stop()


def _check_deployment(
    deployment: Deployment, dataset: SensorDataset, settings: UpSettings
) -> float:
    """Refuse a config ``up`` cannot run on the dataset's stream; returns its plan's deadline.

    Raises:
        ConfigError: no [agents] table, no plan for the stream, no window for chunks, a
            sensor the dataset lacks, or agents that do not fit the plan.
    """
    source = deployment.source
    if not deployment.agents:
        raise ConfigError(
            f"{source}: no [agents] table: `fusebus up --config` starts the agents it names "
            "(see examples/chain.toml)"
        )
    plan, key = plan_for(deployment, settings.stream)
    if plan.window is None and not settings.frames:
        raise ConfigError(
            f"{source}: {key} has no window table: `fusebus up` replays per-sensor chunks, "
            "which are cut into windows (add one, or use --frames)"
        )
    for spec in plan.subtasks:
        for sensor in spec.sensors:
            if sensor not in dataset.sensors:
                raise ConfigError(
                    f"{source}: {key}.subtasks.{spec.type} reads the sensor {sensor!r}, which "
                    f"{dataset.name} does not have (it has {', '.join(dataset.sensors)})"
                )
    served = {t: describe(e, source=source) for t, e in deployment.agents.items()}
    check_lineup(deployment, served, stream=settings.stream)
    return plan.deadline_ms


def _spawn_components(
    settings: UpSettings, url: str, log_dir: Path, deployment: Deployment | None
) -> list[Child]:
    common = [
        "--nats-url",
        url,
        "--prefix",
        settings.prefix,
        "--log-format",
        "json",
        "--log-level",
        settings.log_level,
    ]
    commands: dict[str, list[str]]
    if deployment is not None:
        assert settings.config is not None
        config = str(settings.config.resolve())
        commands = {
            "coordinator": ["coordinator", "--config", config],
            "fusion": ["fusion", "--config", config],
            **{f"agent-{t}": agent_command(e) for t, e in deployment.agents.items()},
        }
    else:
        commands = {
            "coordinator": [
                "coordinator",
                "--plan",
                settings.dataset,
                "--deadline-ms",
                str(settings.deadline_ms),
            ],
            "fusion": ["fusion"],
            **{
                f"agent-{a}": ["agent", "--model", str(models_dir() / f"{a}.tflite")]
                for a in settings.agents
            },
        }
    children = []
    for name, args in commands.items():
        log_path = log_dir / f"{name}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "fusebus", *args, *common],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        children.append(Child(name, process, log_path))
    return children


async def _wait_ready(
    nc: object, settings: UpSettings, children: list[Child], agent_types: tuple[str, ...]
) -> None:
    wanted = {"coordinator", "fusion", *(f"agent-{a}" for a in agent_types)}
    deadline = time.monotonic() + settings.ready_timeout_s
    while True:
        for child in children:
            if child.process.poll() is not None:
                raise BusError(
                    f"{child.name} exited with {child.process.returncode} while starting:\n{child.log_tail()}"
                )
        replies = await discover_components(nc, prefix=settings.prefix, timeout_s=0.3)  # type: ignore[arg-type]
        ready = set()
        for reply in replies:
            role = (reply.get("metadata") or {}).get(ROLE)
            ready.add(f"agent-{reply.get('name')}" if role == "agent" else str(role))
        if wanted <= ready:
            return
        if time.monotonic() > deadline:
            raise BusError(
                f"components not ready after {settings.ready_timeout_s:g}s: {sorted(wanted - ready)}"
            )


async def _wait_served(nc: Connection, settings: UpSettings) -> None:
    """Wait until the coordinator says no type of its plan is unserved."""
    deadline = time.monotonic() + settings.ready_timeout_s
    while True:
        status = await collect_status(nc, prefix=settings.prefix, timeout_s=0.3)
        unserved = [
            c.get("unserved_types") for role, c in status.components if role == "coordinator"
        ]
        if unserved and not any(unserved):
            return
        if time.monotonic() > deadline:
            raise BusError(
                f"the coordinator still sees no agent for {unserved} after "
                f"{settings.ready_timeout_s:g}s"
            )


def _print_decision(out: TextIO, n: int, d: Decision, truth: dict[int, str], start_ns: int) -> None:
    true = truth.get(d.window.t_start_ns, "?")
    mark = "✓" if d.label == true else "✗"
    t0 = (d.window.t_start_ns - start_ns) / 1e9
    t1 = (d.window.t_end_ns - start_ns) / 1e9
    extra = f"  missing {','.join(d.missing)}" if d.missing else ""
    print(
        f"{n:>3}  {t0:5.0f}-{t1:<7.0f} {d.label or '-':<10} {true:<10} {mark}  {d.status:<9} "
        f"{d.latency_ms:7.1f} ms{extra}",
        file=out,
        flush=True,
    )


def _print_summary(
    out: TextIO, tally: Tally, started: float, memory: dict[str, float | None]
) -> None:
    decisions = tally.decisions
    total = len(tally.truth)
    states = {s: sum(d.status == s for d in decisions) for s in ("complete", "partial", "failed")}
    latencies = np.array([d.latency_ms for d in decisions]) if decisions else np.zeros(1)
    accuracy = tally.correct / total if total else 0.0
    print("", file=out)
    print(
        f"decisions {len(decisions)}/{total} · accuracy {accuracy:.3f} ({tally.correct}/{total}) · "
        + " · ".join(f"{k} {v}" for k, v in states.items()),
        file=out,
    )
    first = f"{tally.first_at - started:.2f} s" if tally.first_at else "never"
    print(
        f"latency p50 {np.percentile(latencies, 50):.1f} ms · p99 {np.percentile(latencies, 99):.1f} ms"
        f" · first decision {first} after start",
        file=out,
    )
    rss = " · ".join(f"{name} {mb:.0f} MB" for name, mb in memory.items() if mb is not None)
    print(f"memory (RSS) {rss}", file=out, flush=True)
