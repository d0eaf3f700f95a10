"""What every long-running component shares: its loops, its pullers, its service registration."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from nats.aio.client import Client
from nats.micro.service import Service

from bus.consume import BatchPuller
from bus.discovery import register_service
from bus.loops import keep_running


class Stoppable(Protocol):
    """Anything the lifecycle stops at close."""

    async def stop(self) -> None:
        """Stop."""
        ...


S = TypeVar("S", bound=Stoppable)


class Lifecycle:
    """Owns a component's background loops, pullers and micro service, and stops them in order.

    A component creates one, starts things through it, and calls :meth:`close` in its
    ``stop``: loops are cancelled first (a step that shields its work finishes it), then
    pullers stop and the service deregisters.
    """

    def __init__(self) -> None:
        self._loops: list[asyncio.Task[None]] = []
        self._parts: list[Stoppable] = []
        self.service: Service | None = None

    def run(self, step: Callable[[], Awaitable[None]], *, name: str) -> None:
        """Run ``step`` over and over in the background (see :func:`keep_running`)."""
        self._loops.append(asyncio.create_task(keep_running(step, name=name), name=name))

    async def pull(self, nc: Client, *, stream: str, consumer: str, prefetch: int) -> BatchPuller:
        """Start a :class:`BatchPuller` that is stopped with the component."""
        puller = await BatchPuller(nc, stream=stream, consumer=consumer, prefetch=prefetch).start()
        return self.adopt(puller)

    def adopt(self, part: S) -> S:
        """Stop ``part`` (anything with an async ``stop``) when the component closes."""
        self._parts.append(part)
        return part

    async def register(
        self,
        nc: Client,
        *,
        name: str,
        description: str,
        metadata: dict[str, str],
        status_subject: str,
        stats: Callable[[], dict[str, Any]],
    ) -> None:
        """Register the component as a NATS micro service."""
        self.service = await register_service(
            nc,
            name=name,
            description=description,
            metadata=metadata,
            status_subject=status_subject,
            stats=stats,
        )

    async def close(self) -> None:
        """Cancel the loops, stop the adopted parts (last first), deregister the service."""
        loops, self._loops = self._loops, []
        for task in loops:
            task.cancel()
        for task in loops:
            # In Python 3.11 ``asyncio.wait_for`` (inside nats-py's request) can swallow a
            # cancellation that races with its reply, and the loop would then run on: cancel
            # again until the task is done.
            while not task.done():
                await asyncio.wait({task}, timeout=0.5)
                if not task.done():
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        parts, self._parts = self._parts, []
        for part in reversed(parts):
            await part.stop()
        if self.service is not None:
            service, self.service = self.service, None
            with contextlib.suppress(Exception):  # the connection may already be gone
                async with asyncio.timeout(5.0):
                    await service.stop()
