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


OUTCOMES = ("complete", "partial", "failed")


def _total(status: BusStatus, role: str, key: str) -> float:
    return sum(float(c.get(key) or 0) for r, c in status.components if r == role)


def fusion_groups(status: BusStatus) -> dict[str, dict[str, float]]:
    """Fusion counters by fusion name: replicas of one name share the work, so their counts
    add up; agents of different names each decide every window, so they stay apart."""
    groups: dict[str, dict[str, float]] = {}
    for role, counters in status.components:
        if role != "fusion":
            continue
        group = groups.setdefault(str(counters.get("name") or "fusion"), {"replicas": 0})
        group["replicas"] += 1
        for outcome in OUTCOMES:
            key = f"decisions_{outcome}"
            group[key] = group.get(key, 0.0) + float(counters.get(key) or 0)
        for key in ("latency_p50_ms", "latency_p99_ms"):
            group[key] = max(group.get(key, 0.0), float(counters.get(key) or 0))
    return dict(sorted(groups.items()))


def unserved_types(status: BusStatus) -> list[str]:
    """Types some coordinator's plan lists that no agent replica serves."""
    found = {
        str(t) for role, c in status.components if role == "coordinator"
        for t in c.get("unserved_types") or ()
    }  # fmt: skip
    return sorted(found - set(status.agents))


def partition_lines(status: BusStatus) -> list[str]:
    """With partitions > 1, one line per coordinator and fusion agent: which partitions it
    owns now (its leases), coordinators first."""
    lines = []
    for role, counters in status.components:
        if not counters.get("partitions_total"):
            continue
        owned = counters.get("partitions") or []
        shown = ", ".join(str(p) for p in owned) if owned else "none"
        lines.append(
            f"{role} {counters.get('member', '?')}: partitions {shown}"
            f" (of {counters['partitions_total']})"
        )
    return lines


def render_summary(status: BusStatus, previous: BusStatus | None, interval_s: float) -> str:
    """Streams and open tasks, then one line per fusion name: decisions/s (against the
    previous look), outcomes and latency."""
    lines = [
        f"streams {_total(status, 'coordinator', 'streams'):.0f}"
        f" · open tasks {_total(status, 'coordinator', 'open_tasks'):.0f}"
        f" · shed {_total(status, 'coordinator', 'shed'):.0f}"
        f" · unserved subtasks {_total(status, 'coordinator', 'unserved'):.0f}"
    ]
    lines += partition_lines(status)
    before = fusion_groups(previous) if previous is not None else {}
    for name, group in fusion_groups(status).items():
        decided = sum(group[f"decisions_{o}"] for o in OUTCOMES)
        rate = "-"
        if name in before and interval_s > 0:
            earlier = sum(before[name][f"decisions_{o}"] for o in OUTCOMES)
            rate = f"{max(0.0, decided - earlier) / interval_s:,.1f}"
        outcomes = " · ".join(f"{o} {group[f'decisions_{o}']:.0f}" for o in OUTCOMES)
        lines.append(
            f"fusion {name} ({group['replicas']:.0f} replica{'s' if group['replicas'] != 1 else ''})"
            f": decided {decided:.0f} · decisions/s {rate} · {outcomes}"
            f" · latency p50 {group['latency_p50_ms']:.1f} ms p99 {group['latency_p99_ms']:.1f} ms"
        )
    if len(lines) == 1:
        lines.append("(no fusion agent running)")
    return "\n".join(lines)


def render_status(status: BusStatus) -> str:
    """A plain-text table of agents by type (and the planned types nobody serves), then the
    other components' counters."""
    lines = []
    header = f"{'type':<12} {'replicas':>8} {'runtime':<8} {'model':<30} {'processed':>10} {'errors':>7} {'expired':>8} {'dead':>5} {'batch':>6} {'ms/call':>8}"
    lines.append(header)
    if not status.agents:
        lines.append("(no agents running)")
    for type_name in sorted(status.agents):
        entry = status.agents[type_name]
        info = entry.replicas[0][0]
        batches = entry.total("batches")
        per_call = entry.total("inference_ms_total") / batches if batches else 0.0
        # Failed batches, and subtasks answered with an error (inputs that do not fit the
        # model, a pinned model the replica does not hold).
        errors = sum(entry.total(k) for k in ("errors", "input_mismatch", "pin_unserved"))
        served = ",".join(
            dict.fromkeys(serving_models(i, s)[0].split(" ")[0] for i, s in entry.replicas)
        )
        lines.append(
            f"{type_name:<12} {len(entry.replicas):>8} {info.runtime:<8} "
            f"{served:<30.30} {entry.total('processed'):>10.0f} "
            f"{errors:>7.0f} {entry.total('expired'):>8.0f} {entry.total('dead_letters'):>5.0f} "
            f"{entry.mean_batch:>6.1f} {per_call:>8.3f}"
        )
    for type_name in sorted(status.agents):
        info = status.agents[type_name].replicas[0][0]
        reads = [i.sensor for i in info.inputs if i.stage]
        if reads or info.output == "features":
            answers = (
                f"features {list(info.output_shape)}" if info.output == "features" else "scores"
            )
            after = f"reads {', '.join(reads)}; " if reads else ""
            lines.append(f"{type_name}: a chain stage: {after}answers {answers}")
    for type_name in sorted(status.agents):
        replicas = status.agents[type_name].replicas
        described = [serving_models(info, stats) for info, stats in replicas]
        if all(
            len(d) == 1 and d[0] == _label(info)
            for d, (info, _) in zip(described, replicas, strict=True)
        ):
            continue  # every replica serves the one model it started with
        for (info, _), models in zip(replicas, described, strict=True):
            lines.append(f"{type_name}: {info.agent_id} serves {'; '.join(models)}")
    for type_name in sorted(status.agents):
        for info, stats in status.agents[type_name].replicas:
            refused = stats.get("refused")
            for label, why in refused.items() if isinstance(refused, dict) else ():
                lines.append(f"{type_name}: {info.agent_id} refused {label}: {why}")
    for type_name in unserved_types(status):
        lines.append(f"{type_name}: no replicas (a plan lists it; its subtasks wait for nobody)")
    for role, counters in status.components:
        shown = " ".join(f"{k}={v}" for k, v in counters.items() if not isinstance(v, dict | list))
        lines.append(f"{role}: {shown}")
    return "\n".join(lines)


def serving_models(info: AgentInfo, stats: dict[str, Any]) -> list[str]:
    """What a replica serves, from its counters (the models of its lineup, with their
    canaries and shadows), else the model it registered with."""
    serving = stats.get("serving")
    if not isinstance(serving, list) or not serving:
        return [_label(info)]
    out = []
    for choice in serving:
        if not isinstance(choice, dict):
            continue
        extra = [f"{k} {choice[k]}" for k in ("canary", "shadow") if choice.get(k)]
        out.append(str(choice.get("model", "?")) + (f" ({', '.join(extra)})" if extra else ""))
    return out or [_label(info)]


def _label(info: AgentInfo) -> str:
    return info.model.label


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
