"""Metrics, live status and logs of running components."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
from nats.aio.client import Client

from bus import (
    EmbeddedServer,
    Producer,
    Subjects,
    TopologySettings,
    ensure_streams,
    free_port,
)
from fusebus.datasets import SensorDataset
from fusebus.metrics import serve_metrics
from fusebus.replay import aligned_start_ns, chunk_schedule, send_schedule
from schemas import Decision, Result, Subtask, Window
from tests.helpers import Collector, Pipeline, wait_for_agents

ROOT = Path(__file__).resolve().parent.parent
StartPipeline = Callable[..., Awaitable[Pipeline]]
Spawn = Callable[..., subprocess.Popen[bytes]]


def scrape(port: int) -> dict[str, float]:
    """The samples of a /metrics page, by their full name with labels."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def test_metrics_endpoints_serve_named_metrics_that_move_with_work(
    pipeline: StartPipeline, basicmotions: SensorDataset
) -> None:
    """Coordinator, agent and fusion metrics carry Prometheus names and count the work done."""
    parts = await pipeline()
    assert parts.coordinator is not None and parts.fusion is not None
    ports = {"coordinator": free_port(), "agent": free_port(), "fusion": free_port()}
    serve_metrics(parts.coordinator, ports["coordinator"])
    serve_metrics(parts.agents[0], ports["agent"])
    serve_metrics(parts.fusion, ports["fusion"])
    before = {name: await asyncio.to_thread(scrape, port) for name, port in ports.items()}
    assert before["coordinator"]["fusebus_tasks_opened_total"] == 0

    decisions = await Collector(Decision).start_stream(parts.nc, parts.subjects.decision("m"))
    schedule, _ = chunk_schedule(
        basicmotions,
        streams=["m"],
        speed=200,
        chunk_ms=1000,
        start_ns=aligned_start_ns(basicmotions),
        limit=6,
    )
    await send_schedule(Producer(parts.nc, parts.subjects), schedule)
    await decisions.wait_for(6)
    after = {name: await asyncio.to_thread(scrape, port) for name, port in ports.items()}

    coordinator, agent, fusion = after["coordinator"], after["agent"], after["fusion"]
    assert coordinator["fusebus_chunks_total"] == 120
    assert coordinator["fusebus_tasks_opened_total"] == 6
    assert coordinator['fusebus_tasks_ended_total{state="complete"}'] == 6
    assert agent['fusebus_agent_subtasks_processed_total{type="accel"}'] == 6
    assert agent['fusebus_agent_inference_seconds_count{type="accel"}'] >= 1
    assert agent['fusebus_agent_answers_total{model="basicmotions-accel@1.0.0",type="accel"}'] == 6
    assert agent['fusebus_agent_model_switches_total{type="accel"}'] == 0
    assert fusion['fusebus_decisions_total{status="complete"}'] == 6
    assert fusion["fusebus_decision_latency_seconds_count"] == 6
    assert fusion['fusebus_decision_latency_seconds_bucket{le="+Inf"}'] == 6


async def test_status_watch_shows_streams_decisions_and_agents(
    nats_server: EmbeddedServer, pipeline: StartPipeline, basicmotions: SensorDataset
) -> None:
    """`fusebus status --watch` redraws the counts: decisions, latency, agents by type."""
    parts = await pipeline()
    decisions = await Collector(Decision).start_stream(parts.nc, parts.subjects.decision("w"))
    schedule, _ = chunk_schedule(
        basicmotions,
        streams=["w"],
        speed=200,
        chunk_ms=1000,
        start_ns=aligned_start_ns(basicmotions),
        limit=4,
    )
    await send_schedule(Producer(parts.nc, parts.subjects), schedule)
    await decisions.wait_for(4)
    done = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "fusebus",
            "status",
            "--watch",
            "--count",
            "2",
            "--interval-s",
            "0.6",
            "--nats-url",
            nats_server.url,
            "--prefix",
            parts.subjects.prefix,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    summaries = [line for line in done.stdout.splitlines() if line.startswith("streams ")]
    assert len(summaries) == 2 and summaries[-1].startswith("streams 1 · open tasks 0")
    fused = [line for line in done.stdout.splitlines() if line.startswith("fusion fusion ")]
    assert len(fused) == 2
    assert "decided 4 " in fused[-1] and "complete 4" in fused[-1]
    assert "decisions/s 0.0" in fused[-1]
    assert "latency p50" in fused[-1] and "p50 0.0 ms" not in fused[-1]
    rows = {
        line.split()[0]: line.split()
        for line in done.stdout.splitlines()
        if line.split()[:1] in (["accel"], ["gyro"])
    }
    assert rows["accel"][1] == "1" and rows["gyro"][1] == "1"


async def test_components_log_json_with_bound_context(
    nats_server: EmbeddedServer,
    subjects: Subjects,
    connect_bus: Callable[[str], Awaitable[Client]],
    spawn: Spawn,
) -> None:
    """Off a terminal a component logs one JSON object a line; at debug each batch gives a
    line with its type, size, duration and outcome."""
    nc = await connect_bus("log-test")
    await ensure_streams(nc.jetstream(), subjects, TopologySettings())
    results = await Collector(Result).start(nc, subjects.result("s"))
    process = spawn(
        sys.executable,
        "-m",
        "fusebus",
        "agent",
        "--model",
        "accel",
        "--log-level",
        "debug",
        "--nats-url",
        nats_server.url,
        "--prefix",
        subjects.prefix,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    await wait_for_agents(nc, subjects.prefix, {"accel": 1})
    subtask = Subtask(
        task_id="t1",
        stream="s",
        type="accel",
        window=Window(0, 1),
        inputs={"accel": np.zeros((100, 3), np.float32)},
        deadline_ns=2**62,
        expected=("accel",),
    )
    await Producer(nc, subjects).subtasks([subtask])
    await results.wait_for(1)
    process.send_signal(signal.SIGTERM)
    output, _ = await asyncio.to_thread(process.communicate, timeout=30)
    records = [json.loads(line) for line in output.decode().splitlines() if line.startswith("{")]
    assert records and all({"event", "level", "timestamp"} <= set(r) for r in records)
    batch = next(r for r in records if r["event"] == "batch.done")
    assert (
        batch["type"] == "accel"
        and batch["size"] == 1
        and batch["outcome"] == "ok"
        and "duration_ms" in batch
    )
    assert batch["agent"].startswith("accel-")  # the replica is bound to every line of its loop
    assert any(r["event"] == "agent.stopped" and r["processed"] == 1 for r in records)
