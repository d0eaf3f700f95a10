"""Recordings: sensor traffic kept in the ``<P>_SENSORS`` stream, written to a file, played back.

A coordinator started with ``--record`` copies every chunk and frame it takes to
``<P>.rec.<original subject>``, which that stream keeps.

A recording file is a sequence of msgpack maps: a header ``{kind: "fusebus_recording", v: 1,
prefix, created_ns, count}``, then one entry per message ``{subject, t_ns, data}`` where
``subject`` has the prefix removed (so a recording plays onto any prefix) and ``t_ns`` is
when the server stored it. Played back, messages keep their spacing (divided by ``speed``)
and their bytes, event times included, so the same recording always cuts the same windows.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from bus import Connection, Subjects, read_stored
from schemas import BusError, ConfigError

KIND = "fusebus_recording"


@dataclass(frozen=True)
class Entry:
    """One recorded message."""

    subject: str  # without the prefix: "sensor.<stream>.<sensor>" or "frame.<stream>"
    t_ns: int
    data: bytes


async def record(
    nc: Connection,
    subjects: Subjects,
    out: Path,
    *,
    since_s: float | None = None,
    until_ns: int | None = None,
) -> int:
    """Write what ``<P>_SENSORS`` holds from ``since_s`` ago (default: all of it) to ``out``."""
    try:
        stored = await read_stored(nc.jetstream(), subjects.sensors_stream)
    except BusError as exc:
        raise ConfigError(f"{exc}: start the coordinator with --record to record sensors") from None
    start_ns = time.time_ns() - int(since_s * 1e9) if since_s is not None else 0
    end_ns = until_ns or time.time_ns()
    kept = len(subjects.all_recorded()) - 1  # "<prefix>.rec." (the wildcard's stem)
    entries = [
        Entry(m.subject[kept:], m.time_ns, m.data)
        for m in stored
        if start_ns <= m.time_ns <= end_ns
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as file:
        header = {
            "kind": KIND,
            "v": 1,
            "prefix": subjects.prefix,
            "created_ns": time.time_ns(),
            "count": len(entries),
        }
        file.write(msgpack.packb(header, use_bin_type=True))
        for entry in entries:
            file.write(
                msgpack.packb(
                    {"subject": entry.subject, "t_ns": entry.t_ns, "data": entry.data},
                    use_bin_type=True,
                )
            )
    return len(entries)


def read_recording(path: Path) -> list[Entry]:
    """The entries of a recording file; raises :class:`ConfigError` for anything else."""
    try:
        with path.open("rb") as file:
            items = list(msgpack.Unpacker(file, raw=False))
    except FileNotFoundError:
        raise ConfigError(f"recording {path} does not exist") from None
    except (ValueError, msgpack.ExtraData) as exc:
        raise ConfigError(f"{path} is not a fusebus recording ({exc})") from None
    if not items or not isinstance(items[0], dict) or items[0].get("kind") != KIND:
        raise ConfigError(f"{path} is not a fusebus recording (no header)")
    entries = []
    for raw in items[1:]:
        if not isinstance(raw, dict) or not {"subject", "t_ns", "data"} <= set(raw):
            raise ConfigError(f"{path}: malformed entry {str(raw)[:80]}")
        entries.append(Entry(str(raw["subject"]), int(raw["t_ns"]), bytes(raw["data"])))
    return entries


async def play(
    nc: Connection, subjects: Subjects, entries: list[Entry], *, speed: float = 1.0
) -> int:
    """Publish the entries under ``subjects.prefix`` with their recorded spacing / ``speed``."""
    if speed <= 0:
        raise ConfigError(f"speed must be > 0, got {speed}")
    if not entries:
        return 0
    loop = asyncio.get_running_loop()
    began = loop.time()
    first = entries[0].t_ns
    for entry in entries:
        delay = began + (entry.t_ns - first) / 1e9 / speed - loop.time()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        kind, _, rest = entry.subject.partition(".")
        await nc.publish(_subject(subjects, kind, rest), entry.data)
    await nc.flush()
    return len(entries)


def _subject(subjects: Subjects, kind: str, rest: str) -> str:
    parts = rest.split(".")
    if kind == "sensor" and len(parts) == 2:
        return subjects.sensor(parts[0], parts[1])
    if kind == "frame" and len(parts) == 1:
        return subjects.frame(parts[0])
    raise ConfigError(f"recording holds an unexpected subject {kind}.{rest}")


def describe(entries: list[Entry]) -> dict[str, Any]:
    """Counts and duration of a recording."""
    streams = {e.subject.split(".")[1] for e in entries if "." in e.subject}
    span = (entries[-1].t_ns - entries[0].t_ns) / 1e9 if entries else 0.0
    return {"messages": len(entries), "streams": len(streams), "seconds": round(span, 3)}
