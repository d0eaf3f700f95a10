"""The coordinator service: frames in, subtasks out, every task tracked to its end.

A thin async shell around pure parts: :func:`~coordinator.decompose.decompose` turns a frame
into subtasks, :class:`~coordinator.tracker.TaskTracker` decides when each task ends, and
:class:`~coordinator.journal.TaskJournal` keeps the open ones durable so that a restarted
coordinator finishes what it had opened. Every task ends once: complete, or with a
``partial``/``failed`` status published at its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from bus import (
    BatchPuller,
    Coalescer,
    Lifecycle,
    PageLog,
    Producer,
    Subjects,
    TopologySettings,
    discover_agents,
    ensure_reader_consumer,
    ensure_streams,
)
from bus.discovery import PREFIX, ROLE
from bus.types import Connection, Message, Subscription
from coordinator.decompose import Opening, decompose
from coordinator.directory import AgentDirectory
from coordinator.intake import SensorIntake
from coordinator.journal import TaskJournal
from coordinator.plan import Plan, PlanBook, SubtaskSpec
from coordinator.tracker import Ended, Seen, TaskTracker
from coordinator.windows import CutWindow
from schemas import (
    CODEC,
    ConfigError,
    Result,
    ResultBatch,
    SchemaError,
    Subtask,
    TaskStatus,
)

log = structlog.get_logger("fusebus.coordinator")

COMPONENT = "coordinator"
ACCEPTED = b"accepted"


@dataclass(frozen=True)
class CoordinatorSettings:
    """Timings of the coordinator's loops."""

    name: str = "main"  # names the journal; coordinators sharing a prefix need distinct names
    durable: bool = True  # journal open tasks so a restart finishes them
    journal_interval_ms: float = 50.0  # how long a change may wait before it is journalled
    max_deadline_sleep_ms: float = 50.0  # longest nap between two deadline checks
    results_batch: int = 512
    subtask_batch: int = 64  # most subtasks of a type in one message; 1: one per message
    discovery_interval_s: float = 0.5  # how often auto plans look for agent types
    discovery_timeout_s: float = 0.25  # how long one look waits for replies
    forget_type_after_s: float = 1.5  # a type unseen this long is no longer expected
    drain_timeout_s: float = 0.0  # on stop, how long open tasks may take to end
    liveness_interval_s: float = 0.25  # how often silent sensors are looked for
    forget_stream_after_s: float = 300.0  # a stream silent this long is forgotten

    def __post_init__(self) -> None:
        if not self.journal_interval_ms > 0:
            raise ConfigError(f"journal_interval_ms must be > 0, got {self.journal_interval_ms}")
        if self.subtask_batch < 1:
            raise ConfigError(f"subtask_batch must be >= 1, got {self.subtask_batch}")


class Coordinator:
    """Decomposes frames into subtasks and tracks every task until it ends.

    Use :meth:`start` then :meth:`stop`, or ``async with``.
    """

    def __init__(
        self,
        nc: Connection,
        *,
        plans: PlanBook,
        subjects: Subjects,
        topology: TopologySettings | None = None,
        settings: CoordinatorSettings | None = None,
    ) -> None:
        self.nc = nc
        self.plans = plans
        self.subjects = subjects
        self.topology = topology or TopologySettings()
        self.settings = settings or CoordinatorSettings()
        self.producer = Producer(nc, subjects)
        # Subtasks of windows admitted in the same turn of the event loop go out as one
        # message per type: one publish, store, delivery and ack for the whole batch.
        self.outbox: Coalescer[str, Subtask] = Coalescer(
            self.producer.subtasks_unconfirmed, max_items=self.settings.subtask_batch
        )
        self.tracker = TaskTracker()
        self.directory = AgentDirectory(forget_after_s=self.settings.forget_type_after_s)
        self.journal: TaskJournal | None = None
        self.instance_id = secrets.token_hex(4)
        self._task_serial = 0
        self.counts: dict[str, int] = dict.fromkeys(
            ("dead_letters", "unserved", "held", "rejected"), 0
        )
        self.intake = SensorIntake(
            plans=plans,
            subjects=subjects,
            producer=self.producer,
            on_window=self._on_window,
            on_bad_message=self._dead_letter,
            forget_after_s=self.settings.forget_stream_after_s,
        )
        self._held: dict[str, deque[tuple[CutWindow, Message | None]]] = {}
        self._sensors_sub: Subscription | None = None
        self._all_ended = asyncio.Event()  # set whenever no task is open
        self._frames_sub: Subscription | None = None
        self._puller: BatchPuller | None = None
        self._life = Lifecycle()

    def __repr__(self) -> str:
        counts = " ".join(f"{k}={v}" for k, v in self.counts.items() if v)
        return f"Coordinator({self.settings.name} {counts} {self.tracker!r})"

    def stats(self) -> dict[str, Any]:
        """Counters for ``$SRV.STATS`` and the status endpoint."""
        return {
            **self.counts,
            **self.intake.stats(),
            "open_tasks": len(self.tracker),
            "held_now": sum(len(q) for q in self._held.values()),
            "subtasks_refused": self.producer.refused,
            "subtasks_unconfirmed": self.producer.unconfirmed,
            "agent_types": sorted(self.directory.types),
            **self.tracker.counts,
        }

    async def start(self) -> Coordinator:
        """Set up streams, finish what a previous run left open, then take frames and results."""
        js = self.nc.jetstream()
        await ensure_streams(js, self.subjects, self.topology)
        if self.settings.durable:
            pages = PageLog(
                self.nc,
                stream=self.subjects.journal_stream,
                stream_subjects=self.subjects.all_journals(),
                subject=self.subjects.journal(self.settings.name),
                storage=self.topology.storage_type,
            )
            await pages.ensure()
            self.journal = TaskJournal(pages)
            await self._restore()
            self._life.run(self._journal_step, name="coordinator-journal")
        await ensure_reader_consumer(
            js,
            self.subjects.results_stream,
            self.subjects.coordinator_consumer,
            [self.subjects.all_results()],
            self.topology,
        )
        self._puller = await self._life.pull(
            self.nc,
            stream=self.subjects.results_stream,
            consumer=self.subjects.coordinator_consumer,
            prefetch=self.settings.results_batch,
        )
        self._life.run(self._results_step, name="coordinator-results")
        self._life.run(self._deadline_step, name="coordinator-deadlines")
        if self.plans.any_auto:
            await self._discovery_step()  # know the running types before the first frame
            self._life.run(self._discovery_step, name="coordinator-discovery")
        self._life.run(self._liveness_step, name="coordinator-liveness")
        self._frames_sub = await self.nc.subscribe(
            self.subjects.all_frames(), cb=self.intake.on_frame, pending_msgs_limit=100_000
        )
        self._sensors_sub = await self.nc.subscribe(
            self.subjects.all_sensors(), cb=self.intake.on_chunk, pending_msgs_limit=1_000_000
        )
        await self._life.register(
            self.nc,
            name="fusebus-coordinator",
            description="fusebus coordinator: windows, subtasks, completion tracking",
            metadata={ROLE: COMPONENT, PREFIX: self.subjects.prefix},
            status_subject=self.subjects.control(COMPONENT, self.instance_id),
            stats=self.stats,
        )
        log.info("coordinator.started", prefix=self.subjects.prefix, plans=repr(self.plans))
        return self

    async def stop(self, *, drain_timeout_s: float | None = None) -> None:
        """Stop taking frames; let open tasks end for up to ``drain_timeout_s`` (default: the
        settings'; tasks end at their deadlines at the latest); then stop. Tasks still open
        stay in the journal for the next run."""
        if drain_timeout_s is None:
            drain_timeout_s = self.settings.drain_timeout_s
        for sub in (self._frames_sub, self._sensors_sub):
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        self._frames_sub = self._sensors_sub = None
        await self.outbox.flush()
        if len(self.tracker) and drain_timeout_s > 0:
            self._all_ended.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_timeout_s):
                    await self._all_ended.wait()
        await self._life.close()
        if self.journal is not None:
            with contextlib.suppress(Exception):  # the bus may be gone; the journal is behind
                await self.journal.flush()
        log.info("coordinator.stopped", **self.stats())

    async def __aenter__(self) -> Coordinator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # Frames and chunks -> windows -----------------------------------------------------------
    async def _liveness_step(self) -> None:
        await asyncio.sleep(self.settings.liveness_interval_s)
        await self.intake.check_liveness()

    async def _on_window(self, cut: CutWindow, msg: Message | None, plan: Plan) -> None:
        if plan.overflow == "block" and (
            self._held.get(cut.stream) or self.tracker.open_in(cut.stream) >= plan.max_inflight
        ):
            await self._hold(cut, msg, plan)
            return
        await self._admit(cut, msg, plan)

    async def _hold(self, cut: CutWindow, msg: Message | None, plan: Plan) -> None:
        """Keep a window until its stream has room; its producer's reply waits with it."""
        held = self._held.setdefault(cut.stream, deque())
        if len(held) >= plan.max_inflight:
            self.counts["rejected"] += 1
            if msg is not None:
                await self._reply(msg, b"rejected: over max_inflight and the hold queue is full")
            return
        self.counts["held"] += 1
        held.append((cut, msg))

    async def _release(self, stream: str) -> None:
        held = self._held.get(stream)
        plan = self.plans.for_stream(stream)
        while held and plan is not None and self.tracker.open_in(stream) < plan.max_inflight:
            cut, msg = held.popleft()
            await self._admit(cut, msg, plan)
        if held is not None and not held:
            del self._held[stream]

    async def _admit(self, cut: CutWindow, msg: Message | None, plan: Plan) -> None:
        started = time.perf_counter()
        try:
            opening, shed = self._open(cut, plan)
        except SchemaError as exc:
            if msg is not None:
                await self._dead_letter(msg, exc.reason, str(exc))
            else:
                log.warning("window.refused", stream=cut.stream, reason=exc.reason, error=str(exc))
            return
        if opening is not None:
            for subtask in opening.subtasks:
                await self.outbox.add(subtask.type, subtask)
        if msg is not None:
            await self._reply(msg, ACCEPTED)
        await self._publish_ended(shed)
        log.debug(
            "window.handled",
            stream=cut.stream,
            task_id=opening.task_id if opening else None,
            duration_ms=round((time.perf_counter() - started) * 1e3, 3),
            outcome="opened" if opening else "skipped",
        )

    def _open(self, cut: CutWindow, plan: Plan) -> tuple[Opening | None, list[Ended]]:
        """Open a task for the window; also returns the tasks that ended because of it."""
        if self.tracker.has_window(cut.stream, cut.window.t_start_ns):
            self.tracker.counts["duplicate_windows"] += 1
            return None, []
        specs = self._specs_for(plan, cut.sensors)
        if not specs:
            self.counts["unserved"] += 1
            log.warning("window.unserved", stream=cut.stream, reason="no agent type can serve it")
            return None, []
        required_missing = any(s.required and s.name in cut.missing for s in plan.sensors)
        opening = decompose(
            task_id=self._new_task_id(cut),
            stream=cut.stream,
            window=cut.window,
            sensors={}
            if required_missing
            else cut.sensors,  # a window missing a required sensor fails
            specs=specs,
            deadline_ms=plan.deadline_ms,
            now_ns=time.time_ns(),
        )
        ended = self.tracker.open(
            task_id=opening.task_id,
            stream=opening.stream,
            window=opening.window,
            expected=opening.expected,
            deadline_ns=opening.deadline_ns,
            ingest_ns=opening.ingest_ns,
            unavailable=opening.unavailable,
            missing_sensors=cut.missing,
            max_inflight=plan.max_inflight if plan.overflow == "drop_oldest" else None,
        )
        task = self.tracker.get(opening.task_id)
        if task is not None and self.journal is not None:
            self.journal.changed(task)
        return opening, ended

    def _new_task_id(self, cut: CutWindow) -> str:
        # Unique, not secret: this coordinator's random instance id and a counter (a random
        # draw per task would cost a system call on the hot path).
        self._task_serial += 1
        return f"{cut.stream}:{cut.window.t_start_ns}:{self.instance_id}{self._task_serial:x}"

    def _specs_for(self, plan: Plan, sensors: dict[str, np.ndarray]) -> list[SubtaskSpec]:
        specs = list(plan.subtasks)
        if plan.auto:
            listed = set(plan.types)
            shapes = {name: array.shape for name, array in sensors.items()}
            specs += [s for s in self.directory.feedable(shapes) if s.type not in listed]
        return specs

    async def _reply(self, msg: Message, answer: bytes) -> None:
        """Answer a producer that asked (published with a reply subject)."""
        if msg.reply and not msg.reply.startswith("$JS.ACK"):
            with contextlib.suppress(Exception):  # the producer may have given up
                await self.nc.publish(msg.reply, answer)

    # Discovery ------------------------------------------------------------------------------
    async def _discovery_step(self) -> None:
        found = await discover_agents(
            self.nc, prefix=self.subjects.prefix, timeout_s=self.settings.discovery_timeout_s
        )
        appeared, gone = self.directory.observe((info for info, _ in found), time.monotonic())
        for type_name in appeared:
            log.info("agent_type.appeared", type=type_name)
        for type_name in gone:
            log.info("agent_type.gone", type=type_name)
        await asyncio.sleep(self.settings.discovery_interval_s)

    # Results -> completion ------------------------------------------------------------------
    async def _results_step(self) -> None:
        assert self._puller is not None
        msgs = await self._puller.next_batch(self.settings.results_batch, idle_timeout_s=1.0)
        ended: list[Ended] = []
        for msg in msgs:
            try:
                answered = _answered(msg.data)
            except SchemaError as exc:
                await self._dead_letter(msg, exc.reason, str(exc))
                continue
            for task_id, type_name in answered:
                seen, closed = self.tracker.record(task_id, type_name)
                if closed is not None:
                    ended.append(closed)
                elif seen is Seen.NEW and self.journal is not None:
                    task = self.tracker.get(task_id)
                    if task is not None:
                        self.journal.changed(task)
                elif seen is not Seen.NEW:
                    log.debug("result.ignored", task_id=task_id, type=type_name, outcome=seen.value)
            await msg.ack()
        await self._publish_ended(ended)

    async def _deadline_step(self) -> None:
        nap_s = self.settings.max_deadline_sleep_ms / 1e3
        next_ns = self.tracker.next_deadline_ns()
        delay = nap_s if next_ns is None else min(nap_s, max(0.0, (next_ns - time.time_ns()) / 1e9))
        await asyncio.sleep(delay)
        await self._publish_ended(self.tracker.expire(time.time_ns()))

    async def _publish_ended(self, ended: list[Ended]) -> None:
        streams = set()
        for task in ended:
            streams.add(task.stream)
            if self.journal is not None:
                self.journal.ended(task.task_id)
            if task.state == "complete":
                log.debug("task.complete", task_id=task.task_id, stream=task.stream)
                continue
            await self.producer.status(
                TaskStatus(
                    task_id=task.task_id,
                    stream=task.stream,
                    state=task.state,
                    missing=task.missing,
                    reason=task.reason,
                    window=task.window,
                    expected=task.expected,
                    ingest_ns=task.ingest_ns,
                    missing_sensors=task.missing_sensors,
                )
            )
            log.info(
                "task.ended",
                task_id=task.task_id,
                stream=task.stream,
                state=task.state,
                missing=list(task.missing),
                missing_sensors=list(task.missing_sensors),
                reason=task.reason,
            )
        for stream in streams & set(self._held):
            await self._release(stream)
        if not len(self.tracker):
            self._all_ended.set()

    # Durability -----------------------------------------------------------------------------
    async def _restore(self) -> None:
        assert self.journal is not None
        records = await self.journal.load()
        ended: list[Ended] = []
        for record in records:
            ended += self.tracker.restore(record)
        await self._publish_ended(ended)
        if records:
            log.info("coordinator.restored", tasks=len(records), still_open=len(self.tracker))

    async def _journal_step(self) -> None:
        assert self.journal is not None
        await asyncio.sleep(self.settings.journal_interval_ms / 1e3)
        await self.journal.flush()

    async def _dead_letter(self, msg: Message, reason: str, error: str) -> None:
        self.counts["dead_letters"] += 1
        await self.producer.dead_letter(
            component=COMPONENT,
            subject=msg.subject,
            data=msg.data,
            reason=reason,
            error=error,
            headers=msg.headers,
        )
        if msg.reply and msg.reply.startswith("$JS.ACK"):
            await msg.term()
        else:
            await self._reply(msg, f"rejected: {reason}".encode())


def _answered(data: bytes) -> list[tuple[str, str]]:
    """The (task id, type) pairs a result message answers.

    Raises:
        SchemaError: it is not a result or a result batch.
    """
    message = CODEC.decode_any(data)
    if isinstance(message, ResultBatch):
        return [(task_id, message.type) for task_id in message.task_ids]
    if isinstance(message, Result):
        return [(message.task_id, message.type)]
    raise SchemaError("wrong_kind", f"{type(message).__name__} is not a result")
