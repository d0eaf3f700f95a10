"""With JSON logs every stderr line is a JSON object: what native libraries (LiteRT's XNNPACK
line) and Python write to fd 2 is wrapped, crashes still show, and console logs are left alone."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from nats.aio.client import Client

from bus import (
    EmbeddedServer,
    Producer,
    Subjects,
    TopologySettings,
    ensure_streams,
)
from fusebus.logs import wrap_line
from fusebus.paths import models_dir
from schemas import Result, Subtask, Window
from tests.helpers import Collector, wait_for_agents

ROOT = Path(__file__).resolve().parent.parent
XNNPACK_LINE = "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
Spawn = Callable[..., subprocess.Popen[bytes]]


def json_records(stderr: bytes) -> list[dict[str, Any]]:
    """Every line of ``stderr`` as a JSON object; fails naming the first line that is not."""
    records = []
    for line in stderr.decode().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"not JSON on stderr: {line[:200]!r}") from None
        assert isinstance(record, dict), f"not a JSON object on stderr: {line[:200]!r}"
        records.append(record)
    return records


def run_python(code: str, timeout_s: float = 60) -> subprocess.CompletedProcess[bytes]:
    """Run ``code`` in a fresh interpreter from the project root, capturing stderr."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=timeout_s,
        check=False,
    )


@pytest.mark.parametrize(
    ("line", "level"),
    [
        (XNNPACK_LINE, "info"),
        ("W1202 10:00:00.000000  123 cpu_feature_guard.cc:210] no AVX512", "warning"),
        ("E0000 00:00:1700000000.1 1 cuda_dnn.cc:8310] Unable to register", "error"),
        ("[12] 2026/12/02 10:00:00.000000 [ERR] JetStream out of resources", "error"),
        ("ERROR: tensor 3 has no data", "error"),
        ("/x/y.py:10: DeprecationWarning: old call", "warning"),
        ("fusebus agent: error: model file m.tflite does not exist", "warning"),  # unstated
        ("caf\xe9 \u2603", "warning"),
    ],
)
def test_a_native_line_becomes_a_native_output_event_with_its_stated_level(
    line: str, level: str
) -> None:
    """A line that is not JSON is wrapped whole, with the level it states (else warning)."""
    wrapped = wrap_line(line.encode() + b"\r\n")
    assert wrapped is not None and wrapped.endswith(b"\n") and wrapped.count(b"\n") == 1
    record = json.loads(wrapped)
    assert record["event"] == "native.output" and record["line"] == line
    assert record["level"] == level and record["timestamp"].endswith("Z")


def test_json_objects_pass_unchanged_and_empty_or_quieter_lines_are_dropped() -> None:
    """A JSON object line is kept as is; a JSON array is not an event and is wrapped; blank
    lines and lines stating a level below the configured one are dropped, while a line
    stating none is always kept."""
    event = b'{"event": "agent.started", "level": "info"}'
    assert wrap_line(event + b"\n") == event + b"\n"
    assert json.loads(wrap_line(b"[1, 2]") or b"{}")["line"] == "[1, 2]"
    assert json.loads(wrap_line(b"{not json}") or b"{}")["line"] == "{not json}"
    assert wrap_line(b"   \n") is None
    assert wrap_line(XNNPACK_LINE.encode(), min_level="warning") is None
    assert wrap_line(b"W1202 10:00:00.0 1 x.cc:1] slow", min_level="warning") is not None
    assert wrap_line(b"something odd", min_level="error") is not None


def test_json_logging_wraps_litert_and_python_stderr_and_logs_a_crash_as_one_event() -> None:
    """A process logging JSON that loads a LiteRT interpreter, prints to stderr, warns, writes
    a line longer than 64 KiB and dies of an exception has only JSON objects on stderr: the
    XNNPACK line is inside a native.output event, and the traceback in one process.crashed."""
    done = run_python(
        f"""
        import os, sys, warnings
        from fusebus.logs import configure_logging
        configure_logging(fmt="json", level="info")
        import structlog
        structlog.get_logger().info("test.before")
        from ai_edge_litert.interpreter import Interpreter
        Interpreter(model_path={str(models_dir() / "accel.tflite")!r}).allocate_tensors()
        print("plain text on stderr", file=sys.stderr)
        warnings.warn("careful")
        os.write(2, b"x" * 200_000 + b"\\n")
        structlog.get_logger().info("test.after")
        raise RuntimeError("boom")
        """
    )
    records = json_records(done.stderr)
    assert done.returncode == 1
    native = [r for r in records if r["event"] == "native.output"]
    assert {"line": XNNPACK_LINE, "level": "info"}.items() <= next(
        r for r in native if "XNNPACK" in r["line"]
    ).items()
    assert any(r["line"] == "plain text on stderr" for r in native)
    assert any(r["line"].endswith("UserWarning: careful") for r in native)
    long_pieces = [r["line"] for r in native if r["line"].startswith("x")]
    assert "".join(long_pieces) == "x" * 200_000 and len(long_pieces) == 4
    events = [r["event"] for r in records]
    assert "test.before" in events and "test.after" in events
    [crash] = [r for r in records if r["event"] == "process.crashed"]
    assert crash["level"] == "critical" and "RuntimeError: boom" in crash["exception"]
    assert "Traceback (most recent call last)" in crash["exception"]


def test_a_native_crash_still_shows_its_dump() -> None:
    """A segfault kills the relay thread with the process, yet the JSON lines before it are
    out and the fault handler's dump reaches the real stderr."""
    done = run_python(
        """
        import ctypes
        from fusebus.logs import configure_logging
        configure_logging(fmt="json")
        import structlog
        structlog.get_logger().info("test.about_to_crash")
        ctypes.string_at(0)
        """
    )
    assert done.returncode == -signal.SIGSEGV
    text = done.stderr.decode()
    first = text.splitlines()[0]
    assert json.loads(first)["event"] == "test.about_to_crash"
    assert "Fatal Python error: Segmentation fault" in text and "string_at" in text


@pytest.mark.parametrize("fmt", ["console", "auto"])
def test_logging_not_asked_for_as_json_leaves_stderr_alone(fmt: str) -> None:
    """Console logs, and ``auto`` off a terminal (whose command errors stay plain text),
    wrap nothing: the XNNPACK line is written as LiteRT wrote it."""
    done = run_python(
        f"""
        from fusebus.logs import configure_logging
        configure_logging(fmt={fmt!r})
        from ai_edge_litert.interpreter import Interpreter
        Interpreter(model_path={str(models_dir() / "accel.tflite")!r}).allocate_tensors()
        """
    )
    assert done.returncode == 0
    assert XNNPACK_LINE in done.stderr.decode().splitlines()
    assert b"native.output" not in done.stderr


async def test_a_json_logging_agent_process_writes_only_json_to_stderr(
    nats_server: EmbeddedServer,
    subjects: Subjects,
    connect_bus: Callable[[str], Awaitable[Client]],
    spawn: Spawn,
) -> None:
    """`fusebus agent --model accel --log-format json` serving a subtask and stopping on
    SIGTERM writes only JSON objects to stderr, LiteRT's XNNPACK line among them, wrapped."""
    nc = await connect_bus("test")
    await ensure_streams(nc.jetstream(), subjects, TopologySettings())
    results = await Collector(Result).start(nc, subjects.result("s"))
    process = spawn(
        sys.executable,
        "-m",
        "fusebus",
        "agent",
        "--model",
        "accel",
        "--log-format",
        "json",
        "--nats-url",
        nats_server.url,
        "--prefix",
        subjects.prefix,
        stderr=subprocess.PIPE,
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
    _, stderr = await asyncio.to_thread(process.communicate, timeout=30)
    assert process.returncode == 0
    records = json_records(stderr)
    [native] = [r for r in records if r["event"] == "native.output"]
    assert native["line"] == XNNPACK_LINE and native["level"] == "info"
    events = [r["event"] for r in records]
    assert "agent.started" in events and "agent.stopped" in events
