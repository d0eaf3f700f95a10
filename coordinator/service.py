"""The coordinator service: sensor data in, subtasks out, every task tracked to its end.

A thin async shell around pure parts: :func:`~coordinator.decompose.decompose` turns a window
into subtasks, :class:`~coordinator.tracker.TaskTracker` decides when each task ends, and
:class:`~coordinator.journal.TaskJournal` keeps the open ones durable so that a restarted
coordinator finishes what it had opened. Every task ends once: complete, or with a
``partial``/``failed`` status published at its deadline.

Nothing that reaches the server is lost to a coordinator that dies. Sensor chunks and frames
come through the ``<P>_INTAKE`` work queue, and results through a durable consumer; each is
acked only at the next *durability point*, once the subtasks it led to are stored and the
tasks it opened or changed are in the journal. A coordinator killed before that point is
given the same data again when it restarts, and, since task ids are the stream and the
window start, opens the same tasks, whose re-published subtasks the server deduplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, assert_never

import numpy as np
import structlog

from bus import (
    BatchPuller,
    Coalescer,
    Delivery,
    ExhaustedReaper,
    Inbound,
    LeaseKeeper,
    LeaseSettings,
    Lifecycle,
    PageLog,
    Producer,
    Subjects,
    TopologySettings,
    discover_agents,
    ensure_streams,
    resume_consumer,
    ticket_key,
)
from bus.discovery import PREFIX, ROLE
from bus.types import Connection, Subscription
from coordinator.decompose import Opening, decompose, stage_subtask, task_id_for
from coordinator.directory import AgentDirectory, chain_problems
from coordinator.intake import SensorIntake
from coordinator.journal import TaskJournal
from coordinator.plan import Plan, PlanBook, SubtaskSpec
from coordinator.tracker import Ended, Seen, TaskTracker
from coordinator.windows import CutWindow
from schemas import (
    CODEC,
    ConfigError,
    FusebusError,
    Result,
    ResultBatch,
    SensorChunk,
    SensorFrame,
    Subtask,
    TaskStatus,
    UnservedError,
)
from schemas.tickets import seal

log = structlog.get_logger("fusebus.coordinator")

COMPONENT = "coordinator"
ACCEPTED = b"accepted"


def decode_sensor_data(data: bytes) -> SensorChunk | SensorFrame:
    """A ``sensor_chunk`` or ``sensor_frame``; raises :class:`SchemaError`."""
    message: SensorChunk | SensorFrame = CODEC.decode_one_of(data, (SensorChunk, SensorFrame))
    return message


def decode_answers(data: bytes) -> Result | ResultBatch:
    """A ``result`` or ``result_batch``; raises :class:`SchemaError`."""
    message: Result | ResultBatch = CODEC.decode_one_of(data, (Result, ResultBatch))
    return message


@dataclass(frozen=True)
class CoordinatorSettings:
    """Timings of the coordinator's loops."""

    name: str = "main"  # names the journal; coordinators sharing a prefix need distinct names
    durable: bool = True  # journal open tasks so a restart finishes them
    durable_intake: bool = True  # take sensor data through the <P>_INTAKE stream
    journal_interval_ms: float = 50.0  # how long a change may wait before it is journalled
    max_deadline_sleep_ms: float = 50.0  # longest nap between two deadline checks
    results_batch: int = 512
    intake_batch: int = 1024  # sensor messages pulled at a time
    subtask_batch: int = 64  # most subtasks of a type in one message; 1: one per message
    discovery_interval_s: float = 0.5  # how often auto plans look for agent types
    discovery_timeout_s: float = 0.25  # how long one look waits for replies
    forget_type_after_s: float = 1.5  # a type unseen this long is no longer expected
    drain_timeout_s: float = 0.0  # on stop, how long open tasks may take to end
    liveness_interval_s: float = 0.25  # how often silent sensors are looked for
    forget_stream_after_s: float = 300.0  # a stream silent this long is forgotten
    confirm_timeout_s: float = 2.0  # longest wait at a durability point for subtask acks
    remember_ended_tasks: int = 20_000  # ended task ids kept to spot late results and repeats
    # With partitions > 1 (TopologySettings.partitions): a dead coordinator's partitions are
    # taken over about this long after its last lease renewal (renewed every third of it).
    lease_ttl_s: float = 6.0

    def __post_init__(self) -> None:
        if not self.journal_interval_ms > 0:
            raise ConfigError(f"journal_interval_ms must be > 0, got {self.journal_interval_ms}")
        if self.subtask_batch < 1:
            raise ConfigError(f"subtask_batch must be >= 1, got {self.subtask_batch}")


class Coordinator:
    """Decomposes sensor data into subtasks and tracks every task until it ends.

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
        self.sensor_inbound = Inbound(
            component=COMPONENT,
            producer=self.producer,
            decode=decode_sensor_data,
            max_deliver=self.topology.intake_max_deliver,
        )
        self.result_inbound = Inbound(
            component=COMPONENT,
            producer=self.producer,
            decode=decode_answers,
            max_deliver=self.topology.reader_max_deliver,
        )
        # A stage gathers other agents' answers: its subtask, and its journal record with
        # the rest of its task, must each fit in one message.
        self.tracker = TaskTracker(
            remember_ended=self.settings.remember_ended_tasks,
            max_stage_bytes=nc.max_payload // 4,
        )
        self.directory = AgentDirectory(forget_after_s=self.settings.forget_type_after_s)
        self.journal: TaskJournal | None = None
        self.instance_id = secrets.token_hex(4)
        self._key = b""  # the deployment's ticket key, read at start
        self.counts: dict[str, int] = dict.fromkeys(
            (
                "unserved",
                "windows_unserved",
                "held",
                "rejected",
                "windows_refused",
                "acked",
                "stages_published",
            ),
            0,
        )
        self.unserved: set[str] = set()  # listed types with no replica running
        self._chain_warnings: set[str] = set()
        self._pin_warnings: dict[tuple[str, str], str] = {}  # (type, pinned model) -> why
        self.intake = SensorIntake(
            plans=plans,
            subjects=subjects,
            producer=self.producer,
            on_window=self._on_window,
            on_consumed=self._consumed,
            forget_after_s=self.settings.forget_stream_after_s,
            readers=self.directory.by_type,
        )
        self._held: dict[str, deque[tuple[CutWindow, Delivery | None]]] = {}
        self._done: list[Delivery] = []  # handled; acked at the next durability point
        self._sensors_sub: Subscription | None = None
        self._frames_sub: Subscription | None = None
        self._intake_puller: BatchPuller | None = None
        self._all_ended = asyncio.Event()  # set whenever no task is open
        self._puller: BatchPuller | None = None
        self._life = Lifecycle()
        # With partitions > 1: the partitions this coordinator owns, each with its journal
        # and its own pullers and loops; which partition each stream id is in (the server
        # decides; learned from the subjects data is stored under, and from journals).
        self.leases: LeaseKeeper | None = None
        self.journals: dict[int, TaskJournal] = {}
        self._owned: dict[int, Lifecycle] = {}
        self._partition_of: dict[str, int] = {}
        self.member_id = f"{self.settings.name}-{self.instance_id}"
        # A partition given back makes its own durability point while the loop's may be
        # under way: journals are written by one of them at a time.
        self._durable_lock = asyncio.Lock()

    def __repr__(self) -> str:
        counts = " ".join(f"{k}={v}" for k, v in self.counts.items() if v)
        return f"Coordinator({self.settings.name} {counts} {self.tracker!r})"

    def stats(self) -> dict[str, Any]:
        """Counters for ``$SRV.STATS`` and the status endpoint."""
        sensors, results = self.sensor_inbound.counts, self.result_inbound.counts
        return {
            **self.counts,
            **self.intake.stats(),
            "dead_letters": sensors["dead_letters"] + results["dead_letters"],
            "naks": sensors["naks"] + results["naks"],
            "awaiting_ack": len(self._done),
            "open_tasks": len(self.tracker),
            "held_now": sum(len(q) for q in self._held.values()),
            "subtasks_refused": self.producer.refused,
            "subtasks_unconfirmed": self.producer.unconfirmed,
            "publish_retries": self.producer.retries,
            "agent_types": sorted(self.directory.types),
            "unserved_types": sorted(self.unserved),
            **self.tracker.counts,
            **self._partition_stats(),
        }

    def _partition_stats(self) -> dict[str, Any]:
        if self.topology.partitions == 1:
            return {}
        return {
            "member": self.member_id,
            "partitions_total": self.topology.partitions,
            "partitions": sorted(self._owned),
        }

    @property
    def owned_partitions(self) -> tuple[int, ...]:
        """The partitions this coordinator works on now (with partitions > 1)."""
        return tuple(sorted(self._owned))

    @property
    def partitioned(self) -> bool:
        """Whether the deployment's stream ids are split into partitions (leased)."""
        return self.topology.partitions > 1

    async def start(self) -> Coordinator:
        """Set up streams, finish what a previous run left open, then take data and results."""
        js = self.nc.jetstream()
        intake = self.settings.durable_intake
        if self.partitioned and not intake:
            raise ConfigError("partitions > 1 need durable intake: a partition is a consumer")
        await ensure_streams(js, self.subjects, self.topology, intake=intake)
        self._key = await ticket_key(js, self.subjects, self.topology)
        if self.partitioned:
            return await self._start_partitioned()
        if self.settings.durable:
            pages = PageLog(
                self.nc,
                stream=self.subjects.journal_stream,
                stream_subjects=self.subjects.all_journals(),
                subject=self.subjects.journal(self.settings.name),
                topology=self.topology,
            )
            await pages.ensure()
            self.journal = TaskJournal(pages)
            await self._restore(self.journal)
        self._life.run(self._durability_step, name="coordinator-durability")
        # What a previous run had not acked comes again at once, in order.
        await resume_consumer(
            js,
            self.subjects.results_stream,
            self.subjects.coordinator_consumer,
            [self.subjects.all_results()],
            ack_wait_s=self.topology.reader_ack_wait_s,
            max_deliver=self.topology.reader_max_deliver,
            max_ack_pending=50_000,
        )
        self._puller = await self._life.pull(
            self.nc,
            stream=self.subjects.results_stream,
            consumer=self.subjects.coordinator_consumer,
            prefetch=self.settings.results_batch,
        )
        await self._reap(self.subjects.results_stream, self.subjects.coordinator_consumer, False)
        self._life.run(self._results_step, name="coordinator-results")
        self._life.run(self._deadline_step, name="coordinator-deadlines")
        # Know the running types before the first window: auto plans take them, and a listed
        # type nobody serves is said at once rather than by every task waiting out its deadline.
        await self._discover()
        self._life.run(self._discovery_step, name="coordinator-discovery")
        self._life.run(self._liveness_step, name="coordinator-liveness")
        await self._start_intake()
        await self._register()
        log.info("coordinator.started", prefix=self.subjects.prefix, plans=repr(self.plans))
        return self

    async def _start_partitioned(self) -> Coordinator:
        """Start the shared loops, then take a fair share of the partitions through leases;
        each partition brings its journal, intake and results (see :meth:`_take_partition`)."""
        self._life.run(self._durability_step, name="coordinator-durability")
        self._life.run(self._deadline_step, name="coordinator-deadlines")
        await self._discover()
        self._life.run(self._discovery_step, name="coordinator-discovery")
        self._life.run(self._liveness_step, name="coordinator-liveness")
        self._life.run(self._keep_alive_step, name="coordinator-keep-alive")
        self.leases = await LeaseKeeper(
            self.nc,
            subjects=self.subjects,
            group=COMPONENT,
            member=self.member_id,
            partitions=self.topology.partitions,
            on_acquire=self._take_partition,
            on_release=self._give_partition,
            settings=LeaseSettings(ttl_s=self.settings.lease_ttl_s),
            topology=self.topology,
        ).start()
        await self._register()
        log.info(
            "coordinator.started",
            prefix=self.subjects.prefix,
            plans=repr(self.plans),
            member=self.member_id,
            partitions=sorted(self._owned),
        )
        return self

    async def _register(self) -> None:
        await self._life.register(
            self.nc,
            name="fusebus-coordinator",
            description="fusebus coordinator: windows, subtasks, completion tracking",
            metadata={ROLE: COMPONENT, PREFIX: self.subjects.prefix},
            status_subject=self.subjects.control(COMPONENT, self.instance_id),
            stats=self.stats,
        )

    async def _take_partition(self, partition: int) -> None:
        """This coordinator now holds ``partition``'s lease: finish what its journal holds
        open, then pull its sensor data and results, delivering at once what the previous
        owner had not acked."""
        js = self.nc.jetstream()
        work = Lifecycle()
        if self.settings.durable:
            pages = PageLog(
                self.nc,
                stream=self.subjects.journal_stream,
                stream_subjects=self.subjects.all_journals(),
                subject=self.subjects.partition_journal(partition),
                topology=self.topology,
            )
            await pages.ensure()
            journal = self.journals[partition] = TaskJournal(pages)
            await self._restore(journal, partition)
        sources = (
            (
                self.subjects.results_stream,
                self.subjects.coordinator_partition_consumer(partition),
                [self.subjects.results_in(partition)],
            ),
            (
                self.subjects.intake_stream,
                self.subjects.intake_partition_consumer(partition),
                [self.subjects.sensors_in(partition)],
            ),
            (
                self.subjects.frames_stream,
                self.subjects.frames_partition_consumer(partition),
                [self.subjects.frames_in(partition)],
            ),
        )
        for stream, consumer, filters in sources:
            results = stream == self.subjects.results_stream
            await resume_consumer(
                js,
                stream,
                consumer,
                filters,
                ack_wait_s=self.topology.reader_ack_wait_s
                if results
                else self.topology.intake_ack_wait_s,
                max_deliver=self.topology.reader_max_deliver
                if results
                else self.topology.intake_max_deliver,
                max_ack_pending=50_000 if results else self.topology.intake_max_ack_pending,
                work_queue=not results,
            )
            puller = await work.pull(
                self.nc,
                stream=stream,
                consumer=consumer,
                prefetch=self.settings.results_batch if results else self.settings.intake_batch,
            )
            reaper = ExhaustedReaper(
                self.producer,
                stream=stream,
                consumer=consumer,
                component=COMPONENT,
                delete=not results,
            )
            work.adopt(await reaper.start(self.nc))
            if results:
                work.run(functools.partial(self._take_results, puller), name=f"results-{partition}")
            else:
                step = functools.partial(self._take_intake, puller, partition)
                work.run(step, name=f"intake-{partition}")
        self._owned[partition] = work

    async def _give_partition(self, partition: int) -> None:
        """Stop working on ``partition`` before its lease is given back: stop pulling, make
        what was handled durable (journal, acks), then forget its streams and open tasks,
        which the next owner restores from the partition's journal."""
        work = self._owned.pop(partition, None)
        if work is None:
            return
        await work.close()  # buffered, unhandled messages are nak'd for the next owner
        with contextlib.suppress(Exception):  # if the bus is gone, the next owner redoes it
            await self._durability_point()
        streams = {s for s, p in self._partition_of.items() if p == partition}
        handed = 0
        for stream in streams:
            handed += len(self.tracker.hand_over(stream))
            self._held.pop(stream, None)
            del self._partition_of[stream]
        self.intake.hand_over(streams)
        self.journals.pop(partition, None)
        log.info("partition.handed_over", partition=partition, streams=len(streams), tasks=handed)
        if not len(self.tracker):
            self._all_ended.set()

    async def _take_intake(self, puller: BatchPuller, partition: int) -> None:
        """Take a batch of one partition's sensor data."""
        msgs = await puller.next_batch(self.settings.intake_batch, idle_timeout_s=1.0)
        inbound = self.sensor_inbound
        for delivery, message in await inbound.take(msgs):
            self._partition_of[message.stream] = partition
            await inbound.run((delivery,), self._take_sensor_data(message, delivery))

    def _journal_for(self, stream: str) -> TaskJournal | None:
        """The journal a stream's tasks are written to: the coordinator's own, or with
        partitions that of the stream's partition."""
        if not self.partitioned:
            return self.journal
        partition = self._partition_of.get(stream)
        return self.journals.get(partition) if partition is not None else None

    async def _start_intake(self) -> None:
        """Take sensor data from the intake stream (or, without durable intake, core NATS)."""
        if not self.settings.durable_intake:
            on_msg = self.sensor_inbound.callback(self._take_sensor_data)
            self._frames_sub = await self.nc.subscribe(
                self.subjects.all_frames(), cb=on_msg, pending_msgs_limit=100_000
            )
            self._sensors_sub = await self.nc.subscribe(
                self.subjects.all_sensors(), cb=on_msg, pending_msgs_limit=1_000_000
            )
            return
        consumer = self.subjects.intake_consumer(self.settings.name)
        await resume_consumer(
            self.nc.jetstream(),
            self.subjects.intake_stream,
            consumer,
            [self.subjects.all_sensors(), self.subjects.all_frames()],
            ack_wait_s=self.topology.intake_ack_wait_s,
            max_deliver=self.topology.intake_max_deliver,
            max_ack_pending=self.topology.intake_max_ack_pending,
            work_queue=True,
        )
        self._intake_puller = await self._life.pull(
            self.nc,
            stream=self.subjects.intake_stream,
            consumer=consumer,
            prefetch=self.settings.intake_batch,
        )
        await self._reap(self.subjects.intake_stream, consumer, True)
        self._life.run(self._intake_step, name="coordinator-intake")
        self._life.run(self._keep_alive_step, name="coordinator-keep-alive")

    async def _reap(self, stream: str, consumer: str, delete: bool) -> None:
        reaper = ExhaustedReaper(
            self.producer, stream=stream, consumer=consumer, component=COMPONENT, delete=delete
        )
        self._life.adopt(await reaper.start(self.nc))

    async def stop(self, *, drain_timeout_s: float | None = None) -> None:
        """Stop taking sensor data; let open tasks end for up to ``drain_timeout_s`` (default:
        the settings'; tasks end at their deadlines at the latest); then stop. Tasks still
        open stay in the journal for the next run, and data not yet consumed is left unacked
        in the intake stream for it."""
        if drain_timeout_s is None:
            drain_timeout_s = self.settings.drain_timeout_s
        if self.leases is not None:
            # Each partition is made durable and handed over: the others take it at once.
            leases, self.leases = self.leases, None
            with contextlib.suppress(Exception):
                await leases.stop()
        for sub in (self._frames_sub, self._sensors_sub):
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        self._frames_sub = self._sensors_sub = None
        if self._intake_puller is not None:
            puller, self._intake_puller = self._intake_puller, None
            await puller.stop()
        await self.outbox.flush()
        if len(self.tracker) and drain_timeout_s > 0:
            self._all_ended.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_timeout_s):
                    await self._all_ended.wait()
        await self._life.close()
        with contextlib.suppress(Exception):  # the bus may be gone; the journal is behind
            await self._durability_point()
        await self.producer.close()
        log.info("coordinator.stopped", **self.stats())

    async def __aenter__(self) -> Coordinator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # Sensor data -> windows ---------------------------------------------------------------
    async def _intake_step(self) -> None:
        puller = self._intake_puller
        if puller is None:
            await asyncio.sleep(0.1)
            return
        msgs = await puller.next_batch(self.settings.intake_batch, idle_timeout_s=1.0)
        inbound = self.sensor_inbound
        for delivery, message in await inbound.take(msgs):
            await inbound.run((delivery,), self._take_sensor_data(message, delivery))

    async def _take_sensor_data(
        self, message: SensorChunk | SensorFrame, delivery: Delivery
    ) -> None:
        if self.topology.record_sensors:
            published = self.subjects.as_published(delivery.subject)
            await self.nc.publish(self.subjects.recorded(published), delivery.data)
        await self.intake.take(message, delivery)

    async def _keep_alive_step(self) -> None:
        wait_s = self.topology.intake_ack_wait_s / 3
        await asyncio.sleep(wait_s)
        await self.intake.keep_alive(wait_s)
        for held in list(self._held.values()):
            for _, delivery in list(held):  # a release may change the queue while we await
                if delivery is not None:
                    await delivery.in_progress()

    def _consumed(self, deliveries: list[Delivery]) -> None:
        """``deliveries`` need nothing more: ack them at the next durability point."""
        self._done.extend(deliveries)

    async def _liveness_step(self) -> None:
        await asyncio.sleep(self.settings.liveness_interval_s)
        await self.intake.check_liveness()

    async def _on_window(self, cut: CutWindow, frame: Delivery | None, plan: Plan) -> None:
        """A window was cut (from chunks, or ``frame``): open its task, or hold it."""
        if plan.overflow == "block" and (
            self._held.get(cut.stream) or self.tracker.open_in(cut.stream) >= plan.max_inflight
        ):
            await self._hold(cut, frame, plan)
            return
        await self._admit(cut, frame, plan)

    async def _hold(self, cut: CutWindow, frame: Delivery | None, plan: Plan) -> None:
        """Keep a window until its stream has room; its producer's reply waits with it."""
        held = self._held.setdefault(cut.stream, deque())
        if len(held) >= plan.max_inflight:
            self.counts["rejected"] += 1
            if frame is not None:
                await frame.answer(b"rejected: over max_inflight and the hold queue is full")
                self._consumed([frame])
            return
        self.counts["held"] += 1
        held.append((cut, frame))

    async def _release(self, stream: str) -> None:
        held = self._held.get(stream)
        plan = self.plans.for_stream(stream)
        while held and plan is not None and self.tracker.open_in(stream) < plan.max_inflight:
            cut, frame = held.popleft()
            await self._admit(cut, frame, plan)
        # Admitting awaits, so another release of this stream may have run meanwhile: drop
        # the queue only if it is still this one and empty (a window held since is kept).
        if held is not None and not held and self._held.get(stream) is held:
            del self._held[stream]

    async def _admit(self, cut: CutWindow, frame: Delivery | None, plan: Plan) -> None:
        started = time.perf_counter()
        task_id = task_id_for(cut.stream, cut.window)
        if self.tracker.known(task_id):
            # The window is open or decided already: a producer that sent it twice, or data
            # given again after a restart (which looks the same), so it is not dead-lettered.
            self.tracker.counts["duplicate_windows"] += 1
            if frame is not None:
                await frame.answer(
                    f"rejected: duplicate_window: stream {cut.stream!r} already has the window "
                    f"at t_ns {cut.window.t_start_ns}".encode()
                )
                self._consumed([frame])
            return
        try:
            opening, shed = self._open(task_id, cut, plan)
        except FusebusError as exc:
            self.counts["windows_refused"] += 1
            if frame is not None:
                await self.sensor_inbound.dead_letter(frame, exc.reason, str(exc))
            else:
                log.warning("window.refused", stream=cut.stream, reason=exc.reason, error=str(exc))
            return
        for subtask in opening.subtasks:
            if subtask.type in self.unserved:
                self.counts["unserved"] += 1
            await self.outbox.add(subtask.type, subtask)
        await self._publish_ready()
        if frame is not None:
            await frame.answer(ACCEPTED)
            self._consumed([frame])
        await self._publish_ended(shed)
        log.debug(
            "window.handled",
            stream=cut.stream,
            task_id=opening.task.task_id,
            duration_ms=round((time.perf_counter() - started) * 1e3, 3),
        )

    def _open(self, task_id: str, cut: CutWindow, plan: Plan) -> tuple[Opening, list[Ended]]:
        """Open a task for the window; also returns the tasks that ended because of it.

        Raises:
            UnservedError: no running agent type can read the window's data.
            SchemaError: a sensor's data cannot be sliced as the plan says.
        """
        specs = self._specs_for(plan, cut.sensors)
        if not specs:
            self.counts["windows_unserved"] += 1
            raise UnservedError(f"stream {cut.stream!r}: no running agent type can read its data")
        required_missing = any(s.required and s.name in cut.missing for s in plan.sensors)
        opening = decompose(
            task_id=task_id,
            stream=cut.stream,
            window=cut.window,
            # A window missing a required sensor fails.
            sensors={} if required_missing else cut.sensors,
            specs=specs,
            deadline_ms=plan.deadline_ms,
            now_ns=time.time_ns(),
            key=self._key,
            fuse=plan.fuse,
            not_awaited=frozenset(self.unserved),
        )
        ended = self.tracker.open(
            opening.task,
            unavailable=opening.unavailable,
            missing_sensors=cut.missing,
            max_inflight=plan.max_inflight if plan.overflow == "drop_oldest" else None,
            stages=opening.stages,
            waiting=opening.waiting,
        )
        entry = self.tracker.get(task_id)
        journal = self._journal_for(cut.stream)
        if entry is not None and journal is not None:
            journal.changed(entry)
        return opening, ended

    def _specs_for(self, plan: Plan, sensors: dict[str, np.ndarray]) -> list[SubtaskSpec]:
        specs = list(plan.subtasks)
        if plan.auto:
            listed = set(plan.types)
            shapes = {name: array.shape for name, array in sensors.items()}
            read = {u for spec in plan.subtasks for u in spec.upstream}
            specs += [
                s
                for s in self.directory.feedable(shapes, also=listed, read=read)
                if s.type not in listed
            ]
        return specs

    # Discovery ------------------------------------------------------------------------------
    async def _discovery_step(self) -> None:
        await asyncio.sleep(self.settings.discovery_interval_s)
        await self._discover()

    async def _discover(self) -> None:
        found = await discover_agents(
            self.nc, prefix=self.subjects.prefix, timeout_s=self.settings.discovery_timeout_s
        )
        appeared, gone = self.directory.observe((info for info, _ in found), time.monotonic())
        for type_name in appeared:
            log.info("agent_type.appeared", type=type_name)
        for type_name in gone:
            log.info("agent_type.gone", type=type_name)
        unserved = {t for t in self.plans.listed_types if t not in self.directory}
        for type_name in sorted(unserved - self.unserved):
            log.warning(
                "plan.type_unserved",
                type=type_name,
                hint="no agent replica serves this type: its subtasks wait out their deadline "
                "until one starts (is the type's name right?)",
            )
        for type_name in sorted(self.unserved - unserved):
            log.info("plan.type_served", type=type_name)
        self.unserved = unserved
        if appeared and self.plans.any_chained:
            self._check_chains()
        self._check_pins()

    def _check_pins(self) -> None:
        """Say when a model a plan pins is held by no replica of its type, or by only some
        (and when that is mended): its subtasks would otherwise fail one by one."""
        for plan in self.plans.all():
            for spec in plan.subtasks:
                known = self.directory.by_type.get(spec.type) if spec.model else None
                if known is None:
                    continue  # no pin, or no replica at all: plan.type_unserved says so
                key = (spec.type, spec.model)
                problem = known.pin_problem(spec.model)
                if problem and self._pin_warnings.get(key) != problem:
                    log.warning(
                        "plan.pin_unserved", type=spec.type, model=spec.model, problem=problem
                    )
                    self._pin_warnings[key] = problem
                elif not problem and key in self._pin_warnings:
                    del self._pin_warnings[key]
                    log.info("plan.pin_served", type=spec.type, model=spec.model)

    def _check_chains(self) -> None:
        """Say once, when a type appears, what its card makes impossible in a chain: its
        subtasks would otherwise fail one by one with input mismatches."""
        for plan in self.plans.all():
            for problem in chain_problems(plan.subtasks, plan.fused, self.directory.by_type):
                if problem not in self._chain_warnings:
                    self._chain_warnings.add(problem)
                    log.warning("plan.chain_mismatch", problem=problem)

    # Results -> completion ------------------------------------------------------------------
    async def _results_step(self) -> None:
        assert self._puller is not None
        await self._take_results(self._puller)

    async def _take_results(self, puller: BatchPuller) -> None:
        """Take a batch of results: each marks its type done in its task."""
        msgs = await puller.next_batch(self.settings.results_batch, idle_timeout_s=1.0)
        ended: list[Ended] = []
        for delivery, message in await self.result_inbound.take(msgs):
            match message:
                case ResultBatch():
                    outputs: Any = message.outputs  # one row per task
                    answered = list(zip(message.task_ids, outputs, strict=True))
                    error = False
                case Result():
                    output = message.output
                    error = message.error is not None or output is None or output.ndim < 1
                    answered = [(message.task_id, None if error else output)]
                case _:
                    assert_never(message)
            for task_id, output in answered:
                type_name = message.type
                seen, closed = self.tracker.record(task_id, type_name, error=error, output=output)
                if closed is not None:
                    ended.append(closed)
                elif seen is Seen.NEW:
                    entry = self.tracker.get(task_id)
                    journal = self._journal_for(entry.task.stream) if entry is not None else None
                    if entry is not None and journal is not None:
                        journal.changed(entry)
                else:
                    log.debug("result.ignored", task_id=task_id, type=type_name, outcome=seen.value)
            self._done.append(delivery)
        await self._publish_ready()
        await self._publish_ended(ended)

    async def _publish_ready(self) -> None:
        """Publish the stages whose upstream answers are all in (batched by type in the
        outbox like any subtask), sealed like the rest of their task."""
        for ready in self.tracker.take_ready():
            if ready.type in self.unserved:
                self.counts["unserved"] += 1
            self.counts["stages_published"] += 1
            ticket = seal(self._key, ready.task)
            # Upstream answers come in any order: inputs in one order make stages of one
            # shape one batch (the outbox batches by input names and shapes, in order).
            inputs = dict(sorted(ready.inputs.items()))
            plan = self.plans.for_stream(ready.task.stream)
            spec = next((s for s in plan.subtasks if s.type == ready.type), None) if plan else None
            subtask = stage_subtask(
                ready.task, ready.type, inputs, ticket, pin=spec.model if spec else ""
            )
            await self.outbox.add(ready.type, subtask)

    async def _deadline_step(self) -> None:
        nap_s = self.settings.max_deadline_sleep_ms / 1e3
        next_ns = self.tracker.next_deadline_ns()
        delay = nap_s if next_ns is None else min(nap_s, max(0.0, (next_ns - time.time_ns()) / 1e9))
        await asyncio.sleep(delay)
        await self._publish_ended(self.tracker.expire(time.time_ns()))

    async def _publish_ended(self, ended: list[Ended]) -> None:
        streams = set()
        for end in ended:
            task = end.task
            streams.add(task.stream)
            journal = self._journal_for(task.stream)
            if journal is not None:
                journal.ended(task.task_id)
            if end.state == "complete":
                log.debug("task.complete", task_id=task.task_id, stream=task.stream)
                continue
            await self.producer.status(
                TaskStatus.of(
                    task,
                    state=end.state,
                    missing=end.missing,
                    reason=end.reason,
                    missing_sensors=end.missing_sensors,
                    ticket=seal(self._key, task),  # sealed like its subtasks
                    missing_reasons=end.missing_reasons,
                )
            )
            log.info(
                "task.ended",
                task_id=task.task_id,
                stream=task.stream,
                state=end.state,
                missing=list(end.missing),
                missing_sensors=list(end.missing_sensors),
                reason=end.reason,
                why=end.missing_reasons,
            )
        for stream in streams & set(self._held):
            await self._release(stream)
        if not len(self.tracker):
            self._all_ended.set()

    # Durability -----------------------------------------------------------------------------
    async def _restore(self, journal: TaskJournal, partition: int | None = None) -> None:
        """Finish what ``journal`` (the coordinator's, or a ``partition``'s) left open."""
        records, cursors = await journal.load()
        if partition is not None:
            for stream in [*cursors, *(record.stream for record in records)]:
                self._partition_of[stream] = partition
        self.intake.resume(cursors)
        ended: list[Ended] = []
        for record in records:
            ended += self.tracker.restore(record)
            entry = self.tracker.get(record.task_id)
            if record.pending and entry is not None:
                journal.changed(entry)  # stages it publishes now are no longer waiting
        await self._publish_ready()
        await self._publish_ended(ended)
        if records or cursors:
            log.info(
                "coordinator.restored",
                tasks=len(records),
                still_open=len(self.tracker),
                streams=len(cursors),
                **({"partition": partition} if partition is not None else {}),
            )

    async def _durability_step(self) -> None:
        await asyncio.sleep(self.settings.journal_interval_ms / 1e3)
        await self._durability_point()

    async def _flush_journals(self, cursors: dict[str, int], forgotten: tuple[str, ...]) -> None:
        """Write the journal (with partitions, each owned partition's) with its streams'
        moved ``cursors`` and ``forgotten`` streams."""
        if self.journal is not None:
            await self.journal.flush(cursors, forgotten)
            return
        for partition, journal in list(self.journals.items()):
            mine = {s for s, p in self._partition_of.items() if p == partition}
            await journal.flush(
                {s: c for s, c in cursors.items() if s in mine},
                tuple(s for s in forgotten if s in mine),
            )

    async def _durability_point(self) -> None:
        """Ack what was handled once what it led to is stored: its subtasks and statuses
        acknowledged by the server, its tasks and the streams' cursors in the journal.
        What cannot be made durable now waits for the next point."""
        async with self._durable_lock:
            await self._make_durable()

    async def _make_durable(self) -> None:
        ready, self._done = self._done, []
        try:
            await self.outbox.flush()
            serial = self.producer.last_serial
            if self.journal is not None or self.journals:
                cursors, forgotten = self.intake.take_cursors()
                try:
                    await self._flush_journals(cursors, forgotten)
                except BaseException:
                    self.intake.give_back_cursors(cursors, forgotten)
                    raise
            confirmed = await self.producer.wait_confirmed(
                serial, timeout_s=self.settings.confirm_timeout_s
            )
        except BaseException:
            self._done[:0] = ready
            raise
        if not confirmed:
            self._done[:0] = ready
            log.warning("durability.waiting", unconfirmed=self.producer.unconfirmed)
            return
        for delivery in ready:
            await delivery.ack()
        self.counts["acked"] += len(ready)
