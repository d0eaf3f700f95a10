"""CPU time and memory of a process, read from /proc (Linux)."""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def memory_mb(pid: int) -> tuple[float, float]:
    """Resident memory now and at its peak, in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


def stop_processes(processes: Iterable[subprocess.Popen[bytes]]) -> None:
    """Terminate every process, then wait for each (killing one still alive after 30 s)."""
    started = list(processes)
    for process in started:
        process.terminate()
    for process in started:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


#: Every process the benchmarks started, so that whatever still runs when the benchmark
#: ends (finished, failed, interrupted or terminated) is stopped with it.
_STARTED: list[subprocess.Popen[bytes]] = []


def spawn(argv: Sequence[str], **options: Any) -> subprocess.Popen[bytes]:
    """Start a process the benchmark owns (see :func:`stop_with_the_benchmark`)."""
    process: subprocess.Popen[bytes] = subprocess.Popen(list(argv), **options)
    _STARTED.append(process)
    return process


def stop_started() -> None:
    """Stop every process :func:`spawn` started that still runs."""
    stop_processes(p for p in _STARTED if p.poll() is None)


def stop_with_the_benchmark() -> None:
    """Make SIGTERM stop a benchmark as Ctrl-C does (its runs end, each stopping what it
    started, servers included), and stop at exit whatever it spawned that still runs."""
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    atexit.register(stop_started)
