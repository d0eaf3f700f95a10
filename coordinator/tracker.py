"""The task tracker: a pure state machine deciding when each task is finished.

No asyncio, no NATS: the service feeds it events (open, result seen, time passes) and
publishes what it returns. Every task it opens ends exactly once, as ``complete`` (every
expected type answered), ``partial`` (some answered by the deadline) or ``failed`` (none).

A task's types may form a chain (see :class:`~coordinator.plan.StageInput`): the *expected*
types are the fused ones, and *stages* are types other types read. A type that reads others
waits, with its inputs so far, until every upstream it needs has answered; then it is
*ready* (:meth:`TaskTracker.take_ready`) and the service publishes it. One whose required
upstream cannot answer is never published: it is *blocked*, missing with the reason
``upstream: <type>``.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from schemas import OpenTaskRecord, PendingStage, Task, TaskState

#: The most bytes of stage outputs kept for answers that came before their task opened.
ORPHAN_OUTPUT_BYTES = 64 << 20


class Seen(Enum):
    """What a result meant to the tracker."""

    NEW = "new"  # counted toward its task
    REPEAT = "repeat"  # that type had already answered this task
    LATE = "late"  # the task had already ended
    UNKNOWN = "unknown"  # never opened here (or forgotten long ago)


@dataclass
class Waiting:
    """A type of an open task that waits for upstream answers, with its inputs so far."""

    after: tuple[str, ...]  # upstream types it needs
    optional: tuple[str, ...]  # upstream types it takes when they come
    inputs: dict[str, np.ndarray]  # sensor slices, then upstream outputs by type

    def reads(self, type_name: str) -> bool:
        """Whether this stage takes ``type_name``'s answer."""
        return type_name in self.after or type_name in self.optional


@dataclass(frozen=True)
class Ready:
    """A stage whose inputs are complete: the service publishes it as a subtask."""

    task: Task
    type: str
    inputs: dict[str, np.ndarray]


@dataclass
class OpenTask:
    """A task still waiting for results."""

    task: Task
    seen: set[str] = field(default_factory=set)
    unavailable: frozenset[str] = frozenset()  # types that were never published (no input)
    missing_sensors: tuple[str, ...] = ()
    errored: set[str] = field(default_factory=set)  # answered, with an error: no vote
    stages: frozenset[str] = frozenset()  # types read by other types, not fused
    waiting: dict[str, Waiting] = field(default_factory=dict)  # not yet published
    blocked: dict[str, str] = field(default_factory=dict)  # never published, and why

    @property
    def missing(self) -> tuple[str, ...]:
        """Expected types with no usable answer (none, or an error), in expected order."""
        return tuple(t for t in self.task.expected if t not in self.seen or t in self.errored)

    @property
    def settled(self) -> bool:
        """Every type that could answer has answered."""
        return all(
            t in self.seen or t in self.unavailable or t in self.blocked for t in self.task.expected
        )

    def has_type(self, type_name: str) -> bool:
        """Whether ``type_name`` is one of the task's types, fused or a stage."""
        return type_name in self.stages or type_name in self.task.expected

    def cannot_answer(self, type_name: str) -> bool:
        """Whether ``type_name`` has no usable answer for this task and never will."""
        return (
            type_name in self.errored
            or type_name in self.unavailable
            or type_name in self.blocked
            or not self.has_type(type_name)
        )

    def missing_reasons(self, end_reason: str) -> dict[str, str]:
        """Why each type (fused or a stage) with no usable answer has none."""
        reasons = {}
        for t in (*self.task.expected, *sorted(self.stages)):
            if t in self.seen and t not in self.errored:
                continue
            if t in self.blocked:
                reasons[t] = self.blocked[t]
            elif t in self.waiting:  # never published: what it waited for did not come
                stage = self.waiting[t]
                absent = [u for u in (*stage.after, *stage.optional) if u not in stage.inputs]
                reasons[t] = "upstream: " + ",".join(absent)
            elif t in self.unavailable:
                reasons[t] = "no input: " + (",".join(self.missing_sensors) or "sensor data")
            elif t in self.errored:
                reasons[t] = "error"
            else:
                reasons[t] = end_reason or "no answer"
        return reasons

    def advance(self, max_stage_bytes: int | None = None) -> list[Ready]:
        """Settle every waiting stage that can be: blocked when an upstream it needs cannot
        answer or its inputs outgrow ``max_stage_bytes``, ready when every upstream it needs
        has answered and every optional one has answered or cannot. Returns the ready ones,
        which are no longer waiting."""
        ready: list[Ready] = []
        changed = True
        while changed:
            changed = False
            for name, stage in list(self.waiting.items()):
                size = sum(a.nbytes for a in stage.inputs.values())
                if max_stage_bytes is not None and size > max_stage_bytes:
                    # Other agents' answers: more than one message (or journal page) holds.
                    del self.waiting[name]
                    self.blocked[name] = f"too_large: {size} bytes of inputs"
                    changed = True
                    continue
                failed = next((u for u in stage.after if self.cannot_answer(u)), None)
                if failed is None and all(u in stage.inputs for u in stage.after):
                    pending = [u for u in stage.optional if u not in stage.inputs]
                    if any(not self.cannot_answer(u) for u in pending):
                        continue  # an optional upstream may still come
                    if stage.inputs:
                        del self.waiting[name]
                        ready.append(Ready(self.task, name, stage.inputs))
                        continue
                    failed = ",".join(pending)
                elif failed is None:
                    continue
                del self.waiting[name]
                self.blocked[name] = f"upstream: {failed}"
                changed = True  # a blocked stage may block the stages that read it
        return ready

    def take_answer(self, type_name: str, output: np.ndarray | None) -> None:
        """Give ``type_name``'s output to every waiting stage that reads it."""
        if output is None:
            return
        for stage in self.waiting.values():
            if stage.reads(type_name):
                stage.inputs[type_name] = output


@dataclass(frozen=True)
class Ended:
    """A task that just ended, and how."""

    task: Task
    state: TaskState
    missing: tuple[str, ...]
    reason: str
    missing_sensors: tuple[str, ...] = ()
    missing_reasons: dict[str, str] = field(default_factory=dict)


class TaskTracker:
    """Tracks open tasks, their deadlines and the per-stream in-flight bound.

    Args:
        remember_ended: how many ended task ids to remember, so that a result arriving after
            its task ended is recognised as late rather than unknown, and a window given
            again is not opened twice.
        remember_orphans: how many tasks to remember answers for that arrive before their
            task is opened (after a restart, results may be redelivered before the sensor
            data that reopens their task).
        max_stage_bytes: the most input bytes a waiting stage may gather (its subtask and
            its journal record must each fit in one message); past it, it is blocked.
    """

    def __init__(
        self,
        *,
        remember_ended: int = 100_000,
        remember_orphans: int = 10_000,
        max_stage_bytes: int | None = None,
    ) -> None:
        self._max_stage_bytes = max_stage_bytes
        self._open: dict[str, OpenTask] = {}
        self._by_stream: dict[str, OrderedDict[str, None]] = {}
        self._windows: dict[tuple[str, int], str] = {}
        self._deadlines: list[tuple[int, str]] = []
        self._ended: OrderedDict[str, str] = OrderedDict()
        self._remember_ended = remember_ended
        # task id -> type -> (answered with an error, its output)
        self._orphans: OrderedDict[str, dict[str, tuple[bool, np.ndarray | None]]] = OrderedDict()
        self._remember_orphans = remember_orphans
        self._orphan_bytes = 0  # of the outputs kept with them, at most ORPHAN_OUTPUT_BYTES
        self._ready: list[Ready] = []
        self.counts: dict[str, int] = dict.fromkeys(
            (
                "opened",
                "restored",
                "complete",
                "partial",
                "failed",
                "shed",
                "repeat",
                "late",
                "unknown",
                "duplicate_windows",
            ),
            0,
        )

    def __repr__(self) -> str:
        counts = " ".join(f"{k}={v}" for k, v in self.counts.items() if v)
        return f"TaskTracker(open={len(self._open)} {counts})"

    # Queries ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._open)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._open

    def known(self, task_id: str) -> bool:
        """Whether ``task_id`` is open, or ended recently enough to be remembered."""
        return task_id in self._open or task_id in self._ended

    def get(self, task_id: str) -> OpenTask | None:
        """The open task with this id, if any."""
        return self._open.get(task_id)

    def open_in(self, stream: str) -> int:
        """How many tasks of ``stream`` are open."""
        return len(self._by_stream.get(stream, ()))

    def has_window(self, stream: str, t_start_ns: int) -> bool:
        """Whether a task for this window of this stream is open."""
        return (stream, t_start_ns) in self._windows

    def take_ready(self) -> list[Ready]:
        """The stages that became ready since the last call, to publish now."""
        ready, self._ready = self._ready, []
        return ready

    def next_deadline_ns(self) -> int | None:
        """The earliest deadline among open tasks."""
        while self._deadlines and self._deadlines[0][1] not in self._open:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    # Events -------------------------------------------------------------------------------
    def open(
        self,
        task: Task,
        *,
        unavailable: frozenset[str] = frozenset(),
        missing_sensors: tuple[str, ...] = (),
        max_inflight: int | None = None,
        stages: frozenset[str] = frozenset(),
        waiting: Iterable[PendingStage] = (),
        blocked: dict[str, str] | None = None,
    ) -> list[Ended]:
        """Open a task; returns the tasks this ends (shed ones, or itself if nothing can answer).

        ``stages`` are its types that other types read rather than fusion, and ``waiting``
        the types that wait for upstream answers, with their sensor inputs; those that can
        run at once are ready (:meth:`take_ready`).

        Raises:
            ValueError: the id is already open, or the task expects no type.
        """
        task_id, stream = task.task_id, task.stream
        if task_id in self._open or task_id in self._ended:
            raise ValueError(f"task {task_id!r} was already opened")
        if not task.expected:
            raise ValueError(f"task {task_id!r} expects no type")
        ended: list[Ended] = []
        if max_inflight is not None:
            while self.open_in(stream) >= max_inflight:
                oldest = next(iter(self._by_stream[stream]))
                self.counts["shed"] += 1
                ended.append(self._end(self._open[oldest], reason="shed: over max_inflight"))
        entry = OpenTask(
            task,
            unavailable=unavailable,
            missing_sensors=missing_sensors,
            stages=stages,
            waiting={p.type: Waiting(p.after, p.optional, dict(p.inputs)) for p in waiting},
            blocked=dict(blocked or {}),
        )
        for type_name, (error, output) in self._forget_orphan(task_id).items():
            if entry.has_type(type_name):
                entry.seen.add(type_name)
                if error:
                    entry.errored.add(type_name)
                entry.take_answer(type_name, output)
        self._ready += entry.advance(self._max_stage_bytes)
        self._open[task_id] = entry
        self._by_stream.setdefault(stream, OrderedDict())[task_id] = None
        self._windows[(stream, task.window.t_start_ns)] = task_id
        heapq.heappush(self._deadlines, (task.deadline_ns, task_id))
        self.counts["opened"] += 1
        if entry.settled:
            if entry.seen:
                ended.append(self._end(entry, reason=""))
            else:
                no_input = ",".join(sorted(missing_sensors) or sorted(unavailable))
                ended.append(self._end(entry, reason=f"no input: {no_input}"))
        return ended

    def restore(self, record: OpenTaskRecord) -> list[Ended]:
        """Reinstate a task opened before a restart, with the results it had; ends it at once
        if nothing more can come. A task already known here is left alone."""
        if self.known(record.task_id):
            return []
        ended = self.open(
            record.task,
            unavailable=frozenset(record.unavailable),
            missing_sensors=record.missing_sensors,
            stages=frozenset(record.stages),
            waiting=record.pending,
            blocked=record.blocked,
        )
        self.counts["opened"] -= 1
        self.counts["restored"] += 1
        entry = self._open.get(record.task_id)
        if entry is not None:
            entry.seen.update(t for t in record.seen if entry.has_type(t))
            entry.errored.update(t for t in record.errored if t in entry.seen)
            self._ready += entry.advance(self._max_stage_bytes)
            if entry.settled:
                ended.append(self._end(entry, reason="restored complete"))
        return ended

    def record(
        self,
        task_id: str,
        type_name: str,
        *,
        error: bool = False,
        output: np.ndarray | None = None,
    ) -> tuple[Seen, Ended | None]:
        """Note that ``type_name`` answered ``task_id`` (``error``: it could not, which ends
        its wait but leaves it missing) with ``output``, which the stages reading it are
        given; returns the task if that ended it. Stages it makes ready are queued for
        :meth:`take_ready`."""
        entry = self._open.get(task_id)
        if entry is None:
            seen = Seen.LATE if task_id in self._ended else Seen.UNKNOWN
            self.counts[seen.value] += 1
            if seen is Seen.UNKNOWN:
                self._keep_orphan(task_id, type_name, error, None if error else output)
            return seen, None
        if type_name in entry.seen or not entry.has_type(type_name):
            self.counts["repeat"] += 1
            return Seen.REPEAT, None
        entry.seen.add(type_name)
        if error:
            entry.errored.add(type_name)
        else:
            entry.take_answer(type_name, output)
        if entry.waiting:
            self._ready += entry.advance(self._max_stage_bytes)
        if entry.settled:
            return Seen.NEW, self._end(entry, reason="")
        return Seen.NEW, None

    def _keep_orphan(
        self, task_id: str, type_name: str, error: bool, output: np.ndarray | None
    ) -> None:
        """Remember an answer to a task not open here, with its output while the outputs
        kept stay within :data:`ORPHAN_OUTPUT_BYTES` (past it, the answer alone)."""
        answers = self._orphans.setdefault(task_id, {})
        self._orphans.move_to_end(task_id)
        if type_name not in answers:
            if output is not None and self._orphan_bytes + output.nbytes > ORPHAN_OUTPUT_BYTES:
                output = None
            self._orphan_bytes += output.nbytes if output is not None else 0
            answers[type_name] = (error, output)
        while len(self._orphans) > self._remember_orphans:
            self._forget_orphan(next(iter(self._orphans)))

    def _forget_orphan(self, task_id: str) -> dict[str, tuple[bool, np.ndarray | None]]:
        answers = self._orphans.pop(task_id, {})
        self._orphan_bytes -= sum(o.nbytes for _, o in answers.values() if o is not None)
        return answers

    def expire(self, now_ns: int) -> list[Ended]:
        """End every task whose deadline is at or before ``now_ns``."""
        ended = []
        while self._deadlines and self._deadlines[0][0] <= now_ns:
            _, task_id = heapq.heappop(self._deadlines)
            entry = self._open.get(task_id)
            if entry is not None:
                ended.append(self._end(entry, reason="deadline"))
        return ended

    def hand_over(self, stream: str) -> list[OpenTask]:
        """Forget ``stream``'s open tasks without ending them: another coordinator took the
        stream's partition over and ends them from the journal. Returns them."""
        given = [self._open.pop(task_id) for task_id in self._by_stream.pop(stream, {})]
        for entry in given:
            self._windows.pop((stream, entry.task.window.t_start_ns), None)
        return given

    def _end(self, entry: OpenTask, *, reason: str) -> Ended:
        task, missing = entry.task, entry.missing
        # Only fused answers make a task partial: a stage's features are no decision.
        answered = (entry.seen - entry.errored).intersection(task.expected)
        state: TaskState = "complete" if not missing else ("partial" if answered else "failed")
        del self._open[task.task_id]
        stream_tasks = self._by_stream[task.stream]
        del stream_tasks[task.task_id]
        if not stream_tasks:
            del self._by_stream[task.stream]
        self._windows.pop((task.stream, task.window.t_start_ns), None)
        self._ended[task.task_id] = state
        if len(self._ended) > self._remember_ended:
            self._ended.popitem(last=False)
        self.counts[state] += 1
        return Ended(
            task, state, missing, reason, entry.missing_sensors, entry.missing_reasons(reason)
        )
