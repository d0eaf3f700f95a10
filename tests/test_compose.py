"""compose/: the file validates, credentials come from the environment, and the services'
own commands scale and run the pipeline against compose/nats.conf."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import socket
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bus import (
    BusSettings,
    EmbeddedServer,
    connect,
    discover_agents,
    find_server_binary,
    free_port,
)
from schemas import Decision
from tests.compose_env import START_SCRIPT, nats_conf_env
from tests.helpers import Collector, eventually, wait_for_agents, wait_for_role

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose" / "docker-compose.yml"
EXAMPLE_ENV = ROOT / "compose" / ".env.example"
Spawn = Callable[..., subprocess.Popen[bytes]]


COMPOSE_FILES = [COMPOSE, ROOT / "compose" / "docker-compose.metrics.yml"]
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, and $$ for "$".
_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?)([-?])([^}]*))?\}")


class MissingVariableError(LookupError):
    """A ``${NAME:?message}`` whose variable is not set."""


def interpolate(text: str, env: dict[str, str]) -> str:
    """``text`` with compose's variable syntax filled in from ``env``, as compose does.

    Raises:
        MissingVariableError: a required variable is unset (or empty, with ``:?``).
    """

    def fill(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, colon, op, argument = match.groups()
        value = env.get(name)
        absent = value is None or (colon == ":" and value == "")
        if op == "?" and absent:
            raise MissingVariableError(f"required variable {name} is missing a value: {argument}")
        if op == "-" and absent:
            return argument
        return value or ""

    return _VARIABLE.sub(fill, text)


def validate_compose(
    path: Path, env: dict[str, str], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """Interpolate a compose file and check it against the compose specification's schema
    (vendored by check-jsonschema, so no network)."""
    filled = tmp_path / path.name
    filled.write_text(interpolate(path.read_text(), env))
    return subprocess.run(
        # As a module of this interpreter: installed by the test extra, whatever PATH holds.
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(filled)],
        capture_output=True,
        text=True,
    )  # fmt: skip


def example_env() -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in EXAMPLE_ENV.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    return {k: v for k, v in pairs}


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_files_follow_the_compose_specification(path: Path, tmp_path: Path) -> None:
    """Each compose file shipped, filled in with the example passwords, is valid by the
    compose specification's schema; a deliberately broken copy is not (the check bites)."""
    done = validate_compose(path, example_env(), tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    bad = broken / path.name
    bad.write_text(path.read_text().replace("services:", "servicez:", 1))
    refused = validate_compose(bad, example_env(), tmp_path / "broken")
    assert refused.returncode != 0


def test_credentials_come_only_from_the_environment() -> None:
    """Without the passwords set, filling in the file fails naming the variable: nothing
    secret is baked in."""
    with pytest.raises(MissingVariableError, match="FUSEBUS_"):
        interpolate(COMPOSE.read_text(), {})
    assert "change-me" not in COMPOSE.read_text()


def test_interpolation_follows_compose_rules() -> None:
    """The test's own interpolation does what compose does for the forms the files use."""
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("${SET}-${UNSET:-d}-${EMPTY:-d}-${EMPTY-d}-$$x", env) == "v-d-d--$x"
    with pytest.raises(MissingVariableError, match="EMPTY"):
        interpolate("${EMPTY:?say so}", env)
    assert interpolate("${EMPTY?say so}", env) == ""


def stop_order() -> list[str]:
    """Services in the order compose stops them: the reverse of a start order in which
    every service starts after what it depends on."""
    graph = {name: set(body.get("depends_on") or ()) for name, body in services().items()}
    started: list[str] = []
    while len(started) < len(graph):
        ready = sorted(n for n, deps in graph.items() if n not in started and deps <= set(started))
        assert ready, f"depends_on has a cycle among {set(graph) - set(started)}"
        started += ready
    return started[::-1]


def test_stopping_lets_windows_in_flight_finish() -> None:
    """compose stops the replay, then the coordinator (which drains: its open windows are
    answered and decided), and only then fusion and the agents, then NATS."""
    order = stop_order()
    position = {name: i for i, name in enumerate(order)}
    assert position["replay"] < position["coordinator"]
    for name in ("fusion", "agent-accel", "agent-gyro"):
        assert position["coordinator"] < position[name] < position["nats"], order
    assert "--drain-s" in services()["coordinator"]["command"]
    assert services()["nats"]["stop_signal"] == "SIGINT"


AWKWARD_PASSWORDS = [
    "123456",
    "20k",
    "3e8f1a2b9c0d",
    "a;b",
    "it's",
    "x}y",
    "with space",
    'q"uo\\te',
]


async def test_any_password_works_through_the_start_script(tmp_path: Path) -> None:
    """nats-server started as compose starts it (compose/nats-start.sh, compose/nats.conf)
    takes every role's password as the exact string it is: numbers, hex, ;, ', }, spaces,
    quotes and backslashes; a wrong password is refused."""
    roles = ["sensor", "coordinator", "agent", "fusion", "reader"]
    for round_no in range(0, len(AWKWARD_PASSWORDS), len(roles)):
        chosen = (AWKWARD_PASSWORDS[round_no:] + AWKWARD_PASSWORDS)[: len(roles)]
        passwords = dict(zip(roles, chosen, strict=True))
        env = {f"FUSEBUS_{r.upper()}_PASSWORD": p for r, p in passwords.items()}
        port = free_port()
        store = tmp_path / f"round{round_no}"
        store.mkdir()
        server = start_through_script(env, port, store)
        try:
            url = f"nats://127.0.0.1:{port}"
            await eventually(functools.partial(_accepts, url), what="nats-server up")
            for role, password in passwords.items():
                nc = await connect(BusSettings(url=url, user=role, password=password), name=role)
                await nc.close()
                with pytest.raises(Exception):  # noqa: B017 - nats-py raises several kinds
                    await connect(
                        BusSettings(url=url, user=role, password=password + "x"),
                        name=role,
                    )
        finally:
            server.terminate()
            _, stderr = server.communicate(timeout=10)
        assert server.returncode == 0, stderr.decode()[-2000:]


def start_through_script(env: dict[str, str], port: int, store: Path) -> subprocess.Popen[bytes]:
    """nats-server with compose/nats.conf, started by compose/nats-start.sh as compose does."""
    return subprocess.Popen(
        ["sh", str(START_SCRIPT), "--config", str(ROOT / "compose" / "nats.conf"),
         "-a", "127.0.0.1", "-p", str(port), "--jetstream", "--store_dir", str(store)],
        env={**os.environ, **env, "NATS_SERVER": str(find_server_binary()),
             "FUSEBUS_NATS_MONITOR_PORT": str(free_port())},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip


def _accepts(url: str) -> bool:
    host, port = url.removeprefix("nats://").split(":")
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=0.2):
        return True
    return False


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
    with EmbeddedServer(
        config_file=ROOT / "compose" / "nats.conf",
        env=nats_conf_env(example_env()),
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
        await wait_for_role(reader, "fb", "coordinator")
        start("fusion")
        for _ in range(3):
            start("agent-accel")
        start("agent-gyro")
        await wait_for_agents(reader, "fb", {"accel": 3, "gyro": 1})
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
        # The sensor role may publish but not read streams: the replay says it could not
        # learn where the stream had reached, and goes on.
        assert b"could not read where the stream(s) had reached" in done.stdout, done.stdout
        await decisions.wait_for(20, timeout_s=60)  # 4 streams x 5 windows
        assert {d.status for d in decisions.items} == {"complete"}
        found = await discover_agents(reader, prefix="fb", timeout_s=0.3)
        per_replica = [c["processed"] for info, c in found if info.type == "accel"]
        assert len(per_replica) == 3 and sum(per_replica) == 20 and min(per_replica) > 0
    finally:
        await reader.close()
