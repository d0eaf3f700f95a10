"""Service discovery over the NATS micro protocol (``$SRV.PING``, ``$SRV.INFO``, ``$SRV.STATS``).

Every fusebus component registers as a micro service; agents use their subtask type as the
service name and put their :class:`~schemas.AgentInfo` in the metadata, so any NATS tool can
list them and the coordinator can learn which types are running.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import json
import math
from collections.abc import Callable
from typing import Any

import structlog
from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointStats, Service

from schemas import OUTPUT_KINDS, AgentInfo, InputSpec, ModelRef

log = structlog.get_logger("fusebus.bus")

ROLE = "fusebus.role"
PREFIX = "fusebus.prefix"
INFO = "fusebus.agent_info"


#: Most model names one replica's info may list (what a plan may pin it to).
MAX_MODELS = 64


def agent_info_metadata(info: AgentInfo, *, prefix: str) -> dict[str, str]:
    """Service metadata (string to string) that carries an agent's info."""
    body = dataclasses.asdict(info)
    return {ROLE: "agent", PREFIX: prefix, INFO: json.dumps(body, separators=(",", ":"))}


def _input_spec(raw: dict[str, Any]) -> InputSpec:
    """One input of a card in discovery metadata; keys this version does not know are
    ignored, so an agent may say more than fusebus reads."""
    return InputSpec(
        sensor=str(raw["sensor"]),
        samples=int(raw.get("samples", 0)),
        channels=int(raw.get("channels", 0)),
        stage=bool(raw.get("stage", False)),
        shape=tuple(int(n) for n in raw.get("shape", ())),
        optional=bool(raw.get("optional", False)),
    )


def agent_info_from_metadata(metadata: dict[str, str]) -> AgentInfo | None:
    """The :class:`AgentInfo` in a service's metadata, or ``None`` if it is not an agent."""
    raw = metadata.get(INFO)
    if metadata.get(ROLE) != "agent" or not raw:
        return None
    try:
        body = json.loads(raw)
        weight = float(body.get("weight", 1.0))
        if not (math.isfinite(weight) and weight > 0):
            # fusion multiplies by it: a NaN, zero or negative weight would spoil decisions
            raise ValueError(f"weight must be finite and > 0, got {body.get('weight')!r}")
        output = body.get("output", "scores")
        if output not in OUTPUT_KINDS:
            raise ValueError(f"output must be one of {OUTPUT_KINDS}, got {output!r}")
        models = body.get("models", [])
        if not isinstance(models, list) or len(models) > MAX_MODELS:
            raise ValueError(f"models must be a list of at most {MAX_MODELS} names")
        return AgentInfo(
            agent_id=str(body["agent_id"]),
            type=str(body["type"]),
            model=ModelRef(**body["model"]),
            runtime=str(body["runtime"]),
            inputs=tuple(_input_spec(spec) for spec in body["inputs"]),
            labels=tuple(body["labels"]),
            weight=weight,
            output=output,
            output_shape=tuple(int(n) for n in body.get("output_shape", ())),
            models=tuple(str(m) for m in models),
        )
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("discovery.bad_agent_info", error=str(exc))
        return None


def software_version() -> str:
    """The installed fusebus version (semantic), for service registration."""
    try:
        return importlib.metadata.version("fusebus")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


async def register_service(
    nc: Client,
    *,
    name: str,
    description: str,
    metadata: dict[str, str],
    status_subject: str,
    stats: Callable[[], dict[str, Any]],
) -> Service:
    """Register a micro service with one ``status`` endpoint answering ``stats()`` as JSON.

    ``stats()`` also fills the endpoint's ``data`` in ``$SRV.STATS`` replies.
    """

    def stats_handler(_: EndpointStats) -> dict[str, Any]:
        return stats()

    service = await add_service(
        nc,
        name=name,
        version=software_version(),
        description=description,
        metadata=metadata,
        stats_handler=stats_handler,
    )

    async def handle_status(request: Request) -> None:
        await request.respond(json.dumps(stats()).encode())

    await service.add_endpoint(name="status", subject=status_subject, handler=handle_status)
    return service


async def gather(nc: Client, subject: str, *, timeout_s: float = 0.5) -> list[dict[str, Any]]:
    """Send one request and collect every JSON reply that arrives within ``timeout_s``."""
    inbox = nc.new_inbox()
    replies: list[dict[str, Any]] = []
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish(subject, b"", reply=inbox)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (remaining := deadline - loop.time()) > 0:
            try:
                msg = await sub.next_msg(timeout=remaining)
            except TimeoutError:
                break
            if not msg.data:  # a status message (no responders), not a reply
                continue
            try:
                replies.append(json.loads(msg.data))
            except ValueError:
                log.warning("discovery.bad_reply", subject=subject, data=msg.data[:200])
    finally:
        await sub.unsubscribe()
    return replies


async def discover_agents(
    nc: Client, *, prefix: str, timeout_s: float = 0.5
) -> list[tuple[AgentInfo, dict[str, Any]]]:
    """Every running agent replica under ``prefix``, with its current counters."""
    found = []
    for reply in await gather(nc, "$SRV.STATS", timeout_s=timeout_s):
        metadata = reply.get("metadata") or {}
        if metadata.get(PREFIX) != prefix:
            continue
        info = agent_info_from_metadata(metadata)
        if info is None:
            continue
        endpoints = reply.get("endpoints") or []
        counters = next((e.get("data") or {} for e in endpoints if e.get("name") == "status"), {})
        found.append((info, counters))
    return found


async def discover_components(
    nc: Client, *, prefix: str, timeout_s: float = 0.5
) -> list[dict[str, Any]]:
    """``$SRV.PING`` replies of every fusebus component under ``prefix``."""
    replies = await gather(nc, "$SRV.PING", timeout_s=timeout_s)
    return [r for r in replies if (r.get("metadata") or {}).get(PREFIX) == prefix]
