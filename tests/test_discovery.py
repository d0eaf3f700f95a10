"""Live plug-in: agents found by discovery join running streams, from any language."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
from nats.aio.client import Client

from agents import AgentRuntime, ModelAgent
from agents.builtin import EnergyBandsHead, MotionEnergyAgent, WindowStatsStage
from agents.fusion import FusionAgent
from bus import EmbeddedServer, Producer, Subjects, TopologySettings, discover_agents
from coordinator import Coordinator, PlanBook, SensorInput, StageInput, SubtaskSpec, auto_plan
from fusebus.datasets import SensorDataset
from fusebus.paths import models_dir
from fusebus.replay import replay_frames
from schemas import Decision, Result, SensorFrame
from tests.helpers import Collector, wait_for_agents
from tests.test_chains import ACCEL, chain_plan, run_chain

ROOT = Path(__file__).resolve().parent.parent
NODE_AGENT = ROOT / "examples" / "node-agent"
Connect = Callable[[str], Awaitable[Client]]


async def start_agent(connect_bus: Connect, subjects: Subjects, agent: object) -> AgentRuntime:
    return await AgentRuntime(agent, await connect_bus("agent"), subjects=subjects).start()  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def live_stream(
    nc: Client, subjects: Subjects, dataset: SensorDataset, *, every_s: float
) -> AsyncIterator[None]:
    """Publish frames of the TEST cases, one every ``every_s``, until the block ends."""
    producer = Producer(nc, subjects)

    async def run() -> None:
        i = 0
        while True:
            case = dataset.x_test[i % len(dataset.x_test)]
            sensors = {name: dataset.sensor_view(case, name) for name in dataset.sensors}
            await producer.frame(
                SensorFrame(
                    stream="bm", t_ns=i * 10**10, period_ns=dataset.period_ns, sensors=sensors
                )
            )
            i += 1
            await asyncio.sleep(every_s)  # the pace of live sensors

    task = asyncio.create_task(run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_auto_plan_follows_agent_types_as_they_come_and_go(
    subjects: Subjects, connect_bus: Connect, basicmotions: SensorDataset
) -> None:
    """With an `auto` plan, a gyro agent started mid-stream is expected from the next windows
    on, and once it stops, later windows stop expecting it and are complete without it,
    naming it as absent."""
    nc = await connect_bus("test")
    decisions = await Collector(Decision).start(nc, subjects.decision("bm"))
    fusion = await FusionAgent(await connect_bus("fusion"), subjects=subjects).start()
    accel = await start_agent(connect_bus, subjects, ModelAgent(models_dir() / "accel.tflite"))
    coordinator = await Coordinator(
        await connect_bus("coordinator"),
        plans=PlanBook(default=auto_plan(deadline_ms=400)),
        subjects=subjects,
    ).start()
    gyro: AgentRuntime | None = None
    try:
        async with live_stream(nc, subjects, basicmotions, every_s=0.04):
            first = await decisions.wait_for(5)
            assert all(d.contributors == ("accel",) and d.status == "complete" for d in first[:5])
            assert all(d.absent == () and d.fusion == "fusion" for d in first[:5])

            gyro = await start_agent(
                connect_bus, subjects, ModelAgent(models_dir() / "gyro.tflite")
            )
            both = await decisions.wait_until(lambda d: set(d.contributors) == {"accel", "gyro"})
            assert both.status == "complete" and both.missing == () and both.absent == ()

            await gyro.stop()
            stopped_at = time.time_ns()
            gyro = None
            after = await decisions.wait_until(
                lambda d: d.decided_ns > stopped_at + 2 * 10**9 and d.status == "complete"
            )
            assert after.contributors == ("accel",) and after.missing == ()
            assert after.absent == ("gyro",)  # it answered this stream lately
    finally:
        for component in (coordinator, accel, gyro, fusion):
            if component is not None:
                await component.stop()
    assert "gyro" not in coordinator.directory


@pytest.fixture(scope="session")
def node_agent_ready() -> Path:
    """The Node example's dependencies, installed from its lock file when missing."""
    if not (NODE_AGENT / "node_modules" / "@nats-io" / "jetstream").exists():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_AGENT, check=True, timeout=600
        )
    return NODE_AGENT / "agent.mjs"


async def test_node_agent_is_discovered_and_its_results_fused(
    nats_server: EmbeddedServer,
    subjects: Subjects,
    connect_bus: Connect,
    basicmotions: SensorDataset,
    node_agent_ready: Path,
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> None:
    """The JavaScript agent, written from docs/protocol.md, registers through $SRV, is picked
    up by an auto plan, and its answers are fused with a Python agent's into every decision."""
    nc = await connect_bus("test")
    spawn("node", str(node_agent_ready), "--nats-url", nats_server.url, "--prefix", subjects.prefix)
    fusion = await FusionAgent(await connect_bus("fusion"), subjects=subjects).start()
    accel = await start_agent(connect_bus, subjects, ModelAgent(models_dir() / "accel.tflite"))
    await wait_for_agents(nc, subjects.prefix, {"accel": 1, "motion-js": 1})
    coordinator = await Coordinator(
        await connect_bus("coordinator"), plans=PlanBook(default=auto_plan()), subjects=subjects
    ).start()
    decisions = await Collector(Decision).start(nc, subjects.decision("bm"))
    try:
        sent = await replay_frames(Producer(nc, subjects), basicmotions, stream="bm", rate_hz=100)
        await decisions.wait_for(40)
    finally:
        for component in (coordinator, accel, fusion):
            await component.stop()
    truth = {w.t_start_ns: w.label for w in sent}
    assert all(
        set(d.contributors) == {"accel", "motion-js"} and d.status == "complete"
        for d in decisions.items
    )
    assert sum(d.label == truth[d.window.t_start_ns] for d in decisions.items) / 40 >= 0.9
    stats = {
        info.type: counters for info, counters in await discover_agents(nc, prefix=subjects.prefix)
    }
    assert stats["motion-js"]["processed"] == 40


async def test_status_lists_agents_by_type_with_replicas_and_counters(
    nats_server: EmbeddedServer,
    subjects: Subjects,
    connect_bus: Connect,
    basicmotions: SensorDataset,
) -> None:
    """`fusebus status` shows each running type once, with its replica count and counters."""
    runtimes = [
        await start_agent(connect_bus, subjects, ModelAgent(models_dir() / "accel.tflite")),
        await start_agent(connect_bus, subjects, ModelAgent(models_dir() / "accel.tflite")),
        await start_agent(connect_bus, subjects, MotionEnergyAgent()),
    ]
    try:
        done = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "fusebus",
                "status",
                "--nats-url",
                nats_server.url,
                "--prefix",
                subjects.prefix,
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
    finally:
        for runtime in runtimes:
            await runtime.stop()
    assert done.returncode == 0, done.stderr
    rows = {
        line.split()[0]: line.split()
        for line in done.stdout.splitlines()
        if line.split()[:1] in (["accel"], ["motion"])
    }
    assert rows["accel"][1] == "2" and rows["accel"][2] == "litert"
    assert rows["motion"][1] == "1" and rows["motion"][2] == "rules"


async def test_node_agent_serves_batches_by_column_as_python_agents_do(
    nats_server: EmbeddedServer,
    subjects: Subjects,
    connect_bus: Connect,
    basicmotions: SensorDataset,
    node_agent_ready: Path,
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> None:
    """A subtask_batch (what the coordinator sends under load) and a single subtask get one
    result each from the JavaScript agent, with the Python motion agent's scores; a batch
    of the wrong shape is dead-lettered."""
    from bus import ensure_streams
    from schemas import DeadLetter, Subtask, Window

    nc = await connect_bus("test")
    await ensure_streams(nc.jetstream(), subjects, TopologySettings())
    spawn("node", str(node_agent_ready), "--nats-url", nats_server.url, "--prefix", subjects.prefix)
    await wait_for_agents(nc, subjects.prefix, {"motion-js": 1})
    results = await Collector(Result).start(nc, subjects.result("bm"))
    letters = await Collector(DeadLetter).start(nc, subjects.dlq("agent-motion-js"))
    cases = [basicmotions.sensor_view(x, "accel") for x in basicmotions.x_test[:31]]

    def subtask(i: int, accel: np.ndarray) -> Subtask:
        return Subtask(
            task_id=f"t{i}",
            stream="bm",
            type="motion-js",
            window=Window(i, i + 1),
            inputs={"accel": accel},
            deadline_ns=time.time_ns() + 60 * 10**9,
            expected=("motion-js",),
            ingest_ns=i,
        )

    producer = Producer(nc, subjects)
    await producer.subtasks_unconfirmed("motion-js", [subtask(i, cases[i]) for i in range(30)])
    await producer.subtasks_unconfirmed("motion-js", [subtask(30, cases[30])])
    bad = [subtask(100 + i, cases[i][:, :2].copy()) for i in range(2)]  # two channels, not three
    await producer.subtasks_unconfirmed("motion-js", bad)
    await results.wait_for(31)
    await letters.wait_for(1)
    await results.settle()
    assert sorted(r.task_id for r in results.items) == sorted(f"t{i}" for i in range(31))
    expected = MotionEnergyAgent().predict({"accel": np.stack(cases)})
    for result in results.items:
        i = int(result.task_id[1:])
        assert result.window == Window(i, i + 1) and result.ingest_ns == i
        assert result.output is not None
        np.testing.assert_allclose(result.output, expected[i], atol=1e-4)
    [letter] = letters.items
    assert letter.reason == "bad_input" and "3 channels" in letter.error


def accel_cases(dataset: SensorDataset, count: int) -> np.ndarray:
    """The accelerometer of the first ``count`` TEST cases, ``[count, samples, 3]``: what
    :func:`replay_frames` sends, in order."""
    return np.stack([dataset.sensor_view(x, "accel") for x in dataset.x_test[:count]])


async def test_node_agent_as_the_head_of_a_chain_reads_a_python_stage(
    nats_server: EmbeddedServer,
    subjects: Subjects,
    connect_bus: Connect,
    basicmotions: SensorDataset,
    node_agent_ready: Path,
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> None:
    """With an ``auto`` plan, the JavaScript agent declaring a stage input (``--reads stats``)
    is chained after the Python window-statistics stage: it gets each window's 13 features,
    answers the energy-band scores of the last one, and is fused beside the accel model in
    every decision, while the features themselves are never fused."""
    nc = await connect_bus("test")
    spawn(
        "node",
        str(node_agent_ready),
        *("--nats-url", nats_server.url, "--prefix", subjects.prefix),
        *("--reads", "stats", "--shape", "13"),
    )
    fusion = await FusionAgent(await connect_bus("fusion"), subjects=subjects).start()
    runtimes = [
        await start_agent(connect_bus, subjects, ModelAgent(models_dir() / "accel.tflite")),
        await start_agent(connect_bus, subjects, WindowStatsStage()),
    ]
    await wait_for_agents(nc, subjects.prefix, {"accel": 1, "stats": 1, "motion-js": 1})
    coordinator = await Coordinator(
        await connect_bus("coordinator"), plans=PlanBook(default=auto_plan()), subjects=subjects
    ).start()
    decisions = await Collector(Decision).start(nc, subjects.decision("bm"))
    results = await Collector(Result).start(nc, subjects.result("bm"))
    try:
        sent = await replay_frames(
            Producer(nc, subjects), basicmotions, stream="bm", rate_hz=100, limit=40
        )
        await decisions.wait_for(40)
        await decisions.settle()
    finally:
        await coordinator.stop()
        await fusion.stop()
        for runtime in runtimes:
            await runtime.stop()
    assert len({d.task_id for d in decisions.items}) == len(decisions.items) == 40
    assert all(
        d.status == "complete" and set(d.contributors) == {"accel", "motion-js"}
        for d in decisions.items
    )
    assert coordinator.counts["stages_published"] == 40
    assert fusion.counts["not_fused"] == 40  # the stats answers
    case = {w.t_start_ns: i for i, w in enumerate(sent)}
    features = WindowStatsStage().predict({"accel": accel_cases(basicmotions, 40)})
    expected = EnergyBandsHead().predict({"stats": features})
    heads = [r for r in results.items if r.type == "motion-js"]
    assert len(heads) == 40
    for result in heads:
        assert result.output is not None and result.labels == EnergyBandsHead().labels
        np.testing.assert_allclose(
            result.output, expected[case[result.window.t_start_ns]], atol=1e-5
        )
    truth = {w.t_start_ns: w.label for w in sent}
    assert sum(d.label == truth[d.window.t_start_ns] for d in decisions.items) / 40 >= 0.9


async def test_node_agent_answers_features_that_a_python_head_reads(
    nats_server: EmbeddedServer,
    subjects: Subjects,
    connect_bus: Connect,
    basicmotions: SensorDataset,
    node_agent_ready: Path,
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> None:
    """The JavaScript agent with ``--output features`` is a listed plan's first stage: it
    answers the window statistics the Python stage computes (13 float32 features, no
    labels), which the Python energy-band head reads, fused beside the accel model."""
    nc = await connect_bus("test")
    spawn(
        "node",
        str(node_agent_ready),
        *("--nats-url", nats_server.url, "--prefix", subjects.prefix),
        *("--type", "stats-js", "--output", "features"),
    )
    await wait_for_agents(nc, subjects.prefix, {"stats-js": 1})
    [(info, _)] = await discover_agents(nc, prefix=subjects.prefix)
    assert (info.output, info.output_shape, info.labels) == ("features", (13,), ())
    results = await Collector(Result).start(nc, subjects.result("bm"))
    plan = chain_plan(
        ACCEL,
        SubtaskSpec("stats-js", (SensorInput("accel"),)),
        SubtaskSpec("energy", after=(StageInput("stats-js"),)),
    )
    head = EnergyBandsHead(stage="stats-js")
    run = await run_chain(
        connect_bus,
        subjects,
        basicmotions,
        plan,
        [ModelAgent(models_dir() / "accel.tflite"), head],
    )
    assert len(run.decisions) == 40
    assert all(
        d.status == "complete" and set(d.contributors) == {"accel", "energy"} for d in run.decisions
    )
    assert run.fusion.counts["not_fused"] == 40 and run.accuracy >= 0.9
    case = {t: i for i, t in enumerate(sorted(run.truth))}  # windows start in sending order
    features = WindowStatsStage().predict({"accel": accel_cases(basicmotions, 40)})
    staged = {r.task_id: r for r in results.items if r.type == "stats-js"}
    assert len(staged) == 40
    for result in staged.values():
        assert result.labels == () and result.output is not None
        assert result.output.dtype == np.float32 and result.output.shape == (13,)
        np.testing.assert_allclose(
            result.output, features[case[result.window.t_start_ns]], rtol=1e-5, atol=1e-5
        )
    heads = [r for r in results.items if r.type == "energy"]
    assert len(heads) == 40
    for result in heads:
        mine = staged[result.task_id].output
        assert result.output is not None and mine is not None
        np.testing.assert_allclose(result.output, head.predict({"stats-js": mine[None]})[0])


def test_an_agents_info_round_trips_through_its_metadata_with_the_models_it_holds() -> None:
    import json

    from bus import agent_info_from_metadata, agent_info_metadata
    from schemas import AgentInfo, InputSpec, ModelRef

    info = AgentInfo(
        agent_id="accel-1",
        type="accel",
        model=ModelRef("accel-large", "2"),
        runtime="litert",
        inputs=(InputSpec("accel", 100, 3),),
        labels=("x", "y"),
        models=("accel-large", "basicmotions-accel-large", "accel-small"),
    )
    metadata = agent_info_metadata(info, prefix="fb")
    assert agent_info_from_metadata(metadata) == info
    body = json.loads(metadata["fusebus.agent_info"])
    too_many = {**metadata, "fusebus.agent_info": json.dumps({**body, "models": ["m"] * 65})}
    assert agent_info_from_metadata(too_many) is None  # refused, not an allocation on trust
    del body["models"]  # an agent that says nothing of its models: none to pin
    assert agent_info_from_metadata({**metadata, "fusebus.agent_info": json.dumps(body)}) == (
        dataclasses.replace(info, models=())
    )
