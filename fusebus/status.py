"""``fusebus status``: what is running on the bus, from the services' own stats."""

from __future__ import annotations

import asyncio
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, TextIO

from bus import agent_info_from_metadata, gather
from bus.discovery import PREFIX, ROLE
from bus.types import Connection
from schemas import AgentInfo


@dataclass
class TypeStatus:
    """The replicas of one agent type and their summed counters."""

    type: str
    replicas: list[tuple[AgentInfo, dict[str, Any]]] = field(default_factory=list)

    def total(self, counter: str) -> float:
        """A counter summed over replicas."""
        return sum(float(c.get(counter, 0) or 0) for _, c in self.replicas)

    @property
    def mean_batch(self) -> float:
        """Subtasks per model call, over all replicas."""
        batches = self.total("batches")
        return self.total("processed") / batches if batches else 0.0


@dataclass
class BusStatus:
    """Everything ``fusebus status`` shows."""

    agents: dict[str, TypeStatus]
    components: list[tuple[str, dict[str, Any]]]  # (role, counters) of coordinators and fusion


async def collect_status(nc: Connection, *, prefix: str, timeout_s: float = 0.5) -> BusStatus:
    """Ask every fusebus service under ``prefix`` for its stats."""
    agents: dict[str, TypeStatus] = defaultdict(lambda: TypeStatus(""))
    components = []
    for reply in await gather(nc, "$SRV.STATS", timeout_s=timeout_s):
        metadata = reply.get("metadata") or {}
        if metadata.get(PREFIX) != prefix:
            continue
        endpoints = reply.get("endpoints") or []
        counters = next((e.get("data") or {} for e in endpoints if e.get("name") == "status"), {})
        info = agent_info_from_metadata(metadata)
        if info is not None:
            agents.setdefault(info.type, TypeStatus(info.type)).replicas.append((info, counters))
        else:
            components.append((str(metadata.get(ROLE, reply.get("name"))), counters))
    return BusStatus(agents=dict(agents), components=sorted(components, key=lambda c: c[0]))


def _total(status: BusStatus, role: str, key: str) -> float:
    return sum(float(c.get(key) or 0) for r, c in status.components if r == role)


def render_summary(status: BusStatus, previous: BusStatus | None, interval_s: float) -> str:
    """Streams, open tasks, decisions/s (against the previous look), outcomes and latency."""
    decided = sum(
        _total(status, "fusion", f"decisions_{s}") for s in ("complete", "partial", "failed")
    )
    rate = "-"
    if previous is not None and interval_s > 0:
        before = sum(
            _total(previous, "fusion", f"decisions_{s}") for s in ("complete", "partial", "failed")
        )
        rate = f"{max(0.0, decided - before) / interval_s:,.1f}"
    p50 = max(
        (float(c.get("latency_p50_ms") or 0) for r, c in status.components if r == "fusion"),
        default=0.0,
    )
    p99 = max(
        (float(c.get("latency_p99_ms") or 0) for r, c in status.components if r == "fusion"),
        default=0.0,
    )
    return (
        f"streams {_total(status, 'coordinator', 'streams'):.0f} · open tasks {_total(status, 'coordinator', 'open_tasks'):.0f}"
        f" · decisions/s {rate} · complete {_total(status, 'fusion', 'decisions_complete'):.0f}"
        f" · partial {_total(status, 'fusion', 'decisions_partial'):.0f}"
        f" · failed {_total(status, 'fusion', 'decisions_failed'):.0f}"
        f" · shed {_total(status, 'coordinator', 'shed'):.0f}"
        f" · latency p50 {p50:.1f} ms p99 {p99:.1f} ms"
    )


def render_status(status: BusStatus) -> str:
    """A plain-text table of agents by type, then the other components' counters."""
    lines = []
    header = f"{'type':<12} {'replicas':>8} {'runtime':<8} {'model':<22} {'processed':>10} {'errors':>7} {'expired':>8} {'dead':>5} {'batch':>6} {'ms/call':>8}"
    lines.append(header)
    if not status.agents:
        lines.append("(no agents running)")
    for type_name in sorted(status.agents):
        entry = status.agents[type_name]
        info = entry.replicas[0][0]
        batches = entry.total("batches")
        per_call = entry.total("inference_ms_total") / batches if batches else 0.0
        lines.append(
            f"{type_name:<12} {len(entry.replicas):>8} {info.runtime:<8} "
            f"{info.model.name + '@' + info.model.version:<22.22} {entry.total('processed'):>10.0f} "
            f"{entry.total('errors'):>7.0f} {entry.total('expired'):>8.0f} {entry.total('dead_letters'):>5.0f} "
            f"{entry.mean_batch:>6.1f} {per_call:>8.3f}"
        )
    for role, counters in status.components:
        shown = " ".join(f"{k}={v}" for k, v in counters.items() if not isinstance(v, dict | list))
        lines.append(f"{role}: {shown}")
    return "\n".join(lines)


async def watch_status(
    nc: Connection,
    *,
    prefix: str,
    timeout_s: float = 0.5,
    watch: bool = False,
    interval_s: float = 1.0,
    count: int | None = None,
    out: TextIO = sys.stdout,
) -> None:
    """Print the status once, or (``watch``) redraw it every ``interval_s`` until stopped."""
    previous: BusStatus | None = None
    previous_at = 0.0
    shown = 0
    loop = asyncio.get_running_loop()
    while True:
        status = await collect_status(nc, prefix=prefix, timeout_s=timeout_s)
        now = loop.time()
        screen = (
            render_summary(status, previous, now - previous_at) + "\n\n" + render_status(status)
        )
        if watch and out.isatty():
            out.write("\x1b[2J\x1b[H")  # clear the terminal, cursor home
        out.write(screen + "\n")
        out.flush()
        shown += 1
        if not watch or (count is not None and shown >= count):
            return
        previous, previous_at = status, now
        await asyncio.sleep(max(0.0, interval_s - timeout_s))
