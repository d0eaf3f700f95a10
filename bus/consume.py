"""Pulling from a durable JetStream consumer with one request always open.

nats-py's ``fetch`` sends a pull request per call and, once the first message is in, waits
for the whole batch or the full timeout, so latency depends on luck. :class:`BatchPuller`
instead keeps one pull request open at the server (the pattern newer NATS clients call
*consume*): messages stream into a local buffer as they are stored, a finished request is
replaced at once, and :meth:`BatchPuller.next_batch` hands out what is buffered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Callable

import nats.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = structlog.get_logger("fusebus.bus")

_STATUS = "Status"
_HEARTBEAT = "100"
#: How often a puller checks that its pull request is still open.
WATCH_EVERY_S = 0.1
#: After a refused pull request, the next waits this long, doubling up to the most.
REFUSED_FIRST_DELAY_S = 0.05
REFUSED_MAX_DELAY_S = 1.0
_PENDING = "Nats-Pending-Messages"


class BatchPuller:
    """Streams messages of one durable pull consumer into a bounded local buffer.

    At most ``prefetch`` messages are requested at a time, so a replica never holds more
    than that many un-acked messages that an idle replica could have taken. Messages are
    acked (or nak'd, or terminated) by the caller.

    Args:
        nc: the connection.
        stream: the JetStream stream.
        consumer: the durable consumer (which must exist).
        prefetch: messages per pull request, and the most held locally.
        request_expiry_s: how long one pull request lives at the server when idle.
    """

    def __init__(
        self,
        nc: Client,
        *,
        stream: str,
        consumer: str,
        prefetch: int = 256,
        request_expiry_s: float = 5.0,
    ) -> None:
        self._nc = nc
        self.stream = stream
        self.consumer = consumer
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        self.prefetch = prefetch
        # Ask for more once the buffer is below half full (at least: once it is empty).
        self._low_water = max(1, prefetch // 2)
        self.request_expiry_s = request_expiry_s
        self._buffer: deque[Msg] = deque()
        self._arrived = asyncio.Event()
        self._credits = 0  # messages the open request may still bring
        self._request_deadline = 0.0  # after this the open request is presumed lost
        self._sub: Subscription | None = None
        self._inbox = ""
        self._watchdog: asyncio.Task[None] | None = None
        self._retry: asyncio.Task[None] | None = None  # a request put off after a refusal
        self._refused_delay_s = 0.0  # grows while requests are refused, reset by a message
        self.requests = 0

    def __repr__(self) -> str:
        return (
            f"BatchPuller({self.stream}/{self.consumer}, buffered={len(self._buffer)}, "
            f"credits={self._credits}, requests={self.requests})"
        )

    async def start(self) -> BatchPuller:
        """Subscribe to a private inbox and open the first pull request."""
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)
        self._watchdog = asyncio.create_task(self._watch_requests())
        await self._request()
        return self

    async def stop(self) -> None:
        """Stop pulling, and hand back what is buffered but not handed out (a negative ack
        redelivers it at once to another puller, instead of after the ack wait)."""
        for task in (self._watchdog, self._retry):
            if task is not None:
                task.cancel()
        self._watchdog = self._retry = None
        if self._sub is not None:
            sub, self._sub = self._sub, None
            returned = 0
            while self._buffer:
                msg = self._buffer.popleft()
                with contextlib.suppress(Exception):  # the connection may be gone already
                    await msg.nak()
                    returned += 1
            if returned:
                log.info("puller.returned", consumer=self.consumer, messages=returned)
            try:
                await sub.unsubscribe()
            except Exception as exc:  # the connection is closing: nothing left to release
                log.debug("puller.unsubscribe_failed", consumer=self.consumer, error=str(exc))

    @property
    def buffered(self) -> int:
        """Messages received and not yet handed out."""
        return len(self._buffer)

    async def next_batch(
        self, max_msgs: int, *, idle_timeout_s: float = 1.0, fill_wait_s: float = 0.0
    ) -> list[Msg]:
        """Up to ``max_msgs`` messages; empty after ``idle_timeout_s`` with none arriving.

        Once one message is in, waits up to ``fill_wait_s`` for the batch to fill.
        """
        if not self._buffer and not await self._wait_for(
            lambda: bool(self._buffer), idle_timeout_s
        ):
            return []
        if fill_wait_s > 0 and len(self._buffer) < max_msgs:
            await self._wait_for(lambda: len(self._buffer) >= max_msgs, fill_wait_s)
        count = min(max_msgs, len(self._buffer))
        batch = [self._buffer.popleft() for _ in range(count)]
        if self._credits == 0 and len(self._buffer) < self._low_water:
            await self._request()
        return batch

    async def _wait_for(self, ready: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not ready():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._arrived.clear()
            try:
                # asyncio.timeout, not wait_for: in Python 3.11 wait_for can swallow a
                # cancellation that races with the event, and a stopping service then hangs.
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()
            except TimeoutError:
                return bool(ready())
        return True

    async def _request(self) -> None:
        """Open a pull request for as many messages as the buffer has room for."""
        if self._sub is None or self._nc.is_closed:
            return
        room = self.prefetch - len(self._buffer)
        if room <= 0:
            return
        body = {"batch": room, "expires": int(self.request_expiry_s * 1e9)}
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer}"
        try:
            await self._nc.publish(subject, json.dumps(body).encode(), reply=self._inbox)
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
            return
        except Exception as exc:  # reconnecting: the watchdog asks again
            log.warning("puller.request_failed", consumer=self.consumer, error=str(exc))
            return
        self._credits = room
        self._request_deadline = time.monotonic() + self.request_expiry_s + 1.0
        self.requests += 1

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get(_STATUS) if msg.headers else None
        if status is None:
            self._refused_delay_s = 0.0
            self._buffer.append(msg)
            self._credits = max(0, self._credits - 1)
            self._arrived.set()
            if self._credits == 0 and len(self._buffer) < self._low_water:
                await self._request()
            return
        if status == _HEARTBEAT:
            return
        # 404 no messages, 408 request expired, 409 (max waiting, leadership change, consumer
        # deleted...): this request is over.
        if status != "408":
            log.debug(
                "puller.status",
                consumer=self.consumer,
                status=status,
                description=msg.headers.get("Description") if msg.headers else None,
            )
        self._credits = 0
        if status in ("409", "503"):
            # A consumer that refuses requests (409), or has no leader while its servers
            # elect one (503, no responders): ask again later, backing off, not at once.
            self._refused_delay_s = min(
                REFUSED_MAX_DELAY_S, max(REFUSED_FIRST_DELAY_S, 2 * self._refused_delay_s)
            )
            if self._retry is None or self._retry.done():
                self._retry = asyncio.create_task(self._request_after(self._refused_delay_s))
            return
        if len(self._buffer) < self._low_water:
            await self._request()

    async def _request_after(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        if len(self._buffer) < self._low_water:
            await self._request()

    async def _watch_requests(self) -> None:
        """Re-open the pull request when it was lost: a reconnect drops it silently (the
        server it was open on may be gone), so after one it is asked for again at once;
        otherwise once its expiry has passed without an answer."""
        reconnects = self._reconnects()
        while True:
            await asyncio.sleep(WATCH_EVERY_S)
            now_reconnects = self._reconnects()
            if now_reconnects != reconnects:
                # The open request died with its connection: count it as expired, so it is
                # asked for again as soon as the client is connected (the counter moves a
                # little before the client says so).
                reconnects = now_reconnects
                self._credits = 0
                self._request_deadline = 0.0
            lost = time.monotonic() > self._request_deadline
            if lost and self._nc.is_connected and len(self._buffer) < self._low_water:
                self._credits = 0
                await self._request()

    def _reconnects(self) -> int:
        return int(self._nc.stats.get("reconnects", 0))
