"""Model chains across a real nats-server: types that read other types' answers of the same
window, published as their inputs arrive, tracked with the window's deadline, fused with the
rest, and kept across kills and restarts."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from nats.aio.client import Client

from agents import AgentRuntime, ModelAgent
from agents.builtin import EnergyBandsHead, SmoothingStage, WindowStatsStage
from agents.fusion import FusionAgent
from bus import EmbeddedServer, Producer, Subjects, agent_info_from_metadata, agent_info_metadata
from bus.discovery import INFO
from coordinator import (
    AgentDirectory,
    Coordinator,
    KnownType,
    Plan,
    PlanBook,
    SensorInput,
    StageInput,
    SubtaskSpec,
    basicmotions_plan,
    chain_problems,
)
from fusebus.datasets import SensorDataset
from fusebus.paths import models_dir
from fusebus.replay import replay_frames
from schemas import AgentInfo, Decision, InputSpec, ModelRef, SensorFrame
from tests.helpers import Collector, FrameFeeder, eventually, wait_for_agents, wait_for_role
from tests.test_faults import bus_args, intake_done

Connect = Callable[[str], Awaitable[Client]]
Spawn = Callable[..., subprocess.Popen[bytes]]
FUSEBUS = (sys.executable, "-m", "fusebus")

ACCEL = SubtaskSpec("accel", (SensorInput("accel"),))
GYRO = SubtaskSpec("gyro", (SensorInput("gyro"),))
STATS = SubtaskSpec("stats", (SensorInput("accel"),))
ENERGY = SubtaskSpec("energy", after=(StageInput("stats"),))


def chain_plan(*specs: SubtaskSpec, deadline_ms: float = 2000.0, **options: Any) -> Plan:
    """The BasicMotions plan (windows, sensors) with these subtask types."""
    return dataclasses.replace(
        basicmotions_plan(deadline_ms=deadline_ms), subtasks=specs, **options
    )


async def serve(connect_bus: Connect, subjects: Subjects, agent: Any) -> AgentRuntime:
    """``agent`` served in this process on its own connection."""
    return await AgentRuntime(agent, await connect_bus(agent.type), subjects=subjects).start()


@dataclasses.dataclass
class Rig:
    """Agents, a fusion agent and (unless in its own process) a coordinator, in this process
    on their own connections, with a collector of the stream ``bm``'s decisions."""

    connect_bus: Connect
    subjects: Subjects
    nc: Client
    decisions: Collector[Decision]
    fusion: FusionAgent
    runtimes: list[AgentRuntime]
    coordinator: Coordinator | None = None

    @property
    def producer(self) -> Producer:
        return Producer(self.nc, self.subjects)

    async def serve(self, agent: Any) -> AgentRuntime:
        """Serve one more agent."""
        self.runtimes.append(await serve(self.connect_bus, self.subjects, agent))
        return self.runtimes[-1]


@contextlib.asynccontextmanager
async def chain_rig(
    connect_bus: Connect, subjects: Subjects, plan: Plan | None, agents: list[Any]
) -> AsyncIterator[Rig]:
    """A :class:`Rig` serving ``agents``, with a coordinator of ``plan`` (none when ``None``);
    every component is stopped on the way out."""
    nc = await connect_bus("test")
    runtimes = [await serve(connect_bus, subjects, agent) for agent in agents]
    fusion = await FusionAgent(await connect_bus("fusion"), subjects=subjects).start()
    decisions = await Collector(Decision).start_stream(nc, subjects.decision("bm"))
    rig = Rig(connect_bus, subjects, nc, decisions, fusion, runtimes)
    try:
        if plan is not None:
            rig.coordinator = await Coordinator(
                await connect_bus("coordinator"), plans=PlanBook(default=plan), subjects=subjects
            ).start()
        yield rig
    finally:
        if rig.coordinator is not None:
            await rig.coordinator.stop()
        await fusion.stop()
        for runtime in rig.runtimes:
            await runtime.stop()


async def run_chain(
    connect_bus: Connect,
    subjects: Subjects,
    dataset: SensorDataset,
    plan: Plan,
    agents: list[Any],
    *,
    count: int = 40,
) -> ChainRun:
    """Serve ``agents``, a fusion agent and a coordinator with ``plan``; replay ``count``
    TEST cases as frames and return one decision per window, and the components (stopped)."""
    async with chain_rig(connect_bus, subjects, plan, agents) as rig:
        sent = await replay_frames(rig.producer, dataset, stream="bm", rate_hz=100, limit=count)
        await rig.decisions.wait_for(len(sent), timeout_s=30)
        await rig.decisions.settle()
    decisions = rig.decisions.items
    assert Counter(d.task_id for d in decisions).most_common(1)[0][1] == 1
    truth = {w.t_start_ns: w.label for w in sent}
    assert rig.coordinator is not None
    return ChainRun(decisions, truth, rig.coordinator, rig.fusion, rig.runtimes)


@dataclasses.dataclass
class ChainRun:
    """What :func:`run_chain` saw, and its (stopped) components."""

    decisions: list[Decision]
    truth: dict[int, str]  # window start -> label
    coordinator: Coordinator
    fusion: FusionAgent
    runtimes: list[AgentRuntime]

    @property
    def accuracy(self) -> float:
        return float(np.mean([d.label == self.truth[d.window.t_start_ns] for d in self.decisions]))

    @property
    def processed(self) -> dict[str, int]:
        return {r.agent.type: r.counts["processed"] for r in self.runtimes}


async def test_a_two_stage_chain_is_fused_with_the_per_sensor_models(
    connect_bus: Connect, subjects: Subjects, basicmotions: SensorDataset
) -> None:
    """``stats`` (numpy features of the accelerometer) feeds ``energy`` (class scores): every
    window is decided once, complete, with energy fused beside accel and gyro and the stats
    features read by energy but never fused."""
    plan = chain_plan(ACCEL, GYRO, STATS, ENERGY)
    assert plan.fused == ("accel", "gyro", "energy")
    models = [ModelAgent(models_dir() / f"{t}.tflite") for t in ("accel", "gyro")]
    run = await run_chain(
        connect_bus, subjects, basicmotions, plan, [*models, WindowStatsStage(), EnergyBandsHead()]
    )
    assert len(run.decisions) == 40
    assert all(d.status == "complete" and d.missing == () for d in run.decisions)
    assert all(set(d.contributors) == {"accel", "gyro", "energy"} for d in run.decisions)
    assert run.coordinator.counts["stages_published"] == 40
    assert run.fusion.counts["not_fused"] == 40  # every stats answer, skipped by fusion
    assert run.processed == {"accel": 40, "gyro": 40, "stats": 40, "energy": 40}
    assert run.accuracy >= 0.9


async def test_a_three_stage_chain_runs_each_stage_once_per_window(
    connect_bus: Connect, subjects: Subjects, basicmotions: SensorDataset
) -> None:
    """``smooth`` (a numpy moving average) -> ``stats`` (reading smooth's output, not a
    sensor) -> ``energy``: each stage runs once per window and every decision is complete."""
    plan = chain_plan(
        SubtaskSpec("smooth", (SensorInput("accel"),)),
        SubtaskSpec("stats", after=(StageInput("smooth"),)),
        ENERGY,
    )
    assert plan.fused == ("energy",)
    agents = [
        SmoothingStage(width=3),
        WindowStatsStage(source="smooth", stage=True),
        EnergyBandsHead(),
    ]
    run = await run_chain(connect_bus, subjects, basicmotions, plan, agents, count=20)
    assert len(run.decisions) == 20
    assert all(d.status == "complete" and d.contributors == ("energy",) for d in run.decisions)
    assert run.processed == {"smooth": 20, "stats": 20, "energy": 20}
    assert run.coordinator.counts["stages_published"] == 40  # stats and energy, per window
    assert run.fusion.counts["not_fused"] == 40  # smooth and stats answers


class FanInHead:
    """A head reading two stats stages: scores from the accelerometer's motion energy, and
    what it was given, kept for the test to check."""

    runtime = "test"
    weight = 1.0
    model = ModelRef("fan-in", "1")

    def __init__(self, *, optional_gyro: bool = False) -> None:
        self.type = "head"
        self.inputs = (
            InputSpec("stats_accel", stage=True, shape=(13,)),
            InputSpec("stats_gyro", stage=True, shape=(13,), optional=optional_gyro),
        )
        self.bands = EnergyBandsHead(stage="stats_accel")
        self.labels = self.bands.labels
        self.given: list[tuple[str, ...]] = []

    def warm_up(self) -> None:
        """Nothing to load."""

    def predict(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        rows = len(batch["stats_accel"])
        self.given += [tuple(sorted(batch))] * rows
        return self.bands.predict(batch)


FAN_IN = (
    SubtaskSpec("stats_accel", (SensorInput("accel"),)),
    SubtaskSpec("stats_gyro", (SensorInput("gyro"),)),
)


def stats_of(sensor: str) -> WindowStatsStage:
    return WindowStatsStage(type=f"stats_{sensor}", source=sensor)


async def test_two_stages_fan_in_to_one_head(
    connect_bus: Connect, subjects: Subjects, basicmotions: SensorDataset
) -> None:
    """The head is published once both stats stages answered, with both outputs as inputs."""
    plan = chain_plan(
        *FAN_IN, SubtaskSpec("head", after=(StageInput("stats_accel"), StageInput("stats_gyro")))
    )
    head = FanInHead()
    run = await run_chain(
        connect_bus,
        subjects,
        basicmotions,
        plan,
        [stats_of("accel"), stats_of("gyro"), head],
        count=20,
    )
    assert all(d.status == "complete" and d.contributors == ("head",) for d in run.decisions)
    assert head.given == [("stats_accel", "stats_gyro")] * 20
    assert run.coordinator.counts["stages_published"] == 20
    assert run.accuracy >= 0.9


async def test_with_no_upstream_agent_the_head_is_never_published_and_says_why(
    connect_bus: Connect, subjects: Subjects, basicmotions: SensorDataset
) -> None:
    """No stats agent runs: energy is never published, every decision is partial (accel
    answered) and names the reason: energy waited for stats, which had no answer."""
    plan = chain_plan(ACCEL, STATS, ENERGY, deadline_ms=500)
    energy = EnergyBandsHead()
    run = await run_chain(
        connect_bus,
        subjects,
        basicmotions,
        plan,
        [ModelAgent(models_dir() / "accel.tflite"), energy],
        count=10,
    )
    assert len(run.decisions) == 10
    for d in run.decisions:
        assert d.status == "partial" and d.contributors == ("accel",)
        assert d.missing == ("energy",)
        assert d.missing_reasons == {"energy": "upstream: stats", "stats": "deadline"}
        assert d.latency_ms >= 500
    assert run.processed["energy"] == 0
    assert run.coordinator.counts["stages_published"] == 0


async def test_with_no_downstream_agent_the_head_is_missing_at_the_deadline(
    connect_bus: Connect, subjects: Subjects, basicmotions: SensorDataset
) -> None:
    """No energy agent runs: stats answers, energy is published and waits out the deadline;
    decisions are partial with energy missing for want of an answer, stats not missing."""
    plan = chain_plan(ACCEL, STATS, ENERGY, deadline_ms=500)
    run = await run_chain(
        connect_bus,
        subjects,
        basicmotions,
        plan,
        [ModelAgent(models_dir() / "accel.tflite"), WindowStatsStage()],
        count=10,
    )
    for d in run.decisions:
        assert d.status == "partial" and d.contributors == ("accel",)
        assert d.missing_reasons == {"energy": "deadline"}
    assert run.processed["stats"] == 10
    assert run.coordinator.counts["stages_published"] == 10


async def test_an_optional_upstream_that_cannot_come_is_not_waited_for(
    connect_bus: Connect, subjects: Subjects, basicmotions: SensorDataset
) -> None:
    """With gyro frames missing, stats_gyro has no input: the head, for which it is
    optional, runs at once on stats_accel alone and every decision is complete."""
    plan = chain_plan(
        *FAN_IN,
        SubtaskSpec(
            "head", after=(StageInput("stats_accel"), StageInput("stats_gyro", optional=True))
        ),
    )
    head = FanInHead(optional_gyro=True)
    agents = [stats_of("accel"), stats_of("gyro"), head]
    async with chain_rig(connect_bus, subjects, plan, agents) as rig:
        for i, case in enumerate(basicmotions.x_test[:10]):
            accel = basicmotions.sensor_view(case, "accel")
            await rig.producer.frame(
                SensorFrame(
                    stream="bm",
                    t_ns=(i + 1) * 10**10,
                    period_ns=basicmotions.period_ns,
                    sensors={"accel": accel},  # the gyroscope is silent
                )
            )
        await rig.decisions.wait_for(10)
        await rig.decisions.settle()
    decisions = rig.decisions
    assert len(decisions.items) == 10
    assert all(d.status == "complete" and d.contributors == ("head",) for d in decisions.items)
    assert all(d.latency_ms < 2000 for d in decisions.items)  # not held to the deadline
    assert head.given == [("stats_accel",)] * 10


CHAIN_PLANS = """
[default]
deadline_ms = {deadline_ms}

[default.window]
size_ms = 10000
hop_ms = 10000
rate_hz = 10
lateness_ms = 2000

[default.sensors.accel]
required = true

[default.sensors.gyro]
required = false

[default.subtasks.accel]
sensors = ["accel"]

[default.subtasks.stats]
sensors = ["accel"]

[default.subtasks.energy]
after = ["stats"]
"""


async def test_a_stage_replica_killed_mid_run_leaves_one_decision_per_window(
    nats_server: EmbeddedServer,
    subjects: Subjects,
    connect_bus: Connect,
    spawn: Spawn,
    basicmotions: SensorDataset,
) -> None:
    """Two ``stats`` replicas as processes share the stage; SIGKILL one mid-stream: every
    window still gets exactly one decision, and windows after the kill complete through the
    other replica."""
    nc = await connect_bus("test")
    args = bus_args(nats_server, subjects)
    replicas = [spawn(*FUSEBUS, "agent", "--agent", "stats", *args) for _ in range(2)]
    await wait_for_agents(nc, subjects.prefix, {"stats": 2})
    plan = chain_plan(ACCEL, STATS, ENERGY, deadline_ms=1000)
    agents = [ModelAgent(models_dir() / "accel.tflite"), EnergyBandsHead()]
    async with chain_rig(connect_bus, subjects, plan, agents) as rig:
        decisions = rig.decisions
        feeder = FrameFeeder(nc, subjects, basicmotions, every_s=0.02).start()
        try:
            await decisions.wait_for(20)
            replicas[0].send_signal(signal.SIGKILL)
            killed_ns = time.time_ns()
            await decisions.wait_until(
                lambda d: d.status == "complete" and d.decided_ns > killed_ns + 2 * 10**9
            )
            sent = await feeder.stop()
            await decisions.wait_for(sent, timeout_s=30)
            await decisions.settle(1.0)
        finally:
            await feeder.stop()
    per_window = Counter(d.task_id for d in decisions.items)
    assert len(per_window) == sent and max(per_window.values()) == 1
    assert sum(d.status == "complete" for d in decisions.items) > sent / 2
    for d in decisions.items:
        if d.status != "complete":  # a window whose stats subtask died with the replica
            assert d.missing == ("energy",), d
            assert d.missing_reasons["energy"] == "upstream: stats"


async def test_a_coordinator_restarted_mid_chain_publishes_the_waiting_stages(
    nats_server: EmbeddedServer,
    subjects: Subjects,
    connect_bus: Connect,
    spawn: Spawn,
    basicmotions: SensorDataset,
    tmp_path: Path,
) -> None:
    """The coordinator opens windows whose ``stats`` stage has no replica yet, journals their
    waiting ``energy`` stages, and is SIGKILLed. Stats then answers while no coordinator
    runs; the restarted coordinator restores the waiting stages from its journal, gives
    them those answers and publishes them: every window ends complete, energy included."""
    plans = tmp_path / "chain.toml"
    plans.write_text(CHAIN_PLANS.format(deadline_ms=60_000), encoding="utf-8")
    command = (*FUSEBUS, "coordinator", "--config", str(plans), *bus_args(nats_server, subjects))
    agents = [ModelAgent(models_dir() / "accel.tflite"), EnergyBandsHead()]
    async with chain_rig(connect_bus, subjects, None, agents) as rig:
        decisions, nc = rig.decisions, rig.nc
        coordinator = spawn(*command)
        await wait_for_role(nc, subjects.prefix, "coordinator")
        sent = await replay_frames(rig.producer, basicmotions, stream="bm", rate_hz=100, limit=10)
        # Frames are acked once the tasks they opened (with their waiting stages) are
        # in the journal.
        await eventually(
            lambda: intake_done(nc, subjects, len(sent)), what="every frame acked (journalled)"
        )
        assert decisions.items == []  # energy waits for stats, which nobody serves yet
        coordinator.send_signal(signal.SIGKILL)
        coordinator.wait(timeout=10)
        stats = await rig.serve(WindowStatsStage())
        await eventually(
            lambda: stats.counts["processed"] == len(sent),
            what="stats answered every window while no coordinator ran",
        )
        spawn(*command)
        await decisions.wait_for(len(sent), timeout_s=30)
        await decisions.settle(1.0)
    assert len(decisions.items) == len(sent)
    assert len({d.task_id for d in decisions.items}) == len(sent)
    for d in decisions.items:
        assert d.status == "complete", d
        assert set(d.contributors) == {"accel", "energy"}
    assert rig.runtimes[1].counts["processed"] == len(sent)  # energy: once per window


async def test_an_auto_plan_includes_a_stage_once_its_upstream_is_served(
    connect_bus: Connect, subjects: Subjects, basicmotions: SensorDataset
) -> None:
    """With ``auto``, discovery learns from energy's card that it reads stats: while no
    stats replica runs, windows do not expect energy (and complete without it); once
    stats runs, energy is part of every window's chain and is fused."""
    plan = dataclasses.replace(basicmotions_plan(), subtasks=(), auto=True)
    agents = [ModelAgent(models_dir() / "accel.tflite"), EnergyBandsHead()]
    async with chain_rig(connect_bus, subjects, plan, agents) as rig:
        directory = rig.coordinator.directory if rig.coordinator else None
        assert directory is not None
        await eventually(lambda: "energy" in directory, what="the coordinator saw energy")
        first = await replay_frames(rig.producer, basicmotions, stream="bm", rate_hz=100, limit=5)
        await rig.decisions.wait_for(5)
        await rig.serve(WindowStatsStage())
        await eventually(lambda: "stats" in directory, what="the coordinator saw stats")
        await replay_frames(
            rig.producer,
            basicmotions,
            stream="bm",
            rate_hz=100,
            limit=5,
            start_ns=first[-1].t_start_ns + 10**10,
        )
        await rig.decisions.wait_for(10)
        await rig.decisions.settle()
    decisions = rig.decisions
    before, after = decisions.items[:5], decisions.items[5:]
    assert all(d.status == "complete" and d.contributors == ("accel",) for d in before)
    assert all(d.status == "complete" for d in after)
    assert all(set(d.contributors) == {"accel", "energy"} for d in after)


def known(
    type_name: str, *inputs: InputSpec, output: str = "scores", shape: tuple[int, ...] = (4,)
) -> KnownType:
    return KnownType(type_name, inputs, 1, 0.0, output, shape)  # type: ignore[arg-type]


def test_what_a_chain_cannot_do_with_the_running_cards_is_said_in_one_line_each() -> None:
    """A stage whose card lacks an upstream the plan gives it, an upstream shape its reader
    does not take, and a fused type answering features are each one sentence; a chain whose
    cards fit, or whose types are not running, has none."""
    plan = chain_plan(ACCEL, STATS, ENERGY)
    fits = {
        "stats": known("stats", InputSpec("accel", 0, 3), output="features", shape=(13,)),
        "energy": known("energy", InputSpec("stats", stage=True, shape=(13,))),
    }
    assert chain_problems(plan.subtasks, plan.fused, fits) == []
    assert chain_problems(plan.subtasks, plan.fused, {}) == []
    wrong_shape = {**fits, "energy": known("energy", InputSpec("stats", stage=True, shape=(7,)))}
    (problem,) = chain_problems(plan.subtasks, plan.fused, wrong_shape)
    assert problem == (
        "type 'energy' reads 'stats' as shape [7], but 'stats' answers features of shape [13]"
    )
    no_input = {**fits, "energy": known("energy", InputSpec("accel", 0, 3))}
    (problem,) = chain_problems(plan.subtasks, plan.fused, no_input)
    assert "its card has no stage input 'stats'" in problem
    fused_features = chain_plan(ACCEL, STATS, ENERGY, fuse=("stats",))
    (problem,) = chain_problems(fused_features.subtasks, fused_features.fused, fits)
    assert problem.startswith("type 'stats' is fused but answers features")


def test_an_auto_plan_asks_a_features_type_only_when_some_type_reads_it() -> None:
    """A card's features output survives discovery, and an ``auto`` plan leaves out a
    features type that no type reads (fusion could not use its answer), also a stage whose
    only reader is left out, while keeping those a running or listed type reads."""
    scores = ("standing", "walking")

    def card(type_name: str, reads: str = "", *, features: bool = False) -> AgentInfo:
        sensor = InputSpec(reads, stage=True, shape=(13,)) if reads else InputSpec("accel", 0, 3)
        info = AgentInfo(
            agent_id=f"{type_name}-1",
            type=type_name,
            model=ModelRef("m", "1"),
            runtime="test",
            inputs=(sensor,),
            labels=() if features else scores,
            output="features" if features else "scores",
            output_shape=(13,) if features else (),
        )
        found = agent_info_from_metadata(agent_info_metadata(info, prefix="fb"))
        assert found == info
        return found

    directory = AgentDirectory()
    directory.observe(
        [
            card("accel"),
            card("stats", features=True),
            card("head", "stats"),
            card("lonely", features=True),
            card("deep", "lonely", features=True),  # reads lonely, read by nobody
            card("listed-reads", features=True),
        ],
        now=0.0,
    )
    specs = directory.feedable({"accel": (100, 3)}, read={"listed-reads"})
    assert [s.type for s in specs] == ["accel", "head", "listed-reads", "stats"]


def test_a_card_input_with_keys_this_version_does_not_know_is_still_read() -> None:
    """An agent in another language may say more of an input than fusebus reads: the
    extra keys are ignored, not the whole card."""
    info = AgentInfo(
        agent_id="head-1",
        type="head",
        model=ModelRef("m", "1"),
        runtime="js",
        inputs=(InputSpec("stats", stage=True, shape=(13,)),),
        labels=("a", "b"),
    )
    metadata = agent_info_metadata(info, prefix="fb")
    body = json.loads(metadata[INFO])
    body["inputs"][0]["units"] = "g"
    body["inputs"][0]["dtype"] = "float32"
    found = agent_info_from_metadata({**metadata, INFO: json.dumps(body)})
    assert found == info


async def test_a_fused_type_answering_features_is_decided_without_its_vote(
    connect_bus: Connect, subjects: Subjects, basicmotions: SensorDataset
) -> None:
    """A plan that fuses a features stage is a mistake fusion survives: each window is
    decided at once from the votes it can use, the stage named missing, nothing retried."""
    plan = chain_plan(ACCEL, STATS, ENERGY, fuse=("stats",))
    agents = [ModelAgent(models_dir() / "accel.tflite"), WindowStatsStage(), EnergyBandsHead()]
    run = await run_chain(connect_bus, subjects, basicmotions, plan, agents, count=10)
    assert len(run.decisions) == 10
    for d in run.decisions:
        assert d.status == "partial" and set(d.contributors) == {"accel", "energy"}
        assert d.missing == ("stats",) and d.missing_reasons == {"stats": "error"}
        assert d.latency_ms < 2000  # not held to the deadline
    assert run.fusion.counts["unusable_answers"] == 10
    assert run.fusion.inbound.counts["naks"] == 0
