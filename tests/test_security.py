"""compose/nats.conf against a real nats-server: one user per role, least privilege."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from agents import AgentRuntime, ModelAgent
from agents.fusion import FusionAgent
from bus import BusSettings, EmbeddedServer, Producer, Subjects, TopologySettings, connect
from coordinator import Coordinator, PlanBook, basicmotions_plan
from fusebus.datasets import SensorDataset
from fusebus.paths import models_dir
from fusebus.replay import aligned_start_ns, chunk_schedule, send_schedule
from schemas import BusError, ConfigError, Decision
from tests.compose_env import connect_noting_errors
from tests.helpers import Collector

OpenAs = Callable[[str], Awaitable[Client]]


async def test_a_connection_without_credentials_is_refused(secured_server: EmbeddedServer) -> None:
    """No user, or a wrong password, cannot connect."""
    with pytest.raises(BusError, match=r"[Aa]uthorization"):
        await connect(BusSettings(url=secured_server.url, connect_timeout_s=2), name="anonymous")
    with pytest.raises(BusError):
        await connect(
            BusSettings(
                url=secured_server.url, user="agent", password="guess", connect_timeout_s=2
            ),
            name="guess",
        )


async def test_agent_credentials_cannot_publish_decisions_or_sensor_data(
    secured_server: EmbeddedServer, as_role: OpenAs
) -> None:
    """The server refuses an agent's publish to a decision or sensor subject, and no reader
    ever receives it."""
    reader = await as_role("reader")
    seen: list[str] = []

    async def on_decision(msg: Msg) -> None:
        seen.append(msg.subject)

    await reader.subscribe("fb.decision.*", cb=on_decision)
    await reader.flush()

    errors: list[str] = []
    agent = await connect_noting_errors(secured_server.url, "agent", errors)
    try:
        await agent.publish("fb.decision.s1", b"forged")
        await agent.publish("fb.sensor.s1.accel", b"forged")
        await agent.flush()
        for _ in range(50):
            if len(errors) >= 2:
                break
            await asyncio.sleep(0.02)
    finally:
        await agent.close()
    assert any('permissions violation for publish to "fb.decision.s1"' in e for e in errors), errors
    assert any("fb.sensor.s1.accel" in e for e in errors), errors
    await reader.flush()
    assert seen == []


async def test_the_whole_pipeline_runs_with_role_credentials(
    as_role: OpenAs, basicmotions: SensorDataset
) -> None:
    """Coordinator, agents, fusion, a sensor and a reader, each with its own user, decide
    every window; only the coordinator may create streams."""
    subjects = Subjects("fb")
    managed, waiting = TopologySettings(), TopologySettings(manage=False)
    coordinator = await Coordinator(
        await as_role("coordinator"),
        plans=PlanBook(default=basicmotions_plan()),
        subjects=subjects,
        topology=managed,
    ).start()
    agents = [
        await AgentRuntime(
            ModelAgent(models_dir() / f"{t}.tflite"),
            await as_role("agent"),
            subjects=subjects,
            topology=waiting,
        ).start()
        for t in ("accel", "gyro")
    ]
    fusion = await FusionAgent(await as_role("fusion"), subjects=subjects, topology=waiting).start()
    reader = await as_role("reader")
    decisions = await Collector(Decision).start_stream(reader, subjects.decision("secure"))
    sensor = await as_role("sensor")
    try:
        schedule, _ = chunk_schedule(
            basicmotions,
            streams=["secure"],
            speed=200,
            chunk_ms=1000,
            start_ns=aligned_start_ns(basicmotions),
            limit=10,
        )
        await send_schedule(Producer(sensor, subjects), schedule)
        await decisions.wait_for(10)
    finally:
        for component in (coordinator, *agents, fusion):
            await component.stop()
    assert all(d.status == "complete" for d in decisions.items)
    assert sum(a.counts["processed"] for a in agents) == 20


async def test_token_authentication(tmp_path: Path) -> None:
    """A server that wants a token accepts the right one and refuses a connection without."""
    config = tmp_path / "token.conf"
    config.write_text('authorization { token: "t0k3n-for-tests" }\n')
    with EmbeddedServer(config_file=config, store_dir=tmp_path / "data") as server:
        nc = await connect(BusSettings(url=server.url, token="t0k3n-for-tests"), name="with-token")
        assert nc.is_connected
        await nc.close()
        with pytest.raises(BusError, match="refused the credentials"):
            await connect(
                BusSettings(url=server.url, token="wrong", connect_timeout_s=2), name="bad-token"
            )


def test_a_missing_credentials_file_is_a_config_error(tmp_path: Path) -> None:
    """`--creds` naming no file stops at once, naming the path."""
    with pytest.raises(ConfigError, match="credentials file"):
        BusSettings(creds_file=tmp_path / "nobody.creds")
