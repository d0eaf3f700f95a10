"""The fusion agent: collects results per task and emits exactly one decision per task.

A decision goes out as soon as every expected type has answered, or when the coordinator's
status says the task ended without them (partial, or failed with nothing in); if that
status never comes, the task is decided a grace period after its own deadline. Results are
acked only once their decision is stored (a result batch once every task in it is), so a
fusion agent that restarts is redelivered what it had not finished; decisions carry
``Nats-Msg-Id: decision:<name>:<task_id>`` so the server drops a second decision for a task
even across such a restart. Only tasks the coordinator opened are decided: every result and
status must carry the task's ticket (:mod:`schemas.tickets`); others are dead-lettered as
``unknown_task``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, assert_never

import numpy as np
import structlog

from agents.fusion.strategies import Strategy, Vote, WeightedMean
from bus import (
    BatchPuller,
    Delivery,
    ExhaustedReaper,
    Histogram,
    Inbound,
    LeaseKeeper,
    LeaseSettings,
    Lifecycle,
    Producer,
    Subjects,
    TopologySettings,
    ensure_streams,
    resume_consumer,
    ticket_key,
)
from bus.discovery import PREFIX, ROLE
from bus.subjects import check_token
from bus.types import Connection
from schemas import (
    CODEC,
    Decision,
    Result,
    ResultBatch,
    Task,
    TaskState,
    TaskStatus,
    UnknownTaskError,
)
from schemas.tickets import is_sealed

log = structlog.get_logger("fusebus.fusion")

COMPONENT = "fusion"


@dataclass(frozen=True)
class FusionSettings:
    """Limits of the fusion agent."""

    batch: int = 512
    # A task the coordinator never ends (it died, and its journal lost the task) is decided
    # this long after its deadline; one whose results carry no deadline, after pending_ttl_s.
    status_grace_s: float = 2.0
    pending_ttl_s: float = 60.0
    # Decided task ids kept to recognise late results; past this the oldest are forgotten
    # (a repeat decision is then still dropped by the server's deduplication window).
    remember_decided: int = 50_000
    # Types that answered a stream within this long are expected of it: a decision made
    # without one of them (with ``auto`` plans, a type whose replicas all left) names it in
    # ``absent``. The types of at most ``remember_streams`` streams are kept.
    remember_types_s: float = 300.0
    remember_streams: int = 10_000
    require_tickets: bool = True  # decide only tasks whose results carry the coordinator's seal
    # With partitions > 1: fusion agents of one name share the partitions by leases; a dead
    # one's are taken over about this long after its last renewal.
    lease_ttl_s: float = 6.0


def decode_fusion_input(data: bytes) -> Result | ResultBatch | TaskStatus:
    """A ``result``, ``result_batch`` or ``task_status``; raises :class:`SchemaError`."""
    message: Result | ResultBatch | TaskStatus = CODEC.decode_one_of(
        data, (Result, ResultBatch, TaskStatus)
    )
    return message


class Held:
    """A delivered message, acked once every task it carries is decided (a result batch
    carries several)."""

    __slots__ = ("delivery", "open")

    def __init__(self, delivery: Delivery, tasks: int) -> None:
        self.delivery = delivery
        self.open = tasks

    async def settle_one(self) -> None:
        """One of its tasks is decided and stored; the last one acks the message."""
        self.open -= 1
        if self.open == 0:
            await self.delivery.ack()


@dataclass
class PendingTask:
    """What fusion knows of a task not yet decided."""

    task: Task
    answers: dict[str, Vote | None] = field(default_factory=dict)  # by type; None: an error
    missing_sensors: tuple[str, ...] = ()
    missing_reasons: dict[str, str] = field(default_factory=dict)  # from the task's status
    held: list[Held] = field(default_factory=list)  # settled once it is decided
    decide_by: float = 0.0  # monotonic: decided then at the latest, with what it has


def is_fused(message: Result | ResultBatch) -> bool:
    """Whether fusion fuses the answer: its type is one its task expects (a task that
    names none, from an older coordinator, fuses every answer)."""
    if isinstance(message, ResultBatch):
        return all(not expected or message.type in expected for expected in message.expected)
    return not message.expected or message.type in message.expected


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
        self.inbound = Inbound(
            component=COMPONENT,
            producer=self.producer,
            decode=decode_fusion_input,
            max_deliver=self.topology.reader_max_deliver,
        )
        self._key = b""  # the deployment's ticket key, read at start
        self.instance_id = secrets.token_hex(4)
        self.pending: dict[str, PendingTask] = {}
        self.decided: OrderedDict[str, None] = OrderedDict()
        self.answered_lately: OrderedDict[str, dict[str, float]] = OrderedDict()
        self.counts: Counter[str] = Counter()
        self._unusable_types: set[str] = set()
        self.latency = Histogram()  # ingest -> decision, seconds
        self.recent_latency_ms: deque[float] = deque(maxlen=2048)  # for p50/p99 in status
        self._puller: BatchPuller | None = None
        self._life = Lifecycle()
        # With partitions > 1: the partitions this agent owns (each with its puller and
        # loop), and the partition of each stream id it has read.
        self.leases: LeaseKeeper | None = None
        self._owned: dict[int, Lifecycle] = {}
        self._partition_of: dict[str, int] = {}
        self.member_id = f"{self.name}-{self.instance_id}"

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
            **self.inbound.stats(),
            **(
                {
                    "member": self.member_id,
                    "partitions_total": self.topology.partitions,
                    "partitions": sorted(self._owned),
                }
                if self.topology.partitions > 1
                else {}
            ),
        }

    async def start(self) -> FusionAgent:
        """Set up streams and the durable consumer, then start deciding."""
        js = self.nc.jetstream()
        await ensure_streams(js, self.subjects, self.topology)
        if self.settings.require_tickets:
            self._key = await ticket_key(js, self.subjects, self.topology)
        if self.topology.partitions > 1:
            self._life.run(self._expire_step, name="fusion-expiry")
            self.leases = await LeaseKeeper(
                self.nc,
                subjects=self.subjects,
                group=f"{COMPONENT}-{self.name}",
                member=self.member_id,
                partitions=self.topology.partitions,
                on_acquire=self._take_partition,
                on_release=self._give_partition,
                settings=LeaseSettings(ttl_s=self.settings.lease_ttl_s),
                topology=self.topology,
            ).start()
            await self._register()
            return self
        # What a previous run had not acked comes again at once, not after the ack wait.
        await resume_consumer(
            js,
            self.subjects.results_stream,
            self.name,
            [self.subjects.all_results(), self.subjects.all_statuses()],
            ack_wait_s=self.topology.reader_ack_wait_s,
            max_deliver=self.topology.reader_max_deliver,
            max_ack_pending=50_000,
        )
        self._puller = await self._life.pull(
            self.nc,
            stream=self.subjects.results_stream,
            consumer=self.name,
            prefetch=self.settings.batch,
        )
        reaper = ExhaustedReaper(
            self.producer,
            stream=self.subjects.results_stream,
            consumer=self.name,
            component=COMPONENT,
            delete=False,  # the coordinator reads the same results
        )
        self._life.adopt(await reaper.start(self.nc))
        self._life.run(self._step, name="fusion")
        self._life.run(self._expire_step, name="fusion-expiry")
        await self._register()
        return self

    async def _register(self) -> None:
        await self._life.register(
            self.nc,
            name="fusebus-fusion",
            description="fusebus fusion agent: one decision per task",
            metadata={ROLE: COMPONENT, PREFIX: self.subjects.prefix},
            status_subject=self.subjects.control(COMPONENT, self.instance_id),
            stats=self.stats,
        )
        log.info("fusion.started", strategy=self.strategy.name, prefix=self.subjects.prefix)

    async def _take_partition(self, partition: int) -> None:
        """This agent now holds ``partition``'s lease: read its results and statuses,
        delivering at once what the previous owner had not acked (it had not decided)."""
        consumer = self.subjects.fusion_partition_consumer(self.name, partition)
        stream = self.subjects.results_stream
        await resume_consumer(
            self.nc.jetstream(),
            stream,
            consumer,
            [self.subjects.results_in(partition), self.subjects.statuses_in(partition)],
            ack_wait_s=self.topology.reader_ack_wait_s,
            max_deliver=self.topology.reader_max_deliver,
            max_ack_pending=50_000,
        )
        work = Lifecycle()
        puller = await work.pull(
            self.nc, stream=stream, consumer=consumer, prefetch=self.settings.batch
        )
        reaper = ExhaustedReaper(
            self.producer, stream=stream, consumer=consumer, component=COMPONENT, delete=False
        )
        work.adopt(await reaper.start(self.nc))
        work.run(functools.partial(self._step_from, puller, partition), name=f"fusion-{partition}")
        self._owned[partition] = work

    async def _give_partition(self, partition: int) -> None:
        """Stop reading ``partition`` before its lease is given back and forget its pending
        tasks: their results are unacked, so its next owner is given them again."""
        work = self._owned.pop(partition, None)
        if work is None:
            return
        await work.close()
        streams = {s for s, p in self._partition_of.items() if p == partition}
        for task_id in [t for t, p in self.pending.items() if p.task.stream in streams]:
            del self.pending[task_id]
        for stream in streams:
            del self._partition_of[stream]

    async def stop(self) -> None:
        """Stop deciding; undecided results stay unacked for the next fusion agent."""
        if self.leases is not None:
            leases, self.leases = self.leases, None
            with contextlib.suppress(Exception):  # the bus may be gone: leases run out
                await leases.stop()
        await self._life.close()
        await self.producer.close()
        log.info("fusion.stopped", **self.stats())

    async def __aenter__(self) -> FusionAgent:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # Loop -----------------------------------------------------------------------------------
    async def _step(self) -> None:
        assert self._puller is not None
        msgs = await self._puller.next_batch(self.settings.batch, idle_timeout_s=1.0)
        for delivery, message in await self.inbound.take(msgs):
            await self.inbound.run((delivery,), self._take(message, delivery))

    async def _step_from(self, puller: BatchPuller, partition: int) -> None:
        """Take a batch of one partition's results and statuses."""
        msgs = await puller.next_batch(self.settings.batch, idle_timeout_s=1.0)
        for delivery, message in await self.inbound.take(msgs):
            self._partition_of[message.stream] = partition
            await self.inbound.run((delivery,), self._take(message, delivery))

    async def _take(self, message: Result | ResultBatch | TaskStatus, delivery: Delivery) -> None:
        """Fold one delivered message into its tasks, deciding those it completes.

        Raises:
            UnknownTaskError: a row's ticket does not match (nothing of the message is used).
        """
        if not isinstance(message, TaskStatus) and not is_fused(message):
            # A stage of a model chain: other types read its answers, fusion does not.
            self.counts["not_fused"] += len(message) if isinstance(message, ResultBatch) else 1
            await delivery.ack()
            return
        if isinstance(message, ResultBatch):
            await self._take_batch(message, Held(delivery, len(message)))
            return
        self._check_ticket(message.ticket, message.task)
        pending = await self._pending(message.task, Held(delivery, 1))
        if pending is None:
            return
        match message:
            case TaskStatus():
                pending.missing_sensors = message.missing_sensors
                pending.missing_reasons = dict(message.missing_reasons)
                await self._decide(pending, reason=message.reason or message.state)
            case Result(error=None, output=np.ndarray() as output) if self._votes(
                message, output.shape
            ):
                vote = Vote(
                    message.type, message.labels, output, message.weight, message.model.label
                )
                await self._answer(pending, message.type, vote)
            case Result():  # the agent could not answer: the type is in, with no vote
                await self._answer(pending, message.type, None)
            case _:
                assert_never(message)

    async def _take_batch(self, batch: ResultBatch, held: Held) -> None:
        tasks = [batch.task(i) for i in range(len(batch))]
        for i, task in enumerate(tasks):  # every row is checked before any is used
            self._check_ticket(batch.ticket(i), task)
        votes = self._votes(batch, batch.outputs.shape[1:])
        model = batch.model.label
        for i, task in enumerate(tasks):
            pending = await self._pending(task, held)
            if pending is not None:
                vote = Vote(batch.type, batch.labels, batch.outputs[i], batch.weight, model)
                await self._answer(pending, batch.type, vote if votes else None)

    def _votes(self, message: Result | ResultBatch, row_shape: tuple[int, ...]) -> bool:
        """Whether an answer can be a vote: one score per label. One that cannot (features
        from a type the plan fuses, a count that disagrees with the labels) counts as that
        type answering with no vote, so the task is decided without it rather than retried."""
        if message.labels and row_shape == (len(message.labels),):
            return True
        self.counts["unusable_answers"] += len(message) if isinstance(message, ResultBatch) else 1
        if message.type in self._unusable_types:
            return False
        if len(self._unusable_types) < 1000:  # said once per type, and bounded
            self._unusable_types.add(message.type)
        log.warning(
            "result.unusable",
            type=message.type,
            stream=message.stream,
            labels=len(message.labels),
            shape=list(row_shape),
            hint="fusion needs one score per label: is a features type fused?",
        )
        return False

    def _check_ticket(self, ticket: bytes, task: Task) -> None:
        """Raises :class:`UnknownTaskError` unless the coordinator sealed this task."""
        if not self.settings.require_tickets:
            return
        if not is_sealed(self._key, ticket, task):
            self.counts["unknown_task"] += 1
            raise UnknownTaskError(
                f"task {task.task_id[:80]!r} of stream {task.stream!r}: no valid ticket (not "
                "opened by the coordinator, or altered on the way)"
            )

    async def _pending(self, task: Task, held: Held) -> PendingTask | None:
        """The pending task a message speaks of, which now holds ``held``; ``None`` (and
        ``held`` settled for it) when the task is already decided."""
        if task.task_id in self.decided:
            self.counts["after_decision"] += 1
            await held.settle_one()
            return None
        pending = self.pending.get(task.task_id)
        if pending is None:
            now = time.monotonic()
            if task.deadline_ns:
                due_in_s = (task.deadline_ns - time.time_ns()) / 1e9
                decide_by = now + due_in_s + self.settings.status_grace_s
            else:
                decide_by = now + self.settings.pending_ttl_s
            pending = self.pending[task.task_id] = PendingTask(task, decide_by=decide_by)
        pending.held.append(held)
        return pending

    async def _answer(self, pending: PendingTask, type_name: str, vote: Vote | None) -> None:
        """Record one type's answer (``None`` for an error) and decide once all are in."""
        if type_name in pending.answers:
            self.counts["repeat_results"] += 1
            return
        pending.answers[type_name] = vote
        expected = pending.task.expected
        if expected and all(t in pending.answers for t in expected):
            await self._decide(pending, reason="")

    async def _expire_step(self) -> None:
        await asyncio.sleep(0.25)
        now = time.monotonic()
        for task_id, pending in list(self.pending.items()):
            if pending.decide_by > now or task_id not in self.pending:
                continue
            self.counts["expired_pending"] += 1
            try:
                await self._decide(pending, reason="no word from the coordinator")
            except Exception as exc:
                # One task that cannot be decided must not hold up the ones behind it: forget
                # it, and let its results come again.
                self.pending.pop(task_id, None)
                await self.inbound.failed([h.delivery for h in pending.held], exc)

    async def _decide(self, pending: PendingTask, *, reason: str) -> None:
        task = pending.task
        task_id = task.task_id
        votes = [vote for vote in pending.answers.values() if vote is not None]
        contributors = tuple(v.type for v in votes)
        expected = task.expected or contributors
        missing = tuple(t for t in expected if t not in contributors)
        reasons = dict(pending.missing_reasons)
        for t in missing:
            if t not in reasons:
                reasons[t] = "error" if t in pending.answers else (reason or "no answer")
        absent = self._absent(task, contributors)
        strategy = self.strategies.get(task.stream, self.strategy)
        alarm = False
        if votes:
            fused = strategy.fuse(votes)
            label, scores, alarm = fused.label, fused.scores, fused.alarm
        else:
            label, scores = "", {}
        status: TaskState = "complete" if not missing else ("partial" if votes else "failed")
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
            missing_sensors=pending.missing_sensors,
            fusion=self.name,
            absent=absent,
            missing_reasons=reasons,
            models={v.type: v.model for v in votes if v.model},
        )
        held = pending.held

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
            for one in held:
                await one.settle_one()

        # Not awaited one by one: the next results are handled while the server stores this.
        await self.producer.decision_then(decision, then=stored)
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
            **({"absent": list(absent)} if absent else {}),
        )

    def _absent(self, task: Task, contributors: tuple[str, ...]) -> tuple[str, ...]:
        """Types that answered this stream lately but were not expected of this task; notes
        the ``contributors`` as answering it now."""
        now = time.monotonic()
        types = self.answered_lately.pop(task.stream, {})
        self.answered_lately[task.stream] = types  # the most recently decided stream last
        for type_name in contributors:
            types[type_name] = now
        cutoff = now - self.settings.remember_types_s
        for type_name in [t for t, at in types.items() if at < cutoff]:
            del types[type_name]
        while len(self.answered_lately) > self.settings.remember_streams:
            self.answered_lately.popitem(last=False)
        return tuple(sorted(t for t in types if t not in task.expected))
