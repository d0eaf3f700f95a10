"""Publishing, in one place: every fusebus message goes out through :class:`Producer`."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import nats.errors
import numpy as np
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import ServiceUnavailableError

from bus.subjects import Subjects
from schemas import (
    DeadLetter,
    Decision,
    Result,
    ResultBatch,
    SensorChunk,
    SensorFrame,
    SensorStatus,
    ShadowBatch,
    Subtask,
    SubtaskBatch,
    TaskStatus,
    TooLargeError,
    encode,
)

log = structlog.get_logger("fusebus.bus")

MSG_ID = "Nats-Msg-Id"
#: Header naming where a producer waits for the coordinator's answer to a frame stored in
#: JetStream (a stored message's own reply subject is the server's ack).
REPLY_TO = "Fusebus-Reply-To"
_ROW_OVERHEAD_BYTES = 512  # a generous bound on a batch row's fields besides its arrays

#: A dead letter keeps this much of the original message (its size and hash say the rest).
DEAD_LETTER_KEEP_BYTES = 4096
_DEAD_LETTER_TEXT_CHARS = 1024  # error text, subject, and each header key and value
_DEAD_LETTER_HEADERS = 16

#: Server answers to a publish that are worth another try: no stream answered (no
#: responders, e.g. while a leader is elected), the service is unavailable, or a timeout.
_RETRIABLE_CODES = frozenset({408, 500, 503})


@dataclass(slots=True)
class _Unacked:
    """An acked publish whose answer has not come back: resent until stored or given up."""

    subject: str
    data: bytes
    headers: dict[str, str]
    then: Callable[[bool, bool], Awaitable[None]] | None
    give_up_at: float  # monotonic
    due_at: float  # monotonic: resend if still unanswered then
    attempts: int = 1


class Producer:
    """Encodes messages and publishes them on the right subject.

    Sensor data goes over core NATS (fire and forget, like a sensor). Everything else goes
    through JetStream: results, statuses and dead letters are acknowledged by the server
    before the call returns, so a caller that acks its input afterwards never loses
    anything; the hot paths (subtasks, decisions) do not wait, and their acks come back to
    one inbox (:meth:`_publish_acked`), where a decision's ``then`` acks its inputs.
    Subtasks and decisions carry a ``Nats-Msg-Id`` so that a re-publish (after a restart
    or a redelivery) is dropped by the server.
    """

    def __init__(
        self,
        nc: Client,
        subjects: Subjects,
        *,
        publish_timeout_s: float = 5.0,
        ack_timeout_s: float = 1.0,
        retry_delays_s: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0),
        give_up_s: float = 30.0,
    ) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=publish_timeout_s)
        self.subjects = subjects
        self.ack_timeout_s = ack_timeout_s
        self.publish_timeout_s = publish_timeout_s
        self.retry_delays_s = retry_delays_s
        self.give_up_s = give_up_s  # for publishes without a deadline of their own
        self.dead_letters = 0
        self.refused = 0  # acked publishes the server never stored (retries included)
        self.retries = 0  # acked publishes sent again with the same message id
        self._ack_prefix: str | None = None
        self._ack_serial = 0
        self._awaiting: dict[int, _Unacked] = {}  # by serial, oldest first
        self._retrier: asyncio.Task[None] | None = None
        self._answered = asyncio.Event()

    def __repr__(self) -> str:
        return (
            f"Producer({self.subjects.prefix!r}, dead_letters={self.dead_letters} "
            f"unconfirmed={self.unconfirmed} retries={self.retries} refused={self.refused})"
        )

    @property
    def unconfirmed(self) -> int:
        """Acked publishes whose answer has not come back yet."""
        return len(self._awaiting)

    @property
    def last_serial(self) -> int:
        """The serial of the latest acked publish (see :meth:`confirmed`)."""
        return self._ack_serial

    def confirmed(self, serial: int) -> bool:
        """Whether every acked publish up to ``serial`` has been answered (stored, or given
        up on after its retries)."""
        oldest = next(iter(self._awaiting), None)
        return oldest is None or oldest > serial

    async def wait_confirmed(self, serial: int, *, timeout_s: float) -> bool:
        """Wait until :meth:`confirmed` holds for ``serial``, at most ``timeout_s``."""
        try:
            async with asyncio.timeout(timeout_s):
                while not self.confirmed(serial):
                    self._answered.clear()
                    await self._answered.wait()
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop resending; publishes still unanswered are left to their owners' deadlines."""
        if self._retrier is not None:
            self._retrier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retrier
            self._retrier = None

    def _fits(self, data: bytes, what: str) -> bytes:
        """``data`` if the server takes a message that big; raises :class:`TooLargeError`."""
        if len(data) > self.nc.max_payload:
            raise TooLargeError(
                f"{what} of {len(data)} bytes exceeds the server's maximum payload "
                f"({self.nc.max_payload} bytes)"
            )
        return data

    async def frame(self, frame: SensorFrame, *, wait_s: float | None = None) -> bytes | None:
        """Publish a pre-aligned frame.

        With ``wait_s`` the frame is sent as a request and the coordinator's answer
        (``accepted``, or ``rejected: <reason>``) is returned; a coordinator whose plan blocks
        when the stream is full answers only when there is room, so the producer waits.
        """
        subject = self.subjects.frame(frame.stream)
        data = self._fits(encode(frame), "frame")
        if wait_s is None:
            await self.nc.publish(subject, data)
            return None
        # The frame is stored by JetStream (whose ack would be the reply to a request), so
        # the coordinator's answer comes to an inbox named in a header.
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox, max_msgs=1)
        try:
            await self.nc.publish(subject, data, headers={REPLY_TO: inbox})
            reply = await sub.next_msg(timeout=wait_s)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return bytes(reply.data)

    async def chunk(self, chunk: SensorChunk) -> None:
        """Publish one sensor's chunk of samples."""
        data = self._fits(encode(chunk), "sensor chunk")
        await self.nc.publish(self.subjects.sensor(chunk.stream, chunk.sensor), data)

    async def subtasks(self, subtasks: list[Subtask]) -> None:
        """Publish subtasks to the work queue, deduplicated by ``<task_id>:<type>``."""
        await asyncio.gather(
            *(
                self.js.publish(
                    self.subjects.task(s.type),
                    encode(s),
                    headers={MSG_ID: f"{s.task_id}:{s.type}"},
                )
                for s in subtasks
            )
        )

    async def subtasks_unconfirmed(self, type_name: str, subtasks: list[Subtask]) -> None:
        """Send subtasks of one type without waiting for the server's acks (see
        :meth:`_publish_acked`): as few messages as input shapes and the server's payload
        limit allow, each a ``subtask``, or a ``subtask_batch`` for several.

        This is the hot path of the coordinator: one publish per batch, against a future, a
        semaphore and a timer per subtask with nats-py's ``publish_async``. A message the
        server does not acknowledge is sent again with the same ``Nats-Msg-Id`` until the
        earliest deadline among its subtasks; one never stored shows as ``refused``, and its
        tasks still end at their deadlines. The ``Nats-Msg-Id`` is ``<first task id>:<type>``
        (``+<n>`` for a batch of n).
        """
        by_shape: dict[tuple[tuple[str, tuple[int, ...]], ...], list[Subtask]] = {}
        for s in subtasks:
            by_shape.setdefault(tuple((k, v.shape) for k, v in s.inputs.items()), []).append(s)
        for group in by_shape.values():
            row_bytes = sum(v.nbytes for v in group[0].inputs.values()) + _ROW_OVERHEAD_BYTES
            for rows in self._row_runs(len(group), row_bytes):
                part = group[rows]
                first = part[0]
                if len(part) == 1:
                    data, msg_id = encode(first), f"{first.task_id}:{type_name}"
                else:
                    data = encode(SubtaskBatch.of(part))
                    msg_id = f"{first.task_id}:{type_name}+{len(part)}"
                deadline_ns = min(s.deadline_ns for s in part)
                await self._publish_acked(
                    self.subjects.task(type_name),
                    self._fits(data, "subtask batch"),
                    {MSG_ID: msg_id},
                    give_up_s=(deadline_ns - time.time_ns()) / 1e9,
                )

    def _row_runs(self, count: int, row_bytes: int) -> list[slice]:
        """``count`` rows in runs that fit in half the server's payload limit."""
        per_run = max(1, (self.nc.max_payload // 2) // row_bytes)
        return [slice(i, i + per_run) for i in range(0, count, per_run)]

    async def _publish_acked(
        self,
        subject: str,
        data: bytes,
        headers: dict[str, str],
        then: Callable[[bool, bool], Awaitable[None]] | None = None,
        *,
        give_up_s: float | None = None,
    ) -> None:
        """Publish to a JetStream subject with the server's ack coming back to one inbox of
        this producer, where it is counted and ``then(stored, repeat)`` runs, if given.

        A publish that is refused for a reason that may pass (no stream answered, the
        service unavailable) or not answered within ``ack_timeout_s`` is sent again with the
        same headers (so the same ``Nats-Msg-Id``, which the server deduplicates), with a
        backoff, for at most ``give_up_s`` (default :attr:`give_up_s`).
        """
        if self._ack_prefix is None:
            self._ack_prefix = self.nc.new_inbox()
            await self.nc.subscribe(f"{self._ack_prefix}.*", cb=self._on_ack)
            self._retrier = asyncio.get_running_loop().create_task(self._resend_loop())
        self._ack_serial += 1
        now = time.monotonic()
        budget_s = self.give_up_s if give_up_s is None else max(0.0, give_up_s)
        self._awaiting[self._ack_serial] = _Unacked(
            subject, data, headers, then, now + budget_s, now + self.ack_timeout_s
        )
        await self.nc.publish(
            subject, data, reply=f"{self._ack_prefix}.{self._ack_serial}", headers=headers
        )

    async def _on_ack(self, msg: Msg) -> None:
        try:
            serial = int(msg.subject.rsplit(".", 1)[1])
        except ValueError:
            return
        pending = self._awaiting.get(serial)
        if pending is None:
            return  # answered already (a resent publish may be answered twice)
        stored, repeat, retriable, text = _pub_ack(msg)
        if not stored and retriable and time.monotonic() < pending.give_up_at:
            delays = self.retry_delays_s
            pending.due_at = time.monotonic() + delays[min(pending.attempts, len(delays)) - 1]
            return
        del self._awaiting[serial]
        self._answered.set()
        if not stored:
            self.refused += 1
            log.error(
                "publish.refused", subject=pending.subject, attempts=pending.attempts, reply=text
            )
        if pending.then is not None:
            await pending.then(stored, repeat)

    async def _resend_loop(self) -> None:
        """Send again what is due; give up on what has run out of time."""
        while True:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            for serial, pending in list(self._awaiting.items()):
                if pending.due_at > now:
                    continue
                if now >= pending.give_up_at:
                    del self._awaiting[serial]
                    self._answered.set()
                    self.refused += 1
                    log.error(
                        "publish.given_up", subject=pending.subject, attempts=pending.attempts
                    )
                    if pending.then is not None:
                        await pending.then(False, False)
                    continue
                pending.attempts += 1
                pending.due_at = now + self.ack_timeout_s
                self.retries += 1
                log.warning(
                    "publish.retry",
                    subject=pending.subject,
                    attempt=pending.attempts,
                    msg_id=pending.headers.get(MSG_ID),
                )
                with contextlib.suppress(Exception):  # reconnecting: the next round tries again
                    await self.nc.publish(
                        pending.subject,
                        pending.data,
                        reply=f"{self._ack_prefix}.{serial}",
                        headers=pending.headers,
                    )

    async def results(self, batches: Sequence[ResultBatch | Result]) -> None:
        """Publish agents' results and wait until they are stored, on each batch's stream
        subject: a ``result`` for a single result (an error travels so) or a batch of one,
        else ``result_batch`` messages within the server's payload limit."""
        messages = []
        for batch in batches:
            if isinstance(batch, Result):
                messages.append((batch.stream, encode(batch)))
                continue
            if len(batch) == 1:
                messages.append((batch.stream, encode(batch.items()[0])))
                continue
            row_bytes = batch.outputs[0].nbytes + len(batch.task_ids[0]) + _ROW_OVERHEAD_BYTES
            for rows in self._row_runs(len(batch), row_bytes):
                part = batch.select(np.arange(len(batch))[rows])
                messages.append((batch.stream, encode(part)))
        await asyncio.gather(
            *(
                self._publish_stored(self.subjects.result(stream), self._fits(data, "result"))
                for stream, data in messages
            )
        )

    async def _publish_stored(self, subject: str, data: bytes) -> None:
        """Publish and wait until the stream has stored it. A publish not answered within
        ``ack_timeout_s`` (its server died, or its stream is electing a leader) or refused as
        unavailable is sent again, with the retry delays, until ``publish_timeout_s`` has
        passed; then the last error is raised (the caller's input is redelivered). A repeat
        stored twice is told apart by its readers, as after any redelivery."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.publish_timeout_s
        for attempt in itertools.count():
            remaining = give_up - loop.time()
            try:
                await self.js.publish(
                    subject, data, timeout=max(0.05, min(self.ack_timeout_s, remaining))
                )
                return
            except (
                nats.errors.TimeoutError,
                nats.errors.NoRespondersError,
                ServiceUnavailableError,
            ):
                delay = self.retry_delays_s[min(attempt, len(self.retry_delays_s) - 1)]
                if loop.time() + delay >= give_up:
                    raise
                self.retries += 1
                await asyncio.sleep(delay)

    async def shadow(self, batch: ShadowBatch) -> bool:
        """Publish a shadow version's outputs once and wait for the store; False when they
        were not stored. Shadow outputs only inform ``fusebus models compare``: a lost one
        never holds up the answers the batch owes."""
        try:
            await self.js.publish(
                self.subjects.shadow(batch.name),
                self._fits(encode(batch), "shadow batch"),
                timeout=self.ack_timeout_s,
            )
        except (nats.errors.Error, TooLargeError):
            return False
        return True

    async def status(self, status: TaskStatus) -> None:
        """Send a task's final status without waiting, deduplicated by task id and sent again
        until stored (see :meth:`_publish_acked`)."""
        await self._publish_acked(
            self.subjects.status(status.stream),
            self._fits(encode(status), "task status"),
            {MSG_ID: f"status:{status.task_id}"},
        )

    async def sensor_status(self, status: SensorStatus) -> None:
        """Publish a sensor's liveness change."""
        await self.js.publish(self.subjects.sensor_status(status.stream), encode(status))

    async def decision_then(
        self, decision: Decision, *, then: Callable[[bool, bool], Awaitable[None]]
    ) -> None:
        """Publish a decision without waiting; ``then(stored, repeat)`` runs when the server
        answers: ``stored`` False on an error, ``repeat`` True when it dropped a repeat (the
        ``Nats-Msg-Id`` is ``decision:<fusion>:<task_id>``, so one fusion agent never gives a
        task two decisions, even across a restart, while several may each decide it)."""
        await self._publish_acked(
            self.subjects.decision(decision.stream),
            self._fits(encode(decision), "decision"),
            {MSG_ID: f"decision:{decision.fusion}:{decision.task_id}"},
            then,
        )

    async def dead_letter(
        self,
        *,
        component: str,
        subject: str,
        data: bytes,
        reason: str,
        error: str,
        headers: Mapping[str, Any] | None = None,
    ) -> None:
        """Keep a message that could not be handled on ``fb.dlq.<component>``, with its reason.

        However big the original, the dead letter fits the server's payload limit: it keeps
        the first :data:`DEAD_LETTER_KEEP_BYTES` of it with its size and SHA-256, and the
        error text, subject and headers cut short.
        """
        cut = _DEAD_LETTER_TEXT_CHARS
        letter = DeadLetter(
            component=component,
            subject=subject[:cut],
            reason=reason[:cut],
            error=error[:cut],
            data=bytes(data[:DEAD_LETTER_KEEP_BYTES]),
            headers={
                str(k)[:cut]: str(v)[:cut]
                for k, v in list((headers or {}).items())[:_DEAD_LETTER_HEADERS]
            },
            first_seen_ns=time.time_ns(),
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        await self.js.publish(self.subjects.dlq(component), encode(letter))
        self.dead_letters += 1
        log.warning(
            "deadletter.sent",
            component=component,
            subject=letter.subject[:200],
            reason=letter.reason,
            error=letter.error[:200],
            size=letter.size,
        )


def _pub_ack(msg: Msg) -> tuple[bool, bool, bool, str]:
    """Read a JetStream publish answer: (stored, a repeat it dropped, worth retrying, text)."""
    status = (msg.headers or {}).get("Status")
    if not msg.data:
        # No stream took it (503 no responders): nothing stored yet, may pass.
        return False, False, True, f"status {status or 'empty'}"
    try:
        answer = json.loads(msg.data)
    except ValueError:
        return False, False, False, msg.data[:200].decode(errors="replace")
    if not isinstance(answer, dict):
        return False, False, False, msg.data[:200].decode(errors="replace")
    error = answer.get("error")
    if error is None:
        return True, bool(answer.get("duplicate")), False, ""
    code = error.get("code") if isinstance(error, dict) else None
    return False, False, code in _RETRIABLE_CODES, msg.data[:200].decode(errors="replace")
