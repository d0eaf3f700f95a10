"""`fusebus decisions`: reading and following the stored decisions across a real server."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from nats.aio.client import Client

from bus import EmbeddedServer, Subjects, TopologySettings, ensure_streams
from fusebus.decisions import TABLE_HEADER, decision_record, parse_since, table_row
from schemas import CODEC, ConfigError, Decision, Window
from tests.helpers import eventually

ROOT = Path(__file__).resolve().parent.parent
SECOND = 10**9


def decision(stream: str, i: int, *, label: str = "walking", fusion: str = "fusion") -> Decision:
    start = 1_700_000_000 * SECOND + i * 10 * SECOND
    return Decision(
        task_id=f"{stream}:{start}",
        stream=stream,
        window=Window(start, start + 10 * SECOND),
        label=label,
        scores={label: 0.9, "running": 0.1},
        status="partial" if i % 2 else "complete",
        contributors=("accel",) if i % 2 else ("accel", "gyro"),
        missing=("gyro",) if i % 2 else (),
        strategy="weighted_mean",
        latency_ms=12.5,
        fusion=fusion,
    )


def run_decisions(server: EmbeddedServer, subjects: Subjects, *args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", "fusebus", "decisions", "--nats-url", server.url,
         "--prefix", subjects.prefix, *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_since_takes_durations_and_iso_times() -> None:
    """Durations count back from now; a time without a zone is UTC; anything else is a
    ConfigError that shows both forms."""
    now = 1_000_000 * SECOND
    assert parse_since("90s", now_ns=now) == now - 90 * SECOND
    assert parse_since("10m", now_ns=now) == now - 600 * SECOND
    assert parse_since("1.5h", now_ns=now) == now - 5400 * SECOND
    assert parse_since("250ms", now_ns=now) == now - SECOND // 4
    assert parse_since("1970-01-02T00:00:00Z", now_ns=now) == 86400 * SECOND
    assert parse_since("1970-01-02T00:00:00", now_ns=now) == 86400 * SECOND
    assert parse_since("1970-01-02T02:00:00+02:00", now_ns=now) == 86400 * SECOND
    with pytest.raises(ConfigError, match="expected a duration such as 90s"):
        parse_since("yesterday", now_ns=now)
    with pytest.raises(ConfigError, match="reaches back before 1970"):
        parse_since("99999999d", now_ns=now)
    with pytest.raises(ConfigError, match="is before 1970"):
        parse_since("1969-12-31T00:00:00Z", now_ns=now)


def test_a_decision_reads_as_a_row_and_as_json() -> None:
    """The row shows window start, stream, label with its score, status, fusion, latency and
    what was missing; the JSON record has every field and survives a round trip."""
    row = table_row(decision("kitchen", 1))
    assert row.startswith("2023-11-14 22:13:30.000 kitchen")
    for part in ("walking", "0.900", "partial", "fusion", "12.5ms", "gyro"):
        assert part in row
    assert len(TABLE_HEADER.split()) >= 8
    record = decision_record(decision("kitchen", 1))
    assert json.loads(json.dumps(record)) == record
    assert (
        record["missing"] == ["gyro"]
        and record["window_end_ns"] - record["window_start_ns"] == 10 * SECOND
    )
    fields = {f.name for f in dataclasses.fields(Decision)} - {"window"}
    assert fields <= set(record)  # every field, the models and missing reasons among them
    with_models = dataclasses.replace(decision("kitchen", 1), models={"accel": "accel@2"})
    assert decision_record(with_models)["models"] == {"accel": "accel@2"}


async def test_decisions_reads_filters_and_follows(
    nats_server: EmbeddedServer,
    connect_bus: Callable[[str], Awaitable[Client]],
    subjects: Subjects,
) -> None:
    """--no-follow prints what is kept (every stream, or one); --since in the future prints
    nothing; a follow shows only decisions made after it started and stops at --count."""
    nc = await connect_bus("decisions-test")
    js = nc.jetstream()
    await ensure_streams(js, subjects, TopologySettings())
    for i in range(3):
        await js.publish(subjects.decision("kitchen"), CODEC.encode(decision("kitchen", i)))
    await js.publish(
        subjects.decision("garage"), CODEC.encode(decision("garage", 0, label="running"))
    )
    await js.publish(subjects.decision("garage"), b"\x00not a decision")

    lines = await asyncio.to_thread(run_decisions, nats_server, subjects, "--no-follow", "--json")
    records = [json.loads(line) for line in lines]
    assert [(r["stream"], r["label"]) for r in records] == [
        ("kitchen", "walking"),
        ("kitchen", "walking"),
        ("kitchen", "walking"),
        ("garage", "running"),
    ]
    table = await asyncio.to_thread(
        run_decisions, nats_server, subjects, "--no-follow", "--stream", "garage"
    )
    assert table[0] == TABLE_HEADER and len(table) == 2 and "garage" in table[1]
    later = await asyncio.to_thread(
        run_decisions, nats_server, subjects, "--no-follow", "--since", "2999-01-01T00:00:00Z"
    )
    assert later == [TABLE_HEADER]
    counted = await asyncio.to_thread(
        run_decisions, nats_server, subjects, "--no-follow", "--from-start", "--count", "2"
    )
    assert len(counted) == 3

    consumers = (await js.stream_info(subjects.decisions_stream)).state.consumer_count or 0
    assert consumers == 0  # the one-off reads removed theirs
    follower = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fusebus", "decisions", "--nats-url", nats_server.url,
        "--prefix", subjects.prefix, "--json", "--count", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    try:

        async def following() -> bool:
            info = await js.stream_info(subjects.decisions_stream)
            return (info.state.consumer_count or 0) >= 1

        await eventually(following, what="the follower's consumer exists", timeout_s=30)
        began = time.monotonic()
        for i in (7, 8):
            await js.publish(subjects.decision("kitchen"), CODEC.encode(decision("kitchen", i)))
        out, err = await asyncio.wait_for(follower.communicate(), timeout=60)
    finally:
        if follower.returncode is None:
            follower.kill()
            await follower.wait()
    assert follower.returncode == 0, err.decode()
    followed = [json.loads(line) for line in out.decode().splitlines()]
    assert [r["window_start_ns"] for r in followed] == [
        decision("kitchen", i).window.t_start_ns for i in (7, 8)
    ]
    print(f"follower printed 2 new decisions {time.monotonic() - began:.2f} s after they were sent")


def test_bad_decisions_arguments_are_one_line() -> None:
    """A bad --since, both starting points at once, or a stream id that is no subject token."""
    for args, message in (
        (("--since", "soon"), "expected a duration"),
        (("--since", "1m", "--from-start"), "not allowed with argument"),
        (("--stream", "a.b"), "contains '.'"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "fusebus", "decisions", "--nats-url", "nats://127.0.0.1:1", *args],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and message in done.stderr
