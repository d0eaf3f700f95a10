"""compose/: the file validates, credentials come from the environment, and the services'
own commands scale and run the pipeline against compose/nats.conf."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bus import BusSettings, EmbeddedServer, connect, discover_agents, discover_components
from schemas import Decision
from tests.helpers import Collector

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose" / "docker-compose.yml"
EXAMPLE_ENV = ROOT / "compose" / ".env.example"
Spawn = Callable[..., subprocess.Popen[bytes]]


def docker_compose() -> str:
    found = shutil.which("docker-compose")
    assert found, "docker-compose is not installed: `apt-get install docker-compose` (.ci/run does)"
    return found


def example_env() -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in EXAMPLE_ENV.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    return {k: v for k, v in pairs}


def test_compose_file_is_valid_with_credentials_from_the_environment() -> None:
    """`docker-compose config -q` accepts the file when the passwords are set, and refuses it
    (naming the variable) when they are not: nothing secret is baked in."""
    ok = subprocess.run(
        [docker_compose(), "--env-file", str(EXAMPLE_ENV), "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert ok.returncode == 0, ok.stderr
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("FUSEBUS_")}
    missing = subprocess.run(
        [docker_compose(), "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=clean_env,
    )
    assert missing.returncode != 0 and "FUSEBUS_" in missing.stderr + missing.stdout


def test_serving_image_requirements_follow_pyproject() -> None:
    """Every serving requirement is a project dependency with the same lower bound."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    serve = [
        line
        for line in (ROOT / "compose" / "requirements-serve.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert set(serve) <= set(project), set(serve) - set(project)
    assert not any(re.match(r"tensorflow", line) for line in serve)


def services() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())["services"]  # type: ignore[no-any-return]


def service_env(name: str, url: str) -> dict[str, str]:
    """A service's environment as compose gives it, pointed at ``url``."""
    values = example_env()
    env = {}
    for key, value in services()[name]["environment"].items():
        env[key] = re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: values[m.group(1)], str(value))
    env["FUSEBUS_NATS_URL"] = url
    return {**os.environ, **env}


@pytest.fixture(scope="module")
def compose_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """nats-server with compose/nats.conf and the example passwords."""
    env = {k: v for k, v in example_env().items()}
    with EmbeddedServer(
        config_file=ROOT / "compose" / "nats.conf",
        env=env,
        store_dir=tmp_path_factory.mktemp("compose"),
    ) as server:
        yield server


async def test_services_started_as_compose_starts_them_share_the_work(
    compose_server: EmbeddedServer, spawn: Spawn
) -> None:
    """coordinator, fusion, three agent-accel replicas (as `--scale agent-accel=3`),
    agent-gyro and replay, each with its compose command and role credentials: every window
    is decided and all three accel replicas take part."""

    def start(name: str) -> subprocess.Popen[bytes]:
        command = [
            a
            for a in services()[name]["command"]
            if a not in ("--metrics-port", "9100", "--metrics-host", "0.0.0.0")
        ]
        return spawn(
            sys.executable, "-m", "fusebus", *command, env=service_env(name, compose_server.url)
        )

    reader = await connect(
        BusSettings(
            url=compose_server.url, user="reader", password=example_env()["FUSEBUS_READER_PASSWORD"]
        ),
        name="reader",
    )
    try:
        start("coordinator")
        for _ in range(100):
            if await discover_components(reader, prefix="fb", timeout_s=0.2):
                break
        start("fusion")
        for _ in range(3):
            start("agent-accel")
        start("agent-gyro")
        for _ in range(150):
            if Counter(
                i.type for i, _ in await discover_agents(reader, prefix="fb", timeout_s=0.2)
            ) == {"accel": 3, "gyro": 1}:
                break
        decisions = await Collector(Decision).start_stream(reader, "fb.decision.*")
        replay = services()["replay"]["command"]
        fast = [*replay, "--limit", "5"]
        fast[fast.index("--speed") + 1] = "200"  # the demo's pace, sped up for the test
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "fusebus", *fast],
            env=service_env("replay", compose_server.url),
            cwd=ROOT,
            capture_output=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        await decisions.wait_for(20, timeout_s=60)  # 4 streams x 5 windows
        assert {d.status for d in decisions.items} == {"complete"}
        found = await discover_agents(reader, prefix="fb", timeout_s=0.3)
        per_replica = [c["processed"] for info, c in found if info.type == "accel"]
        assert len(per_replica) == 3 and sum(per_replica) == 20 and min(per_replica) > 0
    finally:
        await reader.close()
