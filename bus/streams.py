"""Reading what JetStream streams store: all of it at once, or following it as it grows."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from schemas import BusError


@dataclass(frozen=True)
class StoredMessage:
    """One message as a stream keeps it."""

    subject: str
    data: bytes
    sequence: int  # in the stream
    time_ns: int  # when the server stored it


async def read_stored(
    js: JetStreamContext, stream: str, *, timeout_s: float = 5.0
) -> list[StoredMessage]:
    """Every message ``stream`` holds now, oldest first; raises :class:`BusError` if it does
    not exist. Messages that expire while being read are simply not in the list."""
    try:
        total = (await js.stream_info(stream)).state.messages
    except NotFoundError:
        raise BusError(f"stream {stream} does not exist") from None
    if not total:
        return []
    sub = await js.pull_subscribe(
        "",
        stream=stream,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=30.0),
    )
    stored: list[StoredMessage] = []
    try:
        while len(stored) < total:
            try:
                msgs = await sub.fetch(min(1000, total - len(stored)), timeout=timeout_s)
            except TimeoutError:  # the rest expired meanwhile
                break
            for msg in msgs:
                meta = msg.metadata
                stamp = meta.timestamp.timestamp() if meta and meta.timestamp else 0.0
                sequence = meta.sequence.stream if meta and meta.sequence else 0
                stored.append(StoredMessage(msg.subject, msg.data, sequence, int(stamp * 1e9)))
                await msg.ack()
    finally:
        await sub.unsubscribe()
    return stored


async def follow_stored(
    nc: Client, subject: str, cb: Callable[[Msg], Awaitable[None]], *, from_now: bool = False
) -> Subscription:
    """Call ``cb`` with each message stored on ``subject``, in order (an ordered consumer).

    This is how to read decisions: the stream holds exactly one per task, whereas a plain
    subscriber also sees a repeat that the server dropped from storage. ``from_now`` skips
    what was stored before.
    """
    return await nc.jetstream().subscribe(
        subject,
        cb=cb,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.NEW if from_now else DeliverPolicy.ALL,
    )
