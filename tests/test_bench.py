"""The benchmark code runs (its figures are for people, not for assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_in_process_limit_runs_and_decides_every_frame(tmp_path: Path) -> None:
    """`python -m bench.limit` builds the seeded workload models and decides each frame."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.limit",
            "--runtime",
            "litert",
            "--batch",
            "64",
            "--frames",
            "128",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "FUSEBUS_BENCH_CACHE": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["decisions"] == 128 and figures["frames_per_s"] > 0
    assert {p.name for p in tmp_path.iterdir()} >= {"t0.tflite", "t0.keras", "t0.json"}


def test_sharded_scenario_runs_and_prints_its_tables() -> None:
    """`python -m bench --only shards2` runs two coordinators and two fusion agents over the
    partitions, and prints windows/s and CPU-ms per window per component without touching
    docs/."""
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--only",
            "shards2",
            "--frames",
            "200",
            "--repeats",
            "1",
            "--shard-rate",
            "100",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 coordinator shards: windows/s" in done.stdout
    assert "CPU-ms/window nats-server" in done.stdout and "server msgs in / out" in done.stdout
    assert (ROOT / "docs" / "benchmarks.md").read_text() == docs


def test_chain_benchmark_runs_and_prints_its_tables() -> None:
    """`python -m bench --only chain` runs the benchmark models as one stage, with their
    heads beside them, and cut into a two-stage chain, and prints frames/s, latency at 200
    frames/s, CPU-ms per frame and their ratios without touching docs/."""
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--only",
            "chain",
            "--frames",
            "200",
            "--repeats",
            "1",
            "--seconds",
            "0.5",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "two-stage chain: frames_per_s" in done.stdout
    assert "## Model chains" in done.stdout and "p99 ms @200" in done.stdout
    assert "| two-stage chain / one stage |" in done.stdout
    assert "The second stage in hops" in done.stdout
    assert (ROOT / "docs" / "benchmarks.md").read_text() == docs


def test_rollout_benchmark_runs_and_every_window_gets_one_decision() -> None:
    """`python -m bench --only rollout` promotes a registry model under load and idle
    across replica processes, and prints the time to the last replica serving, the
    decisions-per-bin dip, and checks that every frame got exactly one decision, without
    touching docs/."""
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--only",
            "rollout",
            "--promotions",
            "2",
            "--idle-promotions",
            "2",
            "--rollout-replicas",
            "2",
            "--rollout-rate",
            "100",
            "--rollout-window-s",
            "0.5",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert sum(line.startswith("under load: -> ") for line in lines) == 2
    assert sum(line.startswith("idle: -> ") for line in lines) == 2
    checks = next(line for line in lines if line.startswith("rollout checks:"))
    assert checks == (
        "rollout checks: one decision each True; one accel result each True; "
        "switched once per promotion True"
    )
    assert "## Model rollout" in done.stdout
    assert "| to the last replica's first result with the new version, ms |" in done.stdout
    assert "| lowest 100 ms bin of decisions after a promotion / median before |" in done.stdout
    assert (ROOT / "docs" / "benchmarks.md").read_text() == docs


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone while listed
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_terminated_benchmark_stops_everything_it_started() -> None:
    """SIGTERM in the middle of a run: the benchmark stops its nats-server and every
    component process it started, then exits."""
    import signal
    import time

    bench = subprocess.Popen(
        [sys.executable, "-m", "bench", "--only", "rollout", "--promotions", "100"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        started: set[int] = set()
        give_up = time.monotonic() + 60
        # the nats-server, a coordinator, a fusion agent, a gyro agent and 3 accel replicas
        while len(started) < 7 and time.monotonic() < give_up:
            started = {p for p in descendants(bench.pid) if running(p)}
            time.sleep(0.2)  # polling another process's children: there is no event to wait on
        assert len(started) >= 7, started
        bench.send_signal(signal.SIGTERM)
        _, err = bench.communicate(timeout=90)
        assert bench.returncode == 130, err.decode()[-2000:]
        assert [p for p in started if running(p)] == []
    finally:
        if bench.poll() is None:
            bench.kill()
