"""Model rollout: how long a promotion takes to reach every replica, and what it costs.

A deployment of separate processes on its own embedded nats-server: a coordinator with the
BasicMotions plan, a fusion agent, one ``gyro`` agent (the shipped model) and ``--rollout-
replicas`` (3) ``accel`` replicas started with ``--model store:accel``, following the
registry. The driver stores ``models/accel.tflite`` as versions 1-4 of ``accel`` (the same
file: what is measured is the rollout, not a model) and sends BasicMotions TEST cases as
frames at ``--rollout-rate`` (200) frames/s.

Under that load it promotes versions 2, 3, 4, 1, 2... (``--promotions``, 10), one every few
seconds, and measures from the moment ``ModelRegistry.promote`` returns:

- **to the last replica serving**, seen from outside two ways: the first result carrying
  the new version from each replica's ``agent_id`` (on the results subject), and each
  replica's ``$SRV.STATS`` showing it serving the new version (asked every 10 ms);
- **the throughput dip**: decisions per 100 ms bin (as they reach the driver, read from the
  decisions stream) in the ``--rollout-window-s`` (1.5) before the promotion and as long
  after it; the lowest bin after, over the median bin before. The lowest bin before, over
  the same median, is the noise floor to compare it with.

Then, with no frames, ``--idle-promotions`` (8) more, timed by ``$SRV.STATS`` alone (every
5 ms): an idle replica applies a pending switch at once, so this is the watch, fetching,
loading, warming up and checking a version, and nothing else.

Every frame must get exactly one decision (counted by task_id against the frames sent),
every accel subtask one result, and each replica must switch once per promotion.

    python -m bench --only rollout [--promotions 10] [--idle-promotions 8]
        [--rollout-replicas 3] [--rollout-rate 200] [--rollout-window-s 1.5]

The figures are printed by :mod:`bench.rollout_report`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.client import Client
from nats.aio.msg import Msg

from bench.procstat import spawn, stop_processes
from bus import (
    BusSettings,
    EmbeddedServer,
    Producer,
    Subjects,
    TopologySettings,
    agent_info_from_metadata,
    connect,
    follow_stored,
    gather,
)
from bus.registry import ModelRegistry
from fusebus.datasets import load_basicmotions
from fusebus.paths import models_dir
from fusebus.status import collect_status
from schemas import CODEC, Decision, Result, SensorFrame

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "fb"
STREAM = "rollout"
MODEL = "accel"
VERSIONS = ("1", "2", "3", "4")
BIN_S = 0.1  # decisions are counted in bins of this many seconds
#: Seconds of decisions counted on each side of a promotion: as many bins after as before,
#: so that the lowest bin after compares with the lowest before.
WINDOW_S = 1.5
STATS_POLL_S = 0.01  # under load
IDLE_POLL_S = 0.005
WAIT_S = 30.0  # longest wait for anything before the run fails


def each_ms(values: Iterable[float]) -> str:
    """Milliseconds, comma-separated."""
    return ", ".join(f"{v:.0f}" for v in values)


@dataclass(frozen=True)
class Replica:
    """One accel replica as discovery names it."""

    agent_id: str
    stats_subject: str  # its own ``$SRV.STATS.<name>.<id>``


@dataclass
class Promotion:
    """One promotion: when each replica served the new version, and decisions around it."""

    version: str
    call_ms: float  # ModelRegistry.promote itself
    stats_ms: dict[str, float]  # agent_id -> ms from promote returning to $SRV.STATS serving it
    result_ms: dict[str, float] = field(default_factory=dict)  # -> to its first result with it
    before: list[int] = field(default_factory=list)  # decisions per BIN_S before it
    after: list[int] = field(default_factory=list)  # and after it
    worst_ms: tuple[float, float] = (0.0, 0.0)  # slowest decision (ingest ->) before, after

    @property
    def last_result_ms(self) -> float:
        return max(self.result_ms.values())

    @property
    def last_stats_ms(self) -> float:
        return max(self.stats_ms.values())

    @property
    def steady(self) -> float:
        """The median bin before the promotion."""
        return float(statistics.median(self.before))

    @property
    def dip(self) -> float:
        """The lowest bin after the promotion, over the median bin before."""
        return min(self.after) / self.steady

    @property
    def lowest_at_ms(self) -> float:
        """When the lowest bin after the promotion starts, ms after it."""
        return self.after.index(min(self.after)) * BIN_S * 1e3

    @property
    def floor(self) -> float:
        """The lowest bin before, over the median before: what noise alone does."""
        return min(self.before) / self.steady

    def describe(self) -> str:
        """Its figures on one line."""
        text = (
            f"-> {self.version}: promote call {self.call_ms:.1f} ms; stats serving ms "
            f"{each_ms(self.stats_ms.values())}"
        )
        if self.result_ms:
            text += (
                f"; first result ms {each_ms(self.result_ms.values())}; decisions/{BIN_S:g}s "
                f"steady {self.steady:.0f}, lowest after {min(self.after)} at "
                f"+{self.lowest_at_ms:.0f} ms (dip {self.dip:.2f}, floor before "
                f"{self.floor:.2f}); slowest decision before / after {self.worst_ms[0]:.0f} / "
                f"{self.worst_ms[1]:.0f} ms"
            )
        return text


@dataclass
class Integrity:
    """What the run's decisions and results say about lost or doubled work."""

    frames: int = 0
    decisions: int = 0  # stored decisions for frames sent
    decided: int = 0  # distinct task ids among them
    unknown: int = 0  # decisions for windows never sent
    statuses: Counter[str] = field(default_factory=Counter)
    accel_answers: Counter[int] = field(default_factory=Counter)  # results per task -> tasks
    changes: dict[str, int] = field(default_factory=dict)  # version changes seen per replica
    switches: dict[str, int] = field(default_factory=dict)  # from $SRV.STATS at the end

    @property
    def one_decision_each(self) -> bool:
        """Every frame sent got exactly one stored decision, and no other window did."""
        return self.decisions == self.decided == self.frames and not self.unknown

    @property
    def one_result_each(self) -> bool:
        """Every accel subtask was answered once: none lost between versions, none twice."""
        return dict(self.accel_answers) == {1: self.frames}

    def switched_each_time(self, promotions: int, loaded: int) -> bool:
        """Each replica switched once per promotion, and its results changed version once
        per promotion under load."""
        return set(self.switches.values()) == {promotions} and set(self.changes.values()) == {
            loaded
        }


@dataclass
class RolloutRun:
    """One run: the promotions under load and idle, and the integrity counts."""

    replicas: int
    rate: float
    window_s: float  # decisions counted on each side of a promotion
    loaded: list[Promotion]
    idle: list[Promotion]
    integrity: Integrity


class Deployment:
    """The processes under test on their own server; logs in a temporary folder."""

    def __init__(self, replicas: int) -> None:
        self.replicas = replicas
        self.server = EmbeddedServer()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.folder = Path(tempfile.mkdtemp(prefix="fusebus-bench-rollout-"))

    def spawn(self, role: str, *argv: str) -> None:
        common = ("--nats-url", self.server.url, "--prefix", PREFIX, "--log-level", "warning")
        with (self.folder / f"{role}.log").open("wb") as log:
            self.processes[role] = spawn(
                [sys.executable, "-m", "fusebus", *argv, *common],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def start(self) -> None:
        """Start the components (the registry must hold the model already)."""
        self.spawn("coordinator", "coordinator", "--plan", "basicmotions")
        self.spawn("fusion", "fusion")
        self.spawn("agent-gyro", "agent", "--model", "gyro")
        for r in range(self.replicas):
            self.spawn(f"agent-{MODEL}-{r}", "agent", "--model", f"store:{MODEL}")

    def check_running(self) -> None:
        """Raises RuntimeError naming a process that has exited, with the end of its log."""
        for role, process in self.processes.items():
            if process.poll() is not None:
                tail = (self.folder / f"{role}.log").read_text(errors="replace")[-1500:]
                raise RuntimeError(f"{role} exited with {process.returncode}:\n{tail}")

    def stop(self) -> None:
        stop_processes(self.processes.values())
        self.server.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


async def store_versions(nc: Client) -> ModelRegistry:
    """The registry, made, with ``models/accel.tflite`` stored as every one of VERSIONS."""
    registry = await ModelRegistry.open(
        nc.jetstream(), Subjects(PREFIX), TopologySettings(), create=True
    )
    path = models_dir() / f"{MODEL}.tflite"
    card = json.loads(path.with_suffix(".json").read_text())
    for version in VERSIONS:
        await registry.put(MODEL, version, path.read_bytes(), file_name=path.name, card=card)
    return registry


async def replicas_ready(deployment: Deployment, nc: Client) -> list[Replica]:
    """Wait until every component answers discovery; the accel replicas."""
    async with asyncio.timeout(120):
        while True:
            deployment.check_running()
            status = await collect_status(nc, prefix=PREFIX, timeout_s=0.3)
            roles = {role for role, _ in status.components}
            counts = {t: len(s.replicas) for t, s in status.agents.items()}
            wanted = {"gyro": 1, MODEL: deployment.replicas}
            if {"coordinator", "fusion"} <= roles and counts == wanted:
                break
    found = []
    for reply in await gather(nc, "$SRV.STATS", timeout_s=0.3):
        info = agent_info_from_metadata(reply.get("metadata") or {})
        if info is not None and info.type == MODEL:
            found.append(Replica(info.agent_id, f"$SRV.STATS.{reply['name']}.{reply['id']}"))
    return sorted(found, key=lambda r: r.agent_id)


async def serving(nc: Client, replica: Replica) -> tuple[str, int]:
    """The accel version a replica serves and its switches so far, from its stats."""
    reply = json.loads((await nc.request(replica.stats_subject, b"", timeout=2.0)).data)
    counters = next(e.get("data") or {} for e in reply["endpoints"] if e["name"] == "status")
    model = next(str(s["model"]) for s in counters["serving"] if s["name"] == MODEL)
    return model.rpartition("@")[2], int(counters["switches"])


class Driver:
    """Sends frames at a fixed rate, watches results and decisions, and promotes."""

    def __init__(
        self, nc: Client, registry: ModelRegistry, replicas: list[Replica], *, window_s: float
    ) -> None:
        self.nc = nc
        self.window_s = window_s
        self.registry = registry
        self.replicas = replicas
        self.subjects = Subjects(PREFIX)
        self.loop = asyncio.get_running_loop()
        dataset = load_basicmotions()
        self.cases = [
            {s: dataset.sensor_view(x, s) for s in dataset.sensors} for x in dataset.x_test
        ]
        self.period_ns, self.case_ns = dataset.period_ns, dataset.case_ns
        self.sent = 0
        self.decision_times: list[tuple[float, float]] = []  # (arrival, ingest -> decision ms)
        self.decided: Counter[str] = Counter()  # task_id -> stored decisions
        self.windows: set[int] = set()  # window starts decided
        self.statuses: Counter[str] = Counter()
        self.accel_answers: Counter[str] = Counter()  # task_id -> accel results
        self.version_of: dict[str, str] = {}  # agent_id -> the version it last answered with
        self.changes: Counter[str] = Counter()  # agent_id -> version changes seen
        self.first: dict[str, float] = {}  # agent_id -> first answer with `self.awaited`
        self.awaited = ""
        self.changed = asyncio.Event()
        self.feeding = False

    async def listen(self) -> None:
        async def on_result(msg: Msg) -> None:
            at = self.loop.time()
            for result in CODEC.decode_each(msg.data, Result):
                if result.type != MODEL:
                    continue
                self.accel_answers[result.task_id] += 1
                agent, version = result.agent_id, result.model.version
                if self.version_of.setdefault(agent, version) != version:
                    self.version_of[agent] = version
                    self.changes[agent] += 1
                if version == self.awaited and agent not in self.first:
                    self.first[agent] = at
                    self.changed.set()

        async def on_decision(msg: Msg) -> None:
            decision = CODEC.decode(msg.data, Decision)
            self.decision_times.append((self.loop.time(), decision.latency_ms))
            self.decided[decision.task_id] += 1
            self.windows.add(decision.window.t_start_ns)
            self.statuses[decision.status] += 1
            self.changed.set()

        await self.nc.subscribe(self.subjects.all_results(), cb=on_result)
        await follow_stored(self.nc, self.subjects.all_decisions(), on_decision)
        await self.nc.flush()

    async def feed(self, rate: float) -> None:
        """Send frames at ``rate`` per second, frame n due at n / rate s, until
        :meth:`stop_feeding` (not cancelled: a frame sent is a frame counted)."""
        producer = Producer(self.nc, self.subjects)
        began, first = self.loop.time(), self.sent
        self.feeding = True
        while self.feeding:
            due = began + (self.sent - first) / rate
            if due > self.loop.time():
                await asyncio.sleep(due - self.loop.time())
            frame = SensorFrame(
                stream=STREAM,
                t_ns=(self.sent + 1) * self.case_ns,
                period_ns=self.period_ns,
                sensors=self.cases[self.sent % len(self.cases)],
            )
            await producer.frame(frame)
            self.sent += 1

    async def stop_feeding(self, feeder: asyncio.Task[None]) -> None:
        self.feeding = False
        await feeder
        await self.nc.flush()

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        try:
            async with asyncio.timeout(WAIT_S):
                while not condition():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise RuntimeError(f"not within {WAIT_S:.0f}s: {what}") from None

    async def every_replica_answers(self, version: str) -> None:
        """Wait until every replica has answered with ``version`` (from now on)."""
        self.awaited, self.first = version, {}
        await self.until(
            lambda: len(self.first) == len(self.replicas),
            f"every replica answering with version {version} (got {sorted(self.first)})",
        )

    async def promote(self, version: str, *, poll_s: float, loaded: bool) -> Promotion:
        """Promote ``version`` and time each replica to serving it."""
        self.awaited, self.first = version, {}
        began = time.perf_counter()
        await self.registry.promote(MODEL, version)
        promoted = self.loop.time()
        call_ms = (time.perf_counter() - began) * 1e3
        seen = await asyncio.gather(*(self._poll(r, version, poll_s) for r in self.replicas))
        promotion = Promotion(
            version,
            call_ms,
            {r.agent_id: (at - promoted) * 1e3 for r, at in zip(self.replicas, seen, strict=True)},
        )
        if loaded:
            await self.until(
                lambda: len(self.first) == len(self.replicas),
                f"a result with version {version} from every replica (got {sorted(self.first)})",
            )
            promotion.result_ms = {a: (at - promoted) * 1e3 for a, at in self.first.items()}
            side = self.window_s
            await asyncio.sleep(max(0.0, promoted + side - self.loop.time()))
            promotion.before = self.bins(promoted - side, promoted)
            promotion.after = self.bins(promoted, promoted + side)
            promotion.worst_ms = (
                self.worst(promoted - side, promoted),
                self.worst(promoted, promoted + side),
            )
        return promotion

    async def _poll(self, replica: Replica, version: str, poll_s: float) -> float:
        """When the replica's stats first showed it serving ``version`` (the reply's time)."""
        async with asyncio.timeout(WAIT_S):
            while True:
                if (await serving(self.nc, replica))[0] == version:
                    return self.loop.time()
                await asyncio.sleep(poll_s)  # nothing announces a switch to an outsider

    def bins(self, since: float, until: float) -> list[int]:
        counts = [0] * round((until - since) / BIN_S)
        for at, _ in self.decision_times:
            if since <= at < until:
                counts[min(int((at - since) / BIN_S), len(counts) - 1)] += 1
        return counts

    def worst(self, since: float, until: float) -> float:
        """The slowest decision (ingest to decision, ms) arriving in ``[since, until)``."""
        return max((ms for at, ms in self.decision_times if since <= at < until), default=0.0)

    async def integrity(self) -> Integrity:
        """Wait for every frame's decision, then count."""
        sent = {(i + 1) * self.case_ns for i in range(self.sent)}
        await self.until(lambda: sent <= self.windows, f"decisions for all {self.sent} frames")
        await asyncio.sleep(0.5)  # a repeat would come within this; nothing announces none
        return Integrity(
            frames=self.sent,
            decisions=sum(self.decided.values()),
            decided=len(self.decided),
            unknown=len(self.windows - sent),
            statuses=Counter(self.statuses),
            accel_answers=Counter(self.accel_answers.values()),
            changes={r.agent_id: self.changes[r.agent_id] for r in self.replicas},
        )


def _next_version(k: int) -> str:
    """Versions promoted in turn: 2, 3, 4, 1, 2... (1 is current at start)."""
    return VERSIONS[(k + 1) % len(VERSIONS)]


async def measure_rollout(
    *,
    replicas: int,
    rate: float,
    promotions: int,
    idle_promotions: int,
    window_s: float = WINDOW_S,
    warm_up_s: float = 2.0,
) -> RolloutRun:
    """Start the deployment, promote under load then idle, and count."""
    deployment = Deployment(replicas)
    deployment.server.start()
    nc: Client | None = None
    feeder: asyncio.Task[None] | None = None
    try:
        nc = await connect(BusSettings(url=deployment.server.url), name="bench-rollout")
        registry = await store_versions(nc)
        deployment.start()
        found = await replicas_ready(deployment, nc)
        driver = Driver(nc, registry, found, window_s=window_s)
        await driver.listen()
        feeder = asyncio.create_task(driver.feed(rate))
        await driver.every_replica_answers(VERSIONS[0])
        await asyncio.sleep(warm_up_s)
        loaded = []
        for k in range(promotions):
            await asyncio.sleep(window_s)
            deployment.check_running()
            loaded.append(await driver.promote(_next_version(k), poll_s=STATS_POLL_S, loaded=True))
            print(f"    {loaded[-1].describe()}", file=sys.stderr, flush=True)
        await driver.stop_feeding(feeder)
        integrity = await driver.integrity()
        idle = []
        for k in range(promotions, promotions + idle_promotions):
            await asyncio.sleep(0.3)
            idle.append(await driver.promote(_next_version(k), poll_s=IDLE_POLL_S, loaded=False))
            print(f"    idle {idle[-1].describe()}", file=sys.stderr, flush=True)
        deployment.check_running()
        final = await asyncio.gather(*(serving(nc, r) for r in found))
        integrity.switches = {r.agent_id: s for r, (_, s) in zip(found, final, strict=True)}
        return RolloutRun(replicas, rate, window_s, loaded, idle, integrity)
    finally:
        if feeder is not None:  # on a failure: the count no longer matters
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
        if nc is not None:
            await nc.close()
        deployment.stop()
