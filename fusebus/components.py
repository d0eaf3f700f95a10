"""Running one component as a long-lived process until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog
from nats.aio.client import Client

from bus import BusSettings, connect

log = structlog.get_logger("fusebus")


class Component(Protocol):
    """Anything with an async ``stop``: coordinator, agent runtime, fusion agent."""

    async def stop(self) -> None:
        """Stop serving."""
        ...


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT in the running loop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):  # not on every platform
            loop.add_signal_handler(sig, stop.set)
    return stop


async def serve(
    start: Callable[[Client], Awaitable[Component]], *, bus: BusSettings, name: str
) -> int:
    """Connect, start a component, serve until a stop signal, then stop it and drain.

    Returns the process exit code (0).
    """
    stop = stop_on_signals()
    nc = await connect(bus, name=name)
    try:
        component = await start(nc)
        log.info("component.ready", component=name, url=bus.url, prefix=bus.prefix)
        await stop.wait()
        log.info("component.stopping", component=name)
        await component.stop()
    finally:
        with contextlib.suppress(Exception):
            await nc.drain()
    return 0
