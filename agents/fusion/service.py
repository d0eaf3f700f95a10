"""The fusion agent: collects results per task and emits exactly one decision per task.

A decision goes out as soon as every expected type has answered, or when the coordinator's
status says the task ended without them (partial, or failed with nothing in). Results are
acked only once their decision is stored (a result batch once every task in it is), so a
fusion agent that restarts is redelivered what it had not finished; decisions carry
``Nats-Msg-Id: decision:<name>:<task_id>`` so the server drops a second decision for a task
even across such a restart.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from agents.fusion.strategies import Strategy, Vote, WeightedMean
from bus import (
    BatchPuller,
    Histogram,
    Lifecycle,
    Producer,
    Subjects,
    TopologySettings,
    ensure_reader_consumer,
    ensure_streams,
)
from bus.discovery import PREFIX, ROLE
from bus.subjects import check_token
from bus.types import Connection, Message
from schemas import CODEC, Decision, Result, ResultBatch, SchemaError, TaskStatus, Window

log = structlog.get_logger("fusebus.fusion")

COMPONENT = "fusion"


@dataclass(frozen=True)
class FusionSettings:
    """Limits of the fusion agent."""

    batch: int = 512
    pending_ttl_s: float = 60.0  # a task heard of but never ended is decided partial after this
    remember_decided: int = 200_000


class Delivery:
    """A delivered message, acked once every task it carries is decided (a result batch
    carries several)."""

    __slots__ = ("msg", "open")

    def __init__(self, msg: Message, tasks: int) -> None:
        self.msg = msg
        self.open = tasks

    async def settle_one(self) -> None:
        """One of its tasks is decided and stored; the last one acks the message."""
        self.open -= 1
        if self.open == 0:
            await self.msg.ack()


@dataclass
class PendingTask:
    """What fusion knows of a task not yet decided."""

    stream: str
    window: Window
    expected: tuple[str, ...]
    ingest_ns: int
    answers: dict[str, Vote | None] = field(default_factory=dict)  # by type; None: an error
    missing_sensors: tuple[str, ...] = ()
    deliveries: list[Delivery] = field(default_factory=list)  # settled once it is decided
    first_seen: float = field(default_factory=time.monotonic)


class FusionAgent:
    """Turns agents' results into one decision per task with a fusion :class:`Strategy`."""

    def __init__(
        self,
        nc: Connection,
        *,
        subjects: Subjects,
        strategy: Strategy | None = None,
        strategies: dict[str, Strategy] | None = None,
        name: str = "fusion",
        topology: TopologySettings | None = None,
        settings: FusionSettings | None = None,
    ) -> None:
        self.nc = nc
        self.subjects = subjects
        self.strategy = strategy or WeightedMean()
        self.strategies = dict(strategies or {})  # by stream; the others use ``strategy``
        self.name = check_token(name, "fusion name")
        self.topology = topology or TopologySettings()
        self.settings = settings or FusionSettings()
        self.producer = Producer(nc, subjects)
        self.instance_id = secrets.token_hex(4)
        self.pending: dict[str, PendingTask] = {}
        self.decided: OrderedDict[str, None] = OrderedDict()
        self.counts: Counter[str] = Counter()
        self.latency = Histogram()  # ingest -> decision, seconds
        self.recent_latency_ms: deque[float] = deque(maxlen=2048)  # for p50/p99 in status
        self._puller: BatchPuller | None = None
        self._life = Lifecycle()

    def __repr__(self) -> str:
        counts = " ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        return f"FusionAgent({self.strategy.name}, pending={len(self.pending)} {counts})"

    def stats(self) -> dict[str, Any]:
        """Counters for ``$SRV.STATS`` and the status endpoint."""
        recent = np.array(self.recent_latency_ms) if self.recent_latency_ms else None
        return {
            "name": self.name,
            "pending": len(self.pending),
            "strategy": self.strategy.name,
            "latency_p50_ms": round(float(np.percentile(recent, 50)), 2)
            if recent is not None
            else None,
            "latency_p99_ms": round(float(np.percentile(recent, 99)), 2)
            if recent is not None
            else None,
            **self.counts,
        }

    async def start(self) -> FusionAgent:
        """Set up streams and the durable consumer, then start deciding."""
        js = self.nc.jetstream()
        await ensure_streams(js, self.subjects, self.topology)
        await ensure_reader_consumer(
            js,
            self.subjects.results_stream,
            self.name,
            [self.subjects.all_results(), self.subjects.all_statuses()],
            self.topology,
        )
        self._puller = await self._life.pull(
            self.nc,
            stream=self.subjects.results_stream,
            consumer=self.name,
            prefetch=self.settings.batch,
        )
        self._life.run(self._step, name="fusion")
        self._life.run(self._expire_step, name="fusion-expiry")
        await self._life.register(
            self.nc,
            name="fusebus-fusion",
            description="fusebus fusion agent: one decision per task",
            metadata={ROLE: COMPONENT, PREFIX: self.subjects.prefix},
            status_subject=self.subjects.control(COMPONENT, self.instance_id),
            stats=self.stats,
        )
        log.info("fusion.started", strategy=self.strategy.name, prefix=self.subjects.prefix)
        return self

    async def stop(self) -> None:
        """Stop deciding; undecided results stay unacked for the next fusion agent."""
        await self._life.close()
        log.info("fusion.stopped", **self.stats())

    async def __aenter__(self) -> FusionAgent:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # Loop -----------------------------------------------------------------------------------
    async def _step(self) -> None:
        assert self._puller is not None
        msgs = await self._puller.next_batch(self.settings.batch, idle_timeout_s=1.0)
        for msg in msgs:
            await self._handle(msg)

    async def _handle(self, msg: Message) -> None:
        try:
            message = CODEC.decode_any(msg.data)
            if not isinstance(message, Result | ResultBatch | TaskStatus):
                raise SchemaError("wrong_kind", f"{type(message).__name__} on {msg.subject}")
        except SchemaError as exc:
            self.counts["dead_letters"] += 1
            await self.producer.dead_letter(
                component=COMPONENT,
                subject=msg.subject,
                data=msg.data,
                reason=exc.reason,
                error=str(exc),
                headers=msg.headers,
            )
            await msg.term()
            return
        if isinstance(message, ResultBatch):
            await self._take_batch(message, Delivery(msg, len(message)))
            return
        delivery = Delivery(msg, 1)
        window = message.window
        task = await self._task_of(
            message.task_id,
            delivery,
            message.stream,
            (window.t_start_ns, window.t_end_ns),
            message.expected,
            message.ingest_ns,
        )
        if task is None:
            return
        if isinstance(message, TaskStatus):
            task.missing_sensors = message.missing_sensors
            await self._decide(message.task_id, task, reason=message.reason or message.state)
        elif message.error is None and message.output is not None:
            vote = Vote(message.type, message.labels, message.output, message.weight)
            await self._answer(message.task_id, task, message.type, vote)
        else:
            await self._answer(message.task_id, task, message.type, None)

    async def _take_batch(self, batch: ResultBatch, delivery: Delivery) -> None:
        for i, task_id in enumerate(batch.task_ids):
            window, expected, ingest_ns = batch.windows[i], batch.expected[i], batch.ingest_ns[i]
            task = await self._task_of(task_id, delivery, batch.stream, window, expected, ingest_ns)
            if task is not None:
                vote = Vote(batch.type, batch.labels, batch.outputs[i], batch.weight)
                await self._answer(task_id, task, batch.type, vote)

    async def _task_of(
        self,
        task_id: str,
        delivery: Delivery,
        stream: str,
        window: Sequence[int],
        expected: tuple[str, ...],
        ingest_ns: int,
    ) -> PendingTask | None:
        """The pending task a message speaks of, which now holds ``delivery``; ``None`` (and
        the delivery settled for it) when the task is already decided."""
        if task_id in self.decided:
            self.counts["after_decision"] += 1
            await delivery.settle_one()
            return None
        task = self.pending.get(task_id)
        if task is None:
            task = self.pending[task_id] = PendingTask(
                stream=stream,
                window=Window(int(window[0]), int(window[1])),
                expected=expected,
                ingest_ns=int(ingest_ns),
            )
        task.deliveries.append(delivery)
        return task

    async def _answer(
        self, task_id: str, task: PendingTask, type_name: str, vote: Vote | None
    ) -> None:
        """Record one type's answer (``None`` for an error) and decide once all are in."""
        if type_name in task.answers:
            self.counts["repeat_results"] += 1
            return
        task.answers[type_name] = vote
        if task.expected and all(t in task.answers for t in task.expected):
            await self._decide(task_id, task, reason="")

    async def _expire_step(self) -> None:
        await asyncio.sleep(1.0)
        cutoff = time.monotonic() - self.settings.pending_ttl_s
        for task_id, task in list(self.pending.items()):
            if task.first_seen < cutoff:
                self.counts["expired_pending"] += 1
                await self._decide(task_id, task, reason="no word from the coordinator")

    async def _decide(self, task_id: str, task: PendingTask, *, reason: str) -> None:
        votes = [vote for vote in task.answers.values() if vote is not None]
        contributors = tuple(v.type for v in votes)
        expected = task.expected or contributors
        missing = tuple(t for t in expected if t not in contributors)
        strategy = self.strategies.get(task.stream, self.strategy)
        alarm = False
        if votes:
            fused = strategy.fuse(votes)
            label, scores, alarm = fused.label, fused.scores, fused.alarm
        else:
            label, scores = "", {}
        status = "complete" if not missing else ("partial" if votes else "failed")
        now_ns = time.time_ns()
        decision = Decision(
            task_id=task_id,
            stream=task.stream,
            window=task.window,
            label=label,
            scores=scores,
            status=status,
            contributors=contributors,
            missing=missing,
            strategy=strategy.name,
            latency_ms=(now_ns - task.ingest_ns) / 1e6 if task.ingest_ns else 0.0,
            decided_ns=now_ns,
            alarm=alarm,
            missing_sensors=task.missing_sensors,
        )
        deliveries = task.deliveries

        async def stored(ok: bool, repeat: bool) -> None:
            # The task's results are acked only once its decision is stored: a fusion agent
            # that dies before then is redelivered them, and the server drops its repeat.
            if repeat:
                self.counts["repeat_decisions_dropped"] += 1
            if not ok:
                # Forget it so the redelivered results decide the task again.
                self.counts["decisions_refused"] += 1
                self.decided.pop(task_id, None)
                return
            for delivery in deliveries:
                await delivery.settle_one()

        # Not awaited one by one: the next results are handled while the server stores this.
        await self.producer.decision_then(decision, decider=self.name, then=stored)
        del self.pending[task_id]
        self.decided[task_id] = None
        if len(self.decided) > self.settings.remember_decided:
            self.decided.popitem(last=False)
        self.counts[f"decisions_{status}"] += 1
        self.latency.observe(decision.latency_ms / 1e3)
        self.recent_latency_ms.append(decision.latency_ms)
        log.info(
            "decision.emitted",
            task_id=task_id,
            stream=task.stream,
            label=label,
            status=status,
            missing=list(missing),
            latency_ms=round(decision.latency_ms, 2),
            alarm=alarm,
            reason=reason,
        )
