"""``fusebus decisions``: the decisions kept in ``<P>_DECISIONS``, as a table or JSON lines.

It reads every stream's decisions (or one stream's), from a point chosen by the user:
only new ones (the default when following), those stored since a time or a duration ago,
or everything kept. It then follows new decisions until interrupted, or stops once caught up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from bus import Subjects, follow_stored, iter_stored
from bus.types import Connection, Message
from schemas import CODEC, ConfigError, Decision, FusebusError, Window

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNIT_S = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_since(text: str, *, now_ns: int) -> int:
    """Unix ns of ``--since``: a duration ago (``90s``, ``10m``, ``2h``, ``1d``) or an ISO 8601
    time (``2026-12-02T15:00:00Z``; a time without a zone is UTC).

    Raises:
        ConfigError: it is neither.
    """
    text = text.strip()
    duration = _DURATION.match(text)
    if duration:
        since = now_ns - round(float(duration[1]) * _UNIT_S[duration[2]] * 1e9)
        if since < 0:
            raise ConfigError(f"--since {text[:40]!r} reaches back before 1970")
        return since
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"--since {text[:40]!r}: expected a duration such as 90s, 10m, 2h, 1d or an ISO "
            "time such as 2026-12-02T15:00:00Z"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    since = round(moment.timestamp() * 1e9)
    if since < 0:
        raise ConfigError(f"--since {text[:40]!r} is before 1970")
    return since


@dataclass(frozen=True)
class DecisionQuery:
    """What ``fusebus decisions`` shows.

    ``stream`` None reads every stream. ``since_ns`` (Unix ns) or ``from_start`` say where
    to begin; without either, a follow begins with new decisions and a one-off read with
    everything kept. ``limit`` stops after that many decisions.
    """

    stream: str | None = None
    since_ns: int | None = None
    from_start: bool = False
    follow: bool = True
    as_json: bool = False
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.since_ns is not None and self.from_start:
            raise ConfigError("--since and --from-start both say where to begin; give one")


def decision_record(decision: Decision) -> dict[str, Any]:
    """A decision as a JSON-safe dict: every field of the message (taken from its
    definition, so a field added later is never left out), ``window`` as start/end ns."""
    record: dict[str, Any] = {}
    for f in dataclasses.fields(decision):
        value = getattr(decision, f.name)
        if isinstance(value, Window):
            record["window_start_ns"], record["window_end_ns"] = value.t_start_ns, value.t_end_ns
        elif isinstance(value, tuple):
            record[f.name] = list(value)
        elif isinstance(value, dict):
            record[f.name] = dict(value)
        else:
            record[f.name] = value
    return record


TABLE_HEADER = (
    f"{'window start (UTC)':<23} {'stream':<16} {'label':<14} {'score':>6} {'status':<8} "
    f"{'fusion':<12} {'latency':>8}  missing"
)


def table_row(decision: Decision) -> str:
    """One decision as a line of the table under :data:`TABLE_HEADER`."""
    start = datetime.fromtimestamp(decision.window.t_start_ns / 1e9, UTC)
    score = decision.scores.get(decision.label)
    missing = ",".join((*decision.missing, *decision.absent)) or "-"
    label = decision.label + (" !" if decision.alarm else "")
    return (
        f"{start.strftime('%Y-%m-%d %H:%M:%S.%f')[:23]:<23} {decision.stream[:16]:<16} "
        f"{label[:14]:<14} {'-' if score is None else f'{score:.3f}':>6} "
        f"{decision.status:<8} {(decision.fusion or decision.strategy)[:12]:<12} "
        f"{decision.latency_ms:>6.1f}ms  {missing}"
    )


class _Printer:
    """Writes each decision as the query asks, and says when the limit is reached."""

    def __init__(self, query: DecisionQuery, out: TextIO) -> None:
        self.query = query
        self.out = out
        self.shown = 0
        self.undecodable = 0
        if not query.as_json:
            print(TABLE_HEADER, file=out, flush=True)

    @property
    def done(self) -> bool:
        return self.query.limit is not None and self.shown >= self.query.limit

    def show(self, data: bytes) -> None:
        if self.done:
            return
        try:
            decision = CODEC.decode(data, Decision)
        except FusebusError:
            self.undecodable += 1  # not a decision fusebus wrote: skipped, counted, told
            return
        if self.query.as_json:
            line = json.dumps(decision_record(decision), separators=(",", ":"))
        else:
            line = table_row(decision)
        print(line, file=self.out, flush=True)
        self.shown += 1


async def show_decisions(
    nc: Connection,
    subjects: Subjects,
    query: DecisionQuery,
    *,
    out: TextIO = sys.stdout,
) -> int:
    """Print the decisions ``query`` asks for; returns how many were shown.

    A one-off read ends once it has caught up with the stream. A follow runs until the limit
    is reached or it is cancelled (Ctrl-C).
    """
    subject = subjects.decision(query.stream) if query.stream else subjects.all_decisions()
    printer = _Printer(query, out)
    if not query.follow:
        stored = iter_stored(
            nc.jetstream(), subjects.decisions_stream, subject, since_ns=query.since_ns
        )
        async with contextlib.aclosing(stored):  # a break still removes the consumer
            async for message in stored:
                printer.show(message.data)
                if printer.done:
                    break
        return _finish(printer)

    finished = asyncio.Event()

    async def on_decision(msg: Message) -> None:
        stored = msg.metadata.timestamp if msg.metadata else None
        if query.since_ns is not None and stored and stored.timestamp() * 1e9 < query.since_ns:
            return  # the server starts at the oldest when the start time is past the newest
        printer.show(msg.data)
        if printer.done:
            finished.set()

    sub = await follow_stored(
        nc,
        subject,
        on_decision,
        from_now=query.since_ns is None and not query.from_start,
        since_ns=query.since_ns,
    )
    try:
        await finished.wait()
    finally:
        await sub.unsubscribe()
    return _finish(printer)


def _finish(printer: _Printer) -> int:
    if printer.undecodable:
        print(
            f"fusebus decisions: skipped {printer.undecodable} message(s) that are not decisions",
            file=sys.stderr,
        )
    return printer.shown
