"""Pulling from durable JetStream consumers in batches."""

from __future__ import annotations

import asyncio
import time

import nats.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext

log = structlog.get_logger("fusebus.bus")


class BatchPuller:
    """Pulls batches of messages from one durable consumer.

    :meth:`next_batch` returns what is waiting, up to ``max_msgs``; when fewer are waiting it
    keeps pulling for up to ``fill_wait_s`` so that a batch can fill, and it returns an empty
    list after ``idle_timeout_s`` with nothing at all. Bus hiccups (a reconnect, a server
    restart) are logged and answered with an empty batch, never raised, so the loop around
    it keeps serving.
    """

    def __init__(self, js: JetStreamContext, *, stream: str, consumer: str) -> None:
        self._js = js
        self.stream = stream
        self.consumer = consumer
        self._sub: JetStreamContext.PullSubscription | None = None

    def __repr__(self) -> str:
        return f"BatchPuller({self.stream}/{self.consumer})"

    async def start(self) -> BatchPuller:
        """Bind to the consumer (which must exist)."""
        self._sub = await self._js.pull_subscribe_bind(durable=self.consumer, stream=self.stream)
        return self

    async def stop(self) -> None:
        """Stop pulling."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except Exception as exc:  # closing connection: nothing left to release
                log.debug("puller.unsubscribe_failed", consumer=self.consumer, error=str(exc))

    async def next_batch(
        self, max_msgs: int, *, idle_timeout_s: float = 1.0, fill_wait_s: float = 0.0
    ) -> list[Msg]:
        """Up to ``max_msgs`` messages; empty after ``idle_timeout_s`` with none waiting."""
        if self._sub is None:
            raise RuntimeError(f"{self!r} is not started")
        msgs = await self._fetch(max_msgs, idle_timeout_s)
        if not msgs or fill_wait_s <= 0:
            return msgs
        deadline = time.monotonic() + fill_wait_s
        while len(msgs) < max_msgs:
            remaining = deadline - time.monotonic()
            if remaining <= 0.0005:
                break
            more = await self._fetch(max_msgs - len(msgs), remaining)
            if not more:
                break
            msgs.extend(more)
        return msgs

    async def _fetch(self, max_msgs: int, timeout_s: float) -> list[Msg]:
        assert self._sub is not None
        try:
            return await self._sub.fetch(max_msgs, timeout=timeout_s)
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            return []
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
            raise
        except Exception as exc:  # a reconnect or a restarting server: wait and try again
            log.warning("puller.fetch_failed", consumer=self.consumer, error=str(exc))
            await asyncio.sleep(min(timeout_s, 0.5))
            return []
