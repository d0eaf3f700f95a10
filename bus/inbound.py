"""The one inbound path: every delivery, JetStream or core, is decoded, handled and answered.

Like the request handler of nats micro, :class:`Inbound` stands between the transport and a
component. It wraps each message in a :class:`Delivery` (bytes, subject, headers, attempt
and the ways to answer), decodes it into a typed message, hands it to the component, and
answers every outcome the component does not answer itself:

- the bytes do not decode, or handling raised a :class:`~schemas.FusebusError`: the message
  is dead-lettered under the error's ``reason`` and terminated (a producer that asked is
  answered ``rejected: <reason>: <what was wrong>``); it is never retried;
- handling raised anything else: the message is nak'd with a backoff by attempt, counted
  and logged, and dead-lettered as ``max_deliveries`` on its last allowed attempt;
- the dead letter itself cannot be stored: the message is nak'd, so it comes back later
  rather than being lost.

Component code never sees a raw nats message and never writes its own try/except around
decoding. When to ack a message that was handled is the component's call (the fusion agent
acks a result once its decision is stored).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Generic, TypeVar

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus.producer import REPLY_TO, Producer
from schemas import FusebusError, SchemaError
from schemas.limits import check_name

log = structlog.get_logger("fusebus.bus")

M = TypeVar("M")

_MAX_REPLY_BYTES = 256
_JS_ACK = "$JS.ACK."


class Delivery:
    """One delivered message, as components see it.

    ``durable`` deliveries come from a JetStream consumer and are acked, nak'd or
    terminated; core deliveries have nothing to settle, and those methods do nothing.
    """

    __slots__ = ("_attempt", "_msg", "_nc", "data", "durable", "received", "settled", "subject")

    def __init__(self, msg: Msg, nc: Client) -> None:
        self._msg = msg
        self._nc = nc
        self.data: bytes = msg.data
        self.subject: str = msg.subject
        self.durable = bool(msg.reply) and msg.reply.startswith(_JS_ACK)
        self.received = time.monotonic()
        self.settled = False
        self._attempt: int | None = None

    def __repr__(self) -> str:
        kind = "js" if self.durable else "core"
        return f"Delivery({self.subject}, {len(self.data)} B, {kind}, attempt={self.attempt})"

    @property
    def headers(self) -> Mapping[str, str]:
        """The message's headers (empty when it has none)."""
        return self._msg.headers or {}

    @property
    def attempt(self) -> int:
        """Which delivery of the message this is, from 1 (always 1 for core messages)."""
        if self._attempt is None:
            meta = self._msg.metadata if self.durable else None
            self._attempt = int(meta.num_delivered) if meta and meta.num_delivered else 1
        return self._attempt

    @property
    def pending(self) -> int:
        """How many messages were waiting behind this one on its consumer when it was
        delivered (0 for core messages)."""
        meta = self._msg.metadata if self.durable else None
        return int(meta.num_pending or 0) if meta else 0

    @property
    def reply_to(self) -> str | None:
        """Where the producer waits for an answer, if it asked: the reply subject of a core
        request, or the checked :data:`REPLY_TO` header of a stored message."""
        if not self.durable:
            return self._msg.reply or None
        wanted = self.headers.get(REPLY_TO)
        return wanted if wanted is not None and _is_inbox(wanted) else None

    async def ack(self) -> None:
        """Done with it: JetStream will not deliver it again."""
        if self.durable and not self.settled:
            self.settled = True
            await self._msg.ack()

    async def nak(self, delay_s: float | None = None) -> None:
        """Not handled: deliver it again, after ``delay_s`` if given."""
        if self.durable and not self.settled:
            self.settled = True
            await self._msg.nak(delay=delay_s)

    async def term(self) -> None:
        """Never deliver it again (it was dead-lettered)."""
        if self.durable and not self.settled:
            self.settled = True
            await self._msg.term()

    async def in_progress(self) -> None:
        """Still being worked on: restart the server's ack timer."""
        if self.durable and not self.settled:
            await self._msg.in_progress()

    async def answer(self, text: bytes) -> None:
        """Tell a producer that asked (see :attr:`reply_to`); nothing if it did not."""
        reply = self.reply_to
        if reply is not None:
            try:
                await self._nc.publish(reply, text)
            except Exception as exc:  # the producer may have given up; the answer is a courtesy
                log.debug("delivery.answer_failed", subject=self.subject, error=str(exc))


#: An answer to a producer names the reason and what was wrong, in at most this many
#: characters (the dead letter keeps the whole error).
_MAX_ANSWER_CHARS = 500


def _is_inbox(subject: str) -> bool:
    """A reply subject a producer may name: ``_INBOX.`` plus valid tokens, bounded."""
    if len(subject) > _MAX_REPLY_BYTES or not subject.startswith("_INBOX."):
        return False
    try:
        for token in subject.split("."):
            check_name(token, "reply token")
    except FusebusError:
        return False
    return True


Handler = Callable[[M, Delivery], Awaitable[None]]


class Inbound(Generic[M]):
    """Decodes and answers the deliveries of one component (see the module docstring).

    Args:
        component: names the dead-letter subject (``fb.dlq.<component>``).
        producer: publishes the dead letters.
        decode: bytes to the component's typed message; raises :class:`SchemaError`.
        max_deliver: the consumer's delivery limit; a failure on the last attempt is
            dead-lettered instead of nak'd.
        nak_delays_s: the redelivery delay after a failure, by attempt (the last repeats).
    """

    def __init__(
        self,
        *,
        component: str,
        producer: Producer,
        decode: Callable[[bytes], M],
        max_deliver: int,
        nak_delays_s: Sequence[float] = (0.2, 1.0, 3.0),
    ) -> None:
        self.component = component
        self.producer = producer
        self._decode = decode
        self.max_deliver = max_deliver
        self.nak_delays_s = tuple(nak_delays_s)
        self.counts: Counter[str] = Counter()

    def __repr__(self) -> str:
        counts = " ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        return f"Inbound({self.component} {counts})"

    def stats(self) -> dict[str, int]:
        """Counts of outcomes: ``received``, ``dead_letters``, ``naks``, ``dead_letter_failed``."""
        return dict(self.counts)

    async def take(self, msgs: Sequence[Msg]) -> list[tuple[Delivery, M]]:
        """Wrap and decode ``msgs``; those that do not decode are dead-lettered and left out."""
        taken = []
        for msg in msgs:
            delivery = Delivery(msg, self.producer.nc)
            message = await self.decoded(delivery)
            if message is not None:
                taken.append((delivery, message))
        return taken

    async def decoded(self, delivery: Delivery) -> M | None:
        """The delivery's message, or ``None`` once it has been dead-lettered."""
        self.counts["received"] += 1
        try:
            return self._decode(delivery.data)
        except SchemaError as exc:
            await self.dead_letter(delivery, exc.reason, str(exc))
            return None

    async def run(self, deliveries: Sequence[Delivery], work: Awaitable[None]) -> bool:
        """Await ``work`` (the handling of ``deliveries``); if it raises, answer each of them
        as the module docstring says. Returns whether the work succeeded."""
        try:
            await work
        except FusebusError as exc:
            for delivery in deliveries:
                await self.dead_letter(delivery, exc.reason, str(exc))
            return False
        except Exception as exc:
            await self.failed(deliveries, exc)
            return False
        return True

    async def handle(self, msg: Msg, handler: Handler[M]) -> None:
        """Decode one message and hand it to ``handler``, answering every outcome."""
        delivery = Delivery(msg, self.producer.nc)
        message = await self.decoded(delivery)
        if message is not None:
            await self.run((delivery,), handler(message, delivery))

    def callback(self, handler: Handler[M]) -> Callable[[Msg], Awaitable[None]]:
        """A subscription callback that passes each message through :meth:`handle`."""

        async def on_msg(msg: Msg) -> None:
            await self.handle(msg, handler)

        return on_msg

    async def failed(self, deliveries: Sequence[Delivery], exc: BaseException) -> None:
        """Handling ``deliveries`` failed for a reason that may pass: nak each with a
        backoff, or dead-letter it on its last attempt (or if it cannot be redelivered)."""
        error = str(exc) or type(exc).__name__
        self.counts["failures"] += 1
        log.error(
            "inbound.failed",
            component=self.component,
            messages=len(deliveries),
            error=error,
            exc_info=exc,
        )
        for delivery in deliveries:
            if not delivery.durable:
                await self.dead_letter(delivery, "handler_error", error)
            elif delivery.attempt >= self.max_deliver:
                await self.dead_letter(
                    delivery, "max_deliveries", f"failed on attempt {delivery.attempt}: {error}"
                )
            else:
                self.counts["naks"] += 1
                await delivery.nak(self.backoff_s(delivery.attempt))

    def backoff_s(self, attempt: int) -> float | None:
        """The redelivery delay after a failed ``attempt``."""
        if not self.nak_delays_s:
            return None
        return self.nak_delays_s[min(attempt, len(self.nak_delays_s)) - 1]

    async def dead_letter(self, delivery: Delivery, reason: str, error: str) -> None:
        """Keep ``delivery`` on the dead-letter subject with ``reason``, then terminate it
        (or answer its producer). If the dead letter cannot be stored, nak it instead."""
        try:
            await self.producer.dead_letter(
                component=self.component,
                subject=delivery.subject,
                data=delivery.data,
                reason=reason,
                error=error,
                headers=delivery.headers,
            )
        except Exception as exc:
            self.counts["dead_letter_failed"] += 1
            log.error(
                "deadletter.failed",
                component=self.component,
                subject=delivery.subject[:200],
                reason=reason,
                error=str(exc) or type(exc).__name__,
            )
            await delivery.nak(self.backoff_s(delivery.attempt))
            return
        self.counts["dead_letters"] += 1
        await delivery.term()
        detail = error.removeprefix(f"{reason}: ")
        await delivery.answer(f"rejected: {reason}: {detail}"[:_MAX_ANSWER_CHARS].encode())
