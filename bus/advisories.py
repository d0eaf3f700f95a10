"""Messages that used up their deliveries: dead-lettered (and removed from a work queue).

JetStream stops redelivering a message after ``max_deliver`` attempts and publishes an
advisory. A reader that fails on a message dead-letters it itself on the last attempt; the
advisory covers the case where the reader died on every attempt. :class:`ExhaustedReaper`
listens for it (one replica handles each, through a queue group) and copies the message
into a :class:`~schemas.DeadLetter`; on a work-queue stream, where the message would stay
stored, it also deletes it.
"""

from __future__ import annotations

import contextlib
import json

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import NotFoundError

from bus.producer import Producer

log = structlog.get_logger("fusebus.bus")


def max_deliveries_subject(stream: str, consumer: str) -> str:
    """The advisory JetStream publishes when a message of ``consumer`` used up its deliveries."""
    return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{consumer}"


class ExhaustedReaper:
    """Turns max-deliveries advisories of one consumer into dead letters."""

    def __init__(
        self,
        producer: Producer,
        *,
        stream: str,
        consumer: str,
        component: str,
        delete: bool = True,
    ) -> None:
        self.producer = producer
        self.stream = stream
        self.consumer = consumer
        self.component = component
        self.delete = delete  # the stream is a work queue: remove the message too
        self.reaped = 0
        self._sub: Subscription | None = None

    def __repr__(self) -> str:
        return f"ExhaustedReaper({self.stream}/{self.consumer}, reaped={self.reaped})"

    async def start(self, nc: Client) -> ExhaustedReaper:
        """Listen for the advisories, sharing them with the other replicas of the consumer."""
        self._sub = await nc.subscribe(
            max_deliveries_subject(self.stream, self.consumer),
            queue=f"reaper-{self.consumer}",
            cb=self._on_advisory,
        )
        return self

    async def stop(self) -> None:
        """Stop listening."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except Exception as exc:  # the connection is closing
                log.debug("reaper.unsubscribe_failed", error=str(exc))

    async def _on_advisory(self, msg: Msg) -> None:
        try:
            advisory = json.loads(msg.data)
            seq = int(advisory["stream_seq"])
            deliveries = int(advisory.get("deliveries", 0))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("reaper.bad_advisory", error=str(exc))
            return
        js = self.producer.js
        try:
            stored = await js.get_msg(self.stream, seq)
        except NotFoundError:
            return  # another replica was quicker, or it was acked at the last moment
        except Exception as exc:  # the server is busy or gone: the message stays stored
            log.warning("reaper.get_failed", stream=self.stream, seq=seq, error=str(exc))
            return
        try:
            await self.producer.dead_letter(
                component=self.component,
                subject=stored.subject or "",
                data=stored.data or b"",
                reason="max_deliveries",
                error=f"not acked after {deliveries} deliveries",
                headers=dict(stored.headers or {}),
            )
        except Exception as exc:
            log.error("reaper.dead_letter_failed", stream=self.stream, seq=seq, error=str(exc))
            return
        if self.delete:
            with contextlib.suppress(Exception):  # gone already, or the server is busy
                await js.delete_msg(self.stream, seq)
        self.reaped += 1
