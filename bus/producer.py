"""Publishing, in one place: every fusebus message goes out through :class:`Producer`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from bus.subjects import Subjects
from schemas import (
    DeadLetter,
    Decision,
    ResultBatch,
    SensorChunk,
    SensorFrame,
    SensorStatus,
    Subtask,
    SubtaskBatch,
    TaskStatus,
    encode,
)

log = structlog.get_logger("fusebus.bus")

MSG_ID = "Nats-Msg-Id"
_ROW_OVERHEAD_BYTES = 256  # a generous bound on a batch row's fields besides its arrays


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

    def __init__(self, nc: Client, subjects: Subjects, *, publish_timeout_s: float = 5.0) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=publish_timeout_s)
        self.subjects = subjects
        self.dead_letters = 0
        self.unconfirmed = 0  # acked publishes whose ack has not come back yet
        self.refused = 0  # acked publishes the server answered with an error
        self._ack_prefix: str | None = None
        self._ack_serial = 0
        self._awaiting: dict[str, Callable[[bool, bool], Awaitable[None]] | None] = {}

    def __repr__(self) -> str:
        return f"Producer({self.subjects.prefix!r}, dead_letters={self.dead_letters})"

    async def frame(self, frame: SensorFrame, *, wait_s: float | None = None) -> bytes | None:
        """Publish a pre-aligned frame.

        With ``wait_s`` the frame is sent as a request and the coordinator's answer
        (``accepted``, or ``rejected: <reason>``) is returned; a coordinator whose plan blocks
        when the stream is full answers only when there is room, so the producer waits.
        """
        subject = self.subjects.frame(frame.stream)
        if wait_s is None:
            await self.nc.publish(subject, encode(frame))
            return None
        reply = await self.nc.request(subject, encode(frame), timeout=wait_s)
        return bytes(reply.data)

    async def chunk(self, chunk: SensorChunk) -> None:
        """Publish one sensor's chunk of samples."""
        await self.nc.publish(self.subjects.sensor(chunk.stream, chunk.sensor), encode(chunk))

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
        server did not store shows as ``refused``; its tasks still end at their deadlines.
        The ``Nats-Msg-Id`` is ``<first task id>:<type>`` (``+<n>`` for a batch of n).
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
                await self._publish_acked(self.subjects.task(type_name), data, {MSG_ID: msg_id})

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
    ) -> None:
        """Publish to a JetStream subject with the server's ack coming back to one inbox of
        this producer, where it is counted (:attr:`unconfirmed`, :attr:`refused`) and
        ``then(stored, repeat)`` runs, if given."""
        if self._ack_prefix is None:
            self._ack_prefix = self.nc.new_inbox()
            await self.nc.subscribe(f"{self._ack_prefix}.*", cb=self._on_ack)
        self._ack_serial += 1
        token = str(self._ack_serial)
        self._awaiting[token] = then
        self.unconfirmed += 1
        await self.nc.publish(subject, data, reply=f"{self._ack_prefix}.{token}", headers=headers)

    async def _on_ack(self, msg: Msg) -> None:
        token = msg.subject.rsplit(".", 1)[1]
        if token not in self._awaiting:
            return
        then = self._awaiting.pop(token)
        self.unconfirmed -= 1
        stored = bool(msg.data) and b'"error"' not in msg.data
        if not stored:
            self.refused += 1
            log.error("publish.refused", reply=msg.data[:200].decode(errors="replace"))
        if then is not None:
            await then(stored, b'"duplicate":true' in msg.data.replace(b" ", b""))

    async def results(self, batches: list[ResultBatch]) -> None:
        """Publish agents' results and wait until they are stored, on each batch's stream
        subject: a ``result`` for a batch of one, else ``result_batch`` messages within the
        server's payload limit."""
        messages = []
        for batch in batches:
            if len(batch) == 1:
                messages.append((batch.stream, encode(batch.items()[0])))
                continue
            row_bytes = batch.outputs[0].nbytes + len(batch.task_ids[0]) + _ROW_OVERHEAD_BYTES
            for rows in self._row_runs(len(batch), row_bytes):
                part = batch.select(np.arange(len(batch))[rows])
                messages.append((batch.stream, encode(part)))
        await asyncio.gather(
            *(self.js.publish(self.subjects.result(stream), data) for stream, data in messages)
        )

    async def status(self, status: TaskStatus) -> None:
        """Publish a task's final status, deduplicated by task id."""
        await self.js.publish(
            self.subjects.status(status.stream),
            encode(status),
            headers={MSG_ID: f"status:{status.task_id}"},
        )

    async def sensor_status(self, status: SensorStatus) -> None:
        """Publish a sensor's liveness change."""
        await self.js.publish(self.subjects.sensor_status(status.stream), encode(status))

    async def decision_then(
        self, decision: Decision, *, decider: str, then: Callable[[bool, bool], Awaitable[None]]
    ) -> None:
        """Publish a decision without waiting; ``then(stored, repeat)`` runs when the server
        answers: ``stored`` False on an error, ``repeat`` True when it dropped a repeat (the
        ``Nats-Msg-Id`` is ``decision:<decider>:<task_id>``, so one fusion agent never gives a
        task two decisions, even across a restart)."""
        await self._publish_acked(
            self.subjects.decision(decision.stream),
            encode(decision),
            {MSG_ID: f"decision:{decider}:{decision.task_id}"},
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
        headers: dict[str, Any] | None = None,
    ) -> None:
        """Keep a message that could not be handled on ``fb.dlq.<component>``, with its reason."""
        letter = DeadLetter(
            component=component,
            subject=subject,
            reason=reason,
            error=error,
            data=bytes(data),
            headers={str(k): str(v) for k, v in (headers or {}).items()},
            first_seen_ns=time.time_ns(),
        )
        await self.js.publish(self.subjects.dlq(component), encode(letter))
        self.dead_letters += 1
        log.warning(
            "deadletter.sent", component=component, subject=subject, reason=reason, error=error
        )
