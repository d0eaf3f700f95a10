"""``fusebus topology``: every stream and consumer of a deployment with its replicas, leader
and lag, and with ``--check`` whether they match the settings (exit 1 when they do not)."""

from __future__ import annotations

import sys
from typing import TextIO

from bus import (
    ReplicaView,
    StreamView,
    Subjects,
    TopologySettings,
    inspect_topology,
    topology_problems,
)
from bus.types import Connection


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


def _followers(followers: tuple[ReplicaView, ...]) -> str:
    return ", ".join(
        f"{f.server} {'offline' if f.offline else 'current' if f.current else f'lag {f.lag}'}"
        for f in followers
    )


def render_topology(views: list[StreamView]) -> str:
    """The streams, then each one's consumers indented under it."""
    lines = [
        f"{'stream':<22} {'storage':<7} {'R':>2} {'leader':<12} {'messages':>9} {'size':>10}  followers"
    ]
    for view in views:
        if not view.exists:
            lines.append(f"{view.name:<22} (none)")
            continue
        placement = ""
        if view.placement_cluster or view.placement_tags:
            placement = f"  placed {view.placement_cluster or ''} {','.join(view.placement_tags)}"
        lines.append(
            f"{view.name:<22} {view.storage:<7} {view.replicas:>2} {view.leader or '-':<12} "
            f"{view.messages:>9} {_size(view.bytes):>10}  {_followers(view.followers) or '-'}"
            f"{placement}"
        )
        for consumer in view.consumers:
            lag = _followers(consumer.followers)
            kind = "consumer" if consumer.durable else "reader  "
            lines.append(
                f"  {kind} {consumer.name:<28} R{consumer.replicas} leader "
                f"{consumer.leader or '-':<12} pending {consumer.pending} · ack pending "
                f"{consumer.ack_pending} · redelivered {consumer.redelivered}"
                + (f" · {lag}" if lag else "")
            )
    return "\n".join(lines)


async def show_topology(
    nc: Connection,
    subjects: Subjects,
    settings: TopologySettings,
    *,
    check: bool,
    out: TextIO = sys.stdout,
) -> int:
    """Print the deployment's streams and consumers; with ``check``, also every mismatch
    with ``settings``. Returns the exit code: 1 when checked and something does not match."""
    views = await inspect_topology(nc.jetstream(), subjects)
    print(render_topology(views), file=out)
    if not check:
        return 0
    required = {
        subjects.tasks_stream,
        subjects.results_stream,
        subjects.decisions_stream,
        subjects.dlq_stream,
    }
    problems = topology_problems(views, settings, required=required)
    for problem in problems:
        print(f"mismatch: {problem}", file=out)
    if not problems:
        print(f"ok: every stream and consumer matches (replicas >= {settings.replicas})", file=out)
    return 1 if problems else 0
