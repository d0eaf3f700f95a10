"""Keeping a service loop alive: one failed step is logged, never the end of the service."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger("fusebus.bus")


async def keep_running(
    step: Callable[[], Awaitable[None]], *, name: str, backoff_s: float = 0.5
) -> None:
    """Await ``step()`` forever; an exception from it is logged and the loop goes on.

    Cancellation ends the loop. ``backoff_s`` spaces out retries so that a persistent fault
    (the server is restarting) does not spin.
    """
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error(
                "loop.step_failed", loop=name, error=str(exc) or type(exc).__name__, exc_info=True
            )
            await asyncio.sleep(backoff_s)
