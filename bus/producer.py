"""Publishing, in one place: every fusebus message goes out through :class:`Producer`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from bus.subjects import Subjects
from schemas import (
    DeadLetter,
    Decision,
    Result,
    SensorChunk,
    SensorFrame,
    SensorStatus,
    Subtask,
    TaskStatus,
    encode,
)

log = structlog.get_logger("fusebus.bus")

MSG_ID = "Nats-Msg-Id"


class Producer:
    """Encodes messages and publishes them on the right subject.

    Sensor data goes over core NATS (fire and forget, like a sensor); subtasks, results,
    statuses, decisions and dead letters go through JetStream and are acknowledged by the
    server before the call returns, so a caller that acks its input afterwards never
    loses anything. Subtasks and decisions carry a ``Nats-Msg-Id`` so that a re-publish
    (after a restart or a redelivery) is dropped by the server.
    """

    def __init__(self, nc: Client, subjects: Subjects, *, publish_timeout_s: float = 5.0) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=publish_timeout_s)
        self.subjects = subjects
        self.dead_letters = 0
        self.unconfirmed = 0  # subtasks sent whose ack has not come back yet
        self.refused = 0  # subtasks the server answered with an error (or no responder)
        self._ack_inbox: str | None = None
        self._later_prefix: str | None = None
        self._later: dict[str, Callable[[bool, bool], Awaitable[None]]] = {}
        self._later_count = 0

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

    async def subtasks_unconfirmed(self, subtasks: list[Subtask]) -> None:
        """Send subtasks without waiting for the server's acks, which all come back to one
        inbox and are counted there (:attr:`unconfirmed`, :attr:`refused`).

        This is the hot path of the coordinator: it costs one publish per subtask, against a
        future, a semaphore and a timer each with nats-py's ``publish_async``. A subtask the
        server did not store shows as ``refused``; its task still ends at its deadline.
        """
        if self._ack_inbox is None:
            self._ack_inbox = self.nc.new_inbox()
            await self.nc.subscribe(self._ack_inbox, cb=self._on_ack)
        for s in subtasks:
            await self.nc.publish(
                self.subjects.task(s.type),
                encode(s),
                reply=self._ack_inbox,
                headers={MSG_ID: f"{s.task_id}:{s.type}"},
            )
        self.unconfirmed += len(subtasks)

    async def _on_ack(self, msg: Msg) -> None:
        self.unconfirmed -= 1
        if b'"error"' in msg.data or not msg.data:
            self.refused += 1
            log.error("subtask.refused", reply=msg.data[:200].decode(errors="replace"))

    async def results(self, results: list[Result]) -> None:
        """Publish agents' results."""
        await asyncio.gather(
            *(self.js.publish(self.subjects.result(r.stream), encode(r)) for r in results)
        )

    async def status(self, status: TaskStatus) -> None:
        """Publish a task's final status, deduplicated by task id."""
        await self.js.publish(
            self.subjects.status(status.stream),
            encode(status),
            headers={MSG_ID: f"status:{status.task_id}"},
        )

    async def decision(self, decision: Decision, *, decider: str = "fusion") -> bool:
        """Publish a decision, deduplicated by ``decider`` and task id so that one fusion agent
        never gives a task two decisions; returns False when the server dropped a repeat."""
        ack = await self.js.publish(
            self.subjects.decision(decision.stream),
            encode(decision),
            headers={MSG_ID: f"decision:{decider}:{decision.task_id}"},
        )
        return not ack.duplicate

    async def sensor_status(self, status: SensorStatus) -> None:
        """Publish a sensor's liveness change."""
        await self.js.publish(self.subjects.sensor_status(status.stream), encode(status))

    async def decision_then(
        self, decision: Decision, *, decider: str, then: Callable[[bool, bool], Awaitable[None]]
    ) -> None:
        """Publish a decision without waiting; ``then(stored, repeat)`` runs when the server
        answers: ``stored`` False on an error, ``repeat`` True when it dropped a repeat (the
        ``Nats-Msg-Id`` is ``decision:<decider>:<task_id>``, as with :meth:`decision`)."""
        if self._later_prefix is None:
            self._later_prefix = self.nc.new_inbox()
            await self.nc.subscribe(f"{self._later_prefix}.*", cb=self._on_later_ack)
        self._later_count += 1
        token = str(self._later_count)
        self._later[token] = then
        await self.nc.publish(
            self.subjects.decision(decision.stream),
            encode(decision),
            reply=f"{self._later_prefix}.{token}",
            headers={MSG_ID: f"decision:{decider}:{decision.task_id}"},
        )

    async def _on_later_ack(self, msg: Msg) -> None:
        then = self._later.pop(msg.subject.rsplit(".", 1)[1], None)
        if then is None:
            return
        stored = bool(msg.data) and b'"error"' not in msg.data
        if not stored:
            log.error("decision.refused", reply=msg.data[:200].decode(errors="replace"))
        await then(stored, b'"duplicate":true' in msg.data.replace(b" ", b""))

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
