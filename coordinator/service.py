"""The coordinator service: frames in, subtasks out, every task tracked to its end.

A thin async shell around :class:`~coordinator.tracker.TaskTracker`: it decodes frames,
applies the stream's plan, publishes one subtask per type, feeds results to the tracker and
publishes a ``partial`` or ``failed`` status for every task that ends without all results.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus import (
    BatchPuller,
    Lifecycle,
    Producer,
    Subjects,
    TopologySettings,
    discover_agents,
    ensure_reader_consumer,
    ensure_streams,
)
from bus.discovery import PREFIX, ROLE
from coordinator.directory import AgentDirectory
from coordinator.plan import Plan, PlanBook, SubtaskSpec
from coordinator.tracker import Ended, Seen, TaskTracker
from schemas import (
    CODEC,
    Result,
    SchemaError,
    SensorFrame,
    Subtask,
    TaskStatus,
    Window,
)

log = structlog.get_logger("fusebus.coordinator")

COMPONENT = "coordinator"


@dataclass(frozen=True)
class CoordinatorSettings:
    """Timings of the coordinator's loops."""

    max_deadline_sleep_ms: float = 50.0  # longest nap between two deadline checks
    results_batch: int = 512
    discovery_interval_s: float = 0.5  # how often auto plans look for agent types
    discovery_timeout_s: float = 0.25  # how long one look waits for replies
    forget_type_after_s: float = 1.5  # a type unseen this long is no longer expected


class Coordinator:
    """Decomposes frames into subtasks and tracks every task until it ends.

    Use :meth:`start` then :meth:`stop`, or ``async with``.
    """

    def __init__(
        self,
        nc: Client,
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
        self.tracker = TaskTracker()
        self.directory = AgentDirectory(forget_after_s=self.settings.forget_type_after_s)
        self.unserved = 0
        self.instance_id = secrets.token_hex(4)
        self.frames = 0
        self.dead_letters = 0
        self._frames_sub: Subscription | None = None
        self._puller: BatchPuller | None = None
        self._life = Lifecycle()

    def __repr__(self) -> str:
        return (
            f"Coordinator(frames={self.frames} dead_letters={self.dead_letters} {self.tracker!r})"
        )

    def stats(self) -> dict[str, Any]:
        """Counters for ``$SRV.STATS`` and the status endpoint."""
        return {
            "frames": self.frames,
            "dead_letters": self.dead_letters,
            "open_tasks": len(self.tracker),
            "unserved_frames": self.unserved,
            "agent_types": sorted(self.directory.types),
            **self.tracker.counts,
        }

    async def start(self) -> Coordinator:
        """Set up streams and consumers, then start taking frames and results."""
        js = self.nc.jetstream()
        await ensure_streams(js, self.subjects, self.topology)
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
        self._frames_sub = await self.nc.subscribe(
            self.subjects.all_frames(), cb=self._on_frame, pending_msgs_limit=100_000
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

    async def stop(self) -> None:
        """Stop taking frames, then stop the loops. Open tasks stay open in the tracker."""
        if self._frames_sub is not None:
            with contextlib.suppress(Exception):
                await self._frames_sub.unsubscribe()
            self._frames_sub = None
        await self._life.close()
        log.info("coordinator.stopped", **self.stats())

    async def __aenter__(self) -> Coordinator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # Frames -> subtasks ---------------------------------------------------------------------
    async def _on_frame(self, msg: Msg) -> None:
        started = time.perf_counter()
        self.frames += 1
        try:
            frame = CODEC.decode(msg.data, SensorFrame)
            stream = self.subjects.stream_of(msg.subject)
            if frame.stream != stream:
                raise SchemaError("stream_mismatch", f"frame for {frame.stream!r} on {msg.subject}")
            subtasks, ended = self._decompose(frame)
        except SchemaError as exc:
            await self._dead_letter(msg, exc.reason, str(exc))
            return
        if subtasks:
            await self.producer.subtasks(subtasks)
        await self._publish_ended(ended)
        log.debug(
            "frame.handled",
            stream=frame.stream,
            subtasks=len(subtasks),
            duration_ms=round((time.perf_counter() - started) * 1e3, 3),
            outcome="opened",
        )

    def _decompose(self, frame: SensorFrame) -> tuple[list[Subtask], list[Ended]]:
        plan = self.plans.for_stream(frame.stream)
        if plan is None:
            raise SchemaError("no_plan", f"no plan covers stream {frame.stream!r}")
        if not frame.sensors:
            raise SchemaError("bad_field", "frame carries no sensor")
        samples = next(iter(frame.sensors.values())).shape[0]
        window = Window(frame.t_ns, frame.t_ns + samples * frame.period_ns)
        if self.tracker.has_window(frame.stream, window.t_start_ns):
            self.tracker.counts["duplicate_windows"] += 1
            return [], []
        specs = self._specs_for(plan, frame)
        if not specs:
            self.unserved += 1
            log.warning("frame.unserved", stream=frame.stream, reason="no agent type can serve it")
            return [], []
        expected = tuple(spec.type for spec in specs)
        ingest_ns = time.time_ns()
        deadline_ns = ingest_ns + int(plan.deadline_ms * 1e6)
        task_id = f"{frame.stream}:{window.t_start_ns}:{secrets.token_hex(3)}"
        subtasks: list[Subtask] = []
        unavailable = set()
        for spec in specs:
            if any(sensor not in frame.sensors for sensor in spec.sensors):
                unavailable.add(spec.type)
                continue
            inputs = {i.sensor: i.select(frame.sensors[i.sensor]) for i in spec.inputs}
            subtasks.append(
                Subtask(
                    task_id=task_id,
                    stream=frame.stream,
                    type=spec.type,
                    window=window,
                    inputs=inputs,
                    deadline_ns=deadline_ns,
                    expected=expected,
                    ingest_ns=ingest_ns,
                )
            )
        ended = self.tracker.open(
            task_id=task_id,
            stream=frame.stream,
            window=window,
            expected=expected,
            deadline_ns=deadline_ns,
            ingest_ns=ingest_ns,
            unavailable=frozenset(unavailable),
            max_inflight=plan.max_inflight,
        )
        return subtasks, ended

    def _specs_for(self, plan: Plan, frame: SensorFrame) -> list[SubtaskSpec]:
        specs = list(plan.subtasks)
        if plan.auto:
            listed = set(plan.types)
            shapes = {name: array.shape for name, array in frame.sensors.items()}
            specs += [s for s in self.directory.feedable(shapes) if s.type not in listed]
        return specs

    # Discovery ----------------------------------------------------------------------------
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

    # Results -> completion -----------------------------------------------------------------
    async def _results_step(self) -> None:
        assert self._puller is not None
        msgs = await self._puller.next_batch(self.settings.results_batch, idle_timeout_s=1.0)
        ended: list[Ended] = []
        handled: list[Msg] = []
        for msg in msgs:
            try:
                result = CODEC.decode(msg.data, Result)
            except SchemaError as exc:
                await self._dead_letter(msg, exc.reason, str(exc))
                continue
            handled.append(msg)
            seen, closed = self.tracker.record(result.task_id, result.type)
            if seen is not Seen.NEW:
                log.debug(
                    "result.ignored", task_id=result.task_id, type=result.type, outcome=seen.value
                )
            if closed is not None:
                ended.append(closed)
        await self._publish_ended(ended)
        for msg in handled:
            await msg.ack()

    async def _deadline_step(self) -> None:
        nap_s = self.settings.max_deadline_sleep_ms / 1e3
        next_ns = self.tracker.next_deadline_ns()
        delay = nap_s if next_ns is None else min(nap_s, max(0.0, (next_ns - time.time_ns()) / 1e9))
        await asyncio.sleep(delay)
        await self._publish_ended(self.tracker.expire(time.time_ns()))

    async def _publish_ended(self, ended: list[Ended]) -> None:
        for task in ended:
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
                )
            )
            log.info(
                "task.ended",
                task_id=task.task_id,
                stream=task.stream,
                state=task.state,
                missing=list(task.missing),
                reason=task.reason,
            )

    async def _dead_letter(self, msg: Msg, reason: str, error: str) -> None:
        self.dead_letters += 1
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
