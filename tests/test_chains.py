"""Model chains across a real nats-server: types that read other types' answers of the same
window, published as their inputs arrive, tracked with the window's deadline, fused with the
rest, and kept across kills and restarts."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from nats.aio.client import Client

from agents import AgentRuntime, ModelAgent
from agents.builtin import EnergyBandsHead, WindowStatsStage
from agents.fusion import FusionAgent
from bus import Producer, Subjects
from coordinator import (
    Coordinator,
    Plan,
    PlanBook,
    SensorInput,
    StageInput,
    SubtaskSpec,
    basicmotions_plan,
)
from fusebus.datasets import SensorDataset
from fusebus.paths import models_dir
from fusebus.replay import replay_frames
from schemas import Decision
from tests.helpers import Collector

Connect = Callable[[str], Awaitable[Client]]

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
    nc = await connect_bus("test")
    runtimes = [await serve(connect_bus, subjects, agent) for agent in agents]
    fusion = await FusionAgent(await connect_bus("fusion"), subjects=subjects).start()
    coordinator = await Coordinator(
        await connect_bus("coordinator"), plans=PlanBook(default=plan), subjects=subjects
    ).start()
    decisions = await Collector(Decision).start(nc, subjects.decision("bm"))
    try:
        sent = await replay_frames(
            Producer(nc, subjects), dataset, stream="bm", rate_hz=100, limit=count
        )
        await decisions.wait_for(len(sent), timeout_s=30)
        await decisions.settle()
    finally:
        parts: list[Coordinator | FusionAgent | AgentRuntime] = [coordinator, fusion, *runtimes]
        for part in parts:
            await part.stop()
    assert Counter(d.task_id for d in decisions.items).most_common(1)[0][1] == 1
    truth = {w.t_start_ns: w.label for w in sent}
    return ChainRun(decisions.items, truth, coordinator, fusion, runtimes)


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
