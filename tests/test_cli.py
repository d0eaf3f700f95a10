"""The fusebus command: `up` end to end, each component alone, and one-line errors."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from nats.aio.client import Client

from bus import EmbeddedServer, Subjects
from schemas import Decision
from tests.helpers import Collector

ROOT = Path(__file__).resolve().parent.parent
FUSEBUS = [sys.executable, "-m", "fusebus"]


def run_fusebus(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FUSEBUS, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def test_up_decides_all_forty_cases_and_exits_cleanly(tmp_path: Path) -> None:
    """`fusebus up` with no URL starts its own nats-server and every component, prints 40
    decisions and a summary with accuracy >= 0.95, and exits 0."""
    done = run_fusebus("up", "--speed", "200", "--log-dir", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if re.match(r"\s*\d+\s+\d+-\d+", line)]
    assert len(rows) == 40
    assert "(embedded)" in done.stdout
    summary = re.search(r"decisions (\d+)/40 · accuracy ([\d.]+)", done.stdout)
    assert summary is not None, done.stdout
    assert int(summary.group(1)) == 40 and float(summary.group(2)) >= 0.95
    assert "complete 40" in done.stdout
    assert "DUPLICATE" not in done.stdout
    assert "components exited with errors" not in done.stdout
    assert "Traceback" not in done.stderr


async def test_each_component_runs_alone_against_a_given_server(
    nats_server: EmbeddedServer,
    subjects: Subjects,
    connect_bus: Callable[[str], Awaitable[Client]],
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> None:
    """coordinator, two agents, fusion and replay as separate processes on --nats-url decide
    every replayed frame, and each long-running one exits 0 on SIGTERM."""
    bus_args = ("--nats-url", nats_server.url, "--prefix", subjects.prefix)
    nc = await connect_bus("test")
    decisions = await Collector(Decision).start(nc, subjects.decision("bm"))
    services = [
        spawn(*FUSEBUS, "coordinator", *bus_args),
        spawn(*FUSEBUS, "agent", "--model", "accel", *bus_args),
        spawn(*FUSEBUS, "agent", "--model", "gyro", *bus_args),
        spawn(*FUSEBUS, "fusion", *bus_args),
    ]
    await _wait_for_components(nc, subjects.prefix, count=4)
    replay = spawn(
        *FUSEBUS,
        "replay",
        "basicmotions",
        "--stream",
        "bm",
        "--speed",
        "200",
        "--limit",
        "12",
        *bus_args,
    )
    assert await asyncio.to_thread(replay.wait, 60) == 0
    await decisions.wait_for(12)
    assert all(d.status == "complete" for d in decisions.items)
    for process in services:
        process.send_signal(signal.SIGTERM)
    for process in services:
        assert await asyncio.to_thread(process.wait, 30) == 0


async def _wait_for_components(nc: Client, prefix: str, *, count: int) -> None:
    from bus import discover_components

    for _ in range(200):
        if len(await discover_components(nc, prefix=prefix, timeout_s=0.2)) >= count:
            return
    raise AssertionError("components did not register")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("up", "--rate", "-3"), "argument --rate: -3 must be > 0"),
        (
            ("agent", "--model", "no/such/model.tflite"),
            "model file no/such/model.tflite does not exist",
        ),
        (("replay", "nosuch", "--nats-url", "nats://127.0.0.1:9"), "unknown dataset 'nosuch'"),
        (
            ("coordinator", "--nats-url", "nats://127.0.0.1:9", "--connect-wait-s", "0.3"),
            "cannot connect to NATS",
        ),
        (("coordinator", "--nats-url", "127.0.0.1:4222"), "needs a scheme"),
        (
            ("coordinator", "--plan", "nosuch", "--nats-url", "nats://127.0.0.1:9"),
            "unknown plan 'nosuch'",
        ),
        (("fusion", "--weight", "accel", "--nats-url", "nats://127.0.0.1:9"), "is not TYPE=WEIGHT"),
        (("bogus",), "invalid choice"),
    ],
)
def test_bad_arguments_get_one_line_and_a_nonzero_exit(args: tuple[str, ...], message: str) -> None:
    """A bad argument or an unreachable server is one line on stderr naming the problem, exit 2."""
    done = run_fusebus(*args, timeout=60)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert message in lines[0]
    assert "Traceback" not in done.stderr


def test_bad_plans_file_is_one_line_naming_the_key(tmp_path: Path) -> None:
    """`--config` with a mistake stops before connecting, with the file, key and problem."""
    plans = tmp_path / "plans.toml"
    plans.write_text(
        '[default]\ndeadline_ms = 2000\nmax_inflight = "lots"\n[default.subtasks.accel]\nsensors = ["accel"]\n'
    )
    done = run_fusebus(
        "coordinator", "--config", str(plans), "--nats-url", "nats://127.0.0.1:9", timeout=60
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == f"fusebus coordinator: error: {plans}: default.max_inflight: must be a number, got 'lots'"
    )


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "FUSEBUS_CONNECT_WAIT_S",
            "abc",
            "FUSEBUS_CONNECT_WAIT_S='abc': expected a number of seconds",
        ),
        ("FUSEBUS_CONNECT_WAIT_S", "-3", "FUSEBUS_CONNECT_WAIT_S='-3': expected a finite number"),
        ("FUSEBUS_MANAGE_TOPOLOGY", "maybe", "FUSEBUS_MANAGE_TOPOLOGY='maybe': expected 1/0"),
        ("FUSEBUS_REPLICAS", "7", "FUSEBUS_REPLICAS='7': expected a replica count from 1 to 5"),
        ("FUSEBUS_STORAGE", "disk", "FUSEBUS_STORAGE='disk': expected one of file, memory"),
    ],
)
def test_a_bad_environment_value_is_one_line_naming_the_variable(
    variable: str, value: str, message: str
) -> None:
    """A FUSEBUS_* variable the CLI cannot use stops it with one line and exit 2, before any
    command runs, never a traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "fusebus", "status"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, variable: value},
        timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fusebus: error: {message}"), done.stderr
