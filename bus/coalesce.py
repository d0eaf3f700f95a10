"""Sending what is ready together: batches that form only when the process is busy."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import structlog

from schemas import ConfigError

log = structlog.get_logger("fusebus.bus")

K = TypeVar("K")
V = TypeVar("V")


class Coalescer(Generic[K, V]):
    """Gathers items per key and hands each key's items to ``send`` in one call.

    Nothing waits on a timer: :meth:`add` schedules a send of everything gathered for the
    event loop's next turn. While the process keeps up, that turn comes before the next
    item, so each item goes out alone and at once; when work queues up (a burst of frames
    read from the socket in one go), the items handled before the loop turns go out
    together. A key that reaches ``max_items`` is sent straight away.
    """

    def __init__(self, send: Callable[[K, list[V]], Awaitable[None]], *, max_items: int) -> None:
        if max_items < 1:
            raise ConfigError(f"a batch needs max_items >= 1, got {max_items}")
        self.send = send
        self.max_items = max_items
        self._items: dict[K, list[V]] = {}
        self._scheduled: asyncio.Task[None] | None = None

    async def add(self, key: K, item: V) -> None:
        """Gather ``item`` under ``key``; it is sent on the loop's next turn at the latest."""
        items = self._items.setdefault(key, [])
        items.append(item)
        if len(items) >= self.max_items:
            del self._items[key]
            await self.send(key, items)
        elif self._scheduled is None:
            self._scheduled = asyncio.get_running_loop().create_task(self._send_soon())

    async def flush(self) -> None:
        """Send everything gathered now, and wait for a scheduled send to finish."""
        scheduled = self._scheduled
        await self._send_all()
        if scheduled is not None and scheduled is not asyncio.current_task():
            await scheduled

    async def _send_soon(self) -> None:
        try:
            await self._send_all()
        except Exception as exc:  # the items' owners learn of the loss their own way
            log.error("coalesce.send_failed", error=str(exc) or type(exc).__name__, exc_info=True)

    async def _send_all(self) -> None:
        self._scheduled = None
        gathered, self._items = self._items, {}
        for key, items in gathered.items():
            await self.send(key, items)
