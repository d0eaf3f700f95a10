"""Running one component as a long-lived process until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

from bus import BusSettings, connect
from bus.types import Connection

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
    start: Callable[[Connection], Awaitable[Component]],
    *,
    bus: BusSettings,
    name: str,
    stop_timeout_s: float = 60.0,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
) -> int:
    """Connect, start a component, serve until a stop signal, then stop it and drain.

    Returns the process exit code: 0; or 1 when stopping took longer than ``stop_timeout_s``
    (the process exits anyway; whatever was not acked is redelivered to the next one), or
    when the connection was closed for good while serving: a component never lives on
    without its bus, so that compose or a supervisor starts it again.
    """
    stop = stop_on_signals()
    closed = asyncio.Event()
    nc = await connect(bus, name=name, on_closed=closed.set)
    code = 0
    try:
        component = await start(nc)
        if metrics_port is not None:
            from fusebus.metrics import serve_metrics

            serve_metrics(component, metrics_port, host=metrics_host)
            log.info(
                "metrics.serving",
                component=name,
                url=f"http://{metrics_host}:{metrics_port}/metrics",
            )
        log.info("component.ready", component=name, url=bus.url, prefix=bus.prefix)
        await _first(stop, closed)
        if closed.is_set() and not stop.is_set():
            log.error("bus.closed", component=name, url=bus.url, outcome="exit")
            code, stop_timeout_s = 1, min(stop_timeout_s, 5.0)
        else:
            log.info("component.stopping", component=name)
        try:
            async with asyncio.timeout(stop_timeout_s):
                await component.stop()
        except TimeoutError:
            log.error("component.stop_timeout", component=name, timeout_s=stop_timeout_s)
            code = 1
        except Exception as exc:  # the bus is gone: what was not acked is redelivered
            if not closed.is_set():
                raise
            log.debug("component.stop_failed", component=name, error=str(exc))
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10.0):
                await nc.drain()
        if not nc.is_closed:
            with contextlib.suppress(Exception):
                await nc.close()
    return code


async def _first(*events: asyncio.Event) -> None:
    """Wait until any of ``events`` is set."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
