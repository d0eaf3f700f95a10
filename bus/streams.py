"""Reading what JetStream streams store: all of it at once, or following it as it grows."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
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
    stored = iter_stored(js, stream, timeout_s=timeout_s, batch=1000)
    async with contextlib.aclosing(stored):
        return [message async for message in stored]


#: Heartbeat of a follower's ordered consumer. The consumer lives on one server (R1, in
#: memory); when that server dies, the client notices after two missed heartbeats and makes
#: it again elsewhere, so this bounds the pause a reader sees: nats-py's default of 5 s
#: made it 10-20 s.
FOLLOW_HEARTBEAT_S = 1.0


def _start_at(*, from_now: bool = False, since_ns: int | None = None) -> ConsumerConfig:
    """Where a reading consumer starts: new messages only, those stored since a time, or all."""
    if since_ns is not None:
        return ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_TIME,
            opt_start_time=datetime.fromtimestamp(since_ns / 1e9, UTC),
        )
    return ConsumerConfig(deliver_policy=DeliverPolicy.NEW if from_now else DeliverPolicy.ALL)


async def follow_stored(
    nc: Client,
    subject: str,
    cb: Callable[[Msg], Awaitable[None]],
    *,
    from_now: bool = False,
    since_ns: int | None = None,
) -> Subscription:
    """Call ``cb`` with each message stored on ``subject``, in order (an ordered consumer).

    This is how to read decisions: the stream holds exactly one per task, whereas a plain
    subscriber also sees a repeat that the server dropped from storage. ``from_now`` skips
    what was stored before; ``since_ns`` starts at what was stored from that time (Unix ns).
    """
    return await nc.jetstream().subscribe(
        subject,
        cb=cb,
        ordered_consumer=True,
        idle_heartbeat=FOLLOW_HEARTBEAT_S,
        config=_start_at(from_now=from_now, since_ns=since_ns),
    )


async def iter_stored(
    js: JetStreamContext,
    stream: str,
    subject: str | None = None,
    *,
    since_ns: int | None = None,
    batch: int = 256,
    timeout_s: float = 5.0,
) -> AsyncGenerator[StoredMessage, None]:
    """What ``stream`` holds now (on ``subject``, wildcards allowed, or on all its subjects),
    oldest first: all of it, or what was stored from ``since_ns`` (Unix ns); ends once caught
    up, and removes its consumer when closed. Raises :class:`BusError` if the stream does not
    exist."""
    config = _start_at(since_ns=since_ns)
    config.filter_subject = subject
    config.inactive_threshold = 30.0
    try:
        sub = await js.pull_subscribe(subject or "", stream=stream, config=config)
    except NotFoundError:
        raise BusError(f"stream {stream} does not exist") from None
    info = await sub.consumer_info()
    try:
        pending = info.num_pending
        while pending:
            try:
                msgs = await sub.fetch(min(batch, pending), timeout=timeout_s)
            except TimeoutError:  # the rest expired meanwhile
                return
            for msg in msgs:
                meta = msg.metadata
                stamp = meta.timestamp.timestamp() if meta and meta.timestamp else 0.0
                sequence = meta.sequence.stream if meta and meta.sequence else 0
                pending = meta.num_pending if meta and meta.num_pending is not None else 0
                await msg.ack()
                if since_ns is not None and stamp * 1e9 < since_ns:
                    continue  # a start time past the newest message starts at the oldest
                yield StoredMessage(msg.subject, msg.data, sequence, int(stamp * 1e9))
    finally:
        await sub.unsubscribe()
        with contextlib.suppress(NotFoundError):  # gone already: it was inactive too long
            await js.delete_consumer(stream, info.name)


async def last_stored(js: JetStreamContext, stream: str, subject: str) -> bytes | None:
    """The data of the newest message ``stream`` holds on ``subject`` (a literal subject), or
    None when it holds none or the stream does not exist.

    Raises:
        BusError: the server did not answer (a user without the right to read the stream
            gets no answer: the request times out after the context's timeout).
    """
    try:
        msg = await js.get_last_msg(stream, subject)
    except NotFoundError:  # no such stream, or nothing stored on the subject
        return None
    except (TimeoutError, NatsTimeoutError, NoRespondersError) as exc:
        raise BusError(f"no answer reading {subject} from stream {stream}: {exc!r}") from None
    return bytes(msg.data) if msg.data is not None else None
