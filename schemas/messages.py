"""Wire messages: frozen, tagged, versioned dataclasses.

Each top-level message has a ``KIND`` (its tag on the wire) and a ``VERSION``. Adding a field
needs a default so older senders stay readable; changing a field's meaning needs a new
``VERSION``. Times are integers in nanoseconds since the epoch (event time), durations are
named with their unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Literal, get_args

import numpy as np

from schemas.errors import SchemaError
from schemas.limits import LABEL, NAME, TASK_ID

#: A stream, sensor, type, agent or component name: checked at decode as one subject token.
Name = Annotated[str, NAME]
#: A task id: checked at decode like a name, with room for ``<stream>:<window start>``.
TaskId = Annotated[str, TASK_ID]
#: A label, model name or version: any text, bounded in length.
Label = Annotated[str, LABEL]

#: The final states a task can reach; every task the coordinator opens ends in one of them.
TaskState = Literal["complete", "partial", "failed"]
TASK_STATES: tuple[TaskState, ...] = get_args(TaskState)


@dataclass(frozen=True, slots=True)
class Window:
    """An event-time interval ``[t_start_ns, t_end_ns)``."""

    t_start_ns: int
    t_end_ns: int


@dataclass(frozen=True, slots=True)
class Task:
    """What every part of fusebus knows of one task: which window of which stream, the
    types it waits for, when the coordinator took its data in and when it is due.

    Not a wire message of its own: the messages that speak of a task carry these fields
    flat (``Subtask``, ``Result``, ``TaskStatus``...) and give them back as ``.task``.
    """

    task_id: str
    stream: str
    window: Window
    expected: tuple[str, ...]
    ingest_ns: int = 0  # wall clock, when the coordinator received the data
    deadline_ns: int = 0  # wall clock; 0 when unknown


@dataclass(frozen=True, slots=True)
class ModelRef:
    """Which model produced a result."""

    name: Label
    version: Label

    @property
    def label(self) -> str:
        """``name@version``, as decisions, statuses and logs name a model."""
        return f"{self.name}@{self.version}"


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """Why an agent could not answer: a stable ``code`` and a human ``text``."""

    code: Label
    text: str


@dataclass(frozen=True, slots=True)
class InputSpec:
    """One input an agent reads, by name: ``samples`` x ``channels`` from the sensor
    ``sensor`` (0 = any), or, with ``stage``, the output of the subtask type ``sensor`` for
    the same window, of per-row ``shape`` (a 0 axis is any size; ``()`` is any shape).
    An ``optional`` stage input may be absent: the agent runs without it (with ``auto``
    plans, the coordinator does not wait for it when it cannot come)."""

    sensor: Name
    samples: int = 0
    channels: int = 0
    stage: bool = False
    shape: tuple[int, ...] = ()
    optional: bool = False

    @property
    def name(self) -> str:
        """The input's name: the sensor's, or the upstream subtask type's."""
        return self.sensor


#: What a subtask type answers: class ``scores`` (one per label, fusable) or ``features``
#: (an array of a declared shape, read by other subtask types of the window).
OutputKind = Literal["scores", "features"]
OUTPUT_KINDS: tuple[OutputKind, ...] = get_args(OutputKind)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)  # arrays have no plain ==
class SensorChunk:
    """A run of samples from one sensor, starting at ``t0_ns``, ``period_ns`` apart."""

    KIND: ClassVar[str] = "sensor_chunk"
    VERSION: ClassVar[int] = 1

    stream: Name
    sensor: Name
    t0_ns: int
    period_ns: int
    samples: np.ndarray  # [n, channels]

    def __post_init__(self) -> None:
        _check_times("SensorChunk", self.t0_ns, self.period_ns, self.samples, period_needed=True)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)  # arrays have no plain ==
class SensorFrame:
    """A pre-aligned frame: every sensor's samples for one window starting at ``t_ns``."""

    KIND: ClassVar[str] = "sensor_frame"
    VERSION: ClassVar[int] = 1

    stream: Name
    t_ns: int
    sensors: dict[Name, np.ndarray]  # name -> [n, channels]
    period_ns: int = 0  # sample period; with n samples the window ends at t_ns + n * period_ns

    def __post_init__(self) -> None:
        for array in self.sensors.values():
            _check_times("SensorFrame", self.t_ns, self.period_ns, array, period_needed=False)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)  # arrays have no plain ==
class Subtask:
    """One piece of a task: the inputs one agent type needs for one window."""

    KIND: ClassVar[str] = "subtask"
    VERSION: ClassVar[int] = 1

    task_id: TaskId
    stream: Name
    type: Name
    window: Window
    inputs: dict[Name, np.ndarray]
    deadline_ns: int
    expected: tuple[Name, ...]  # every type the task waits for
    ingest_ns: int = 0  # when the coordinator received the data (wall clock)
    ticket: bytes = b""  # the coordinator's seal on the task (see schemas.tickets); copy it
    pin: Label = ""  # the model (registry name) the plan wants to answer; "" = the agent's choice

    @property
    def task(self) -> Task:
        """The task this subtask is a piece of."""
        return Task(
            self.task_id, self.stream, self.window, self.expected, self.ingest_ns, self.deadline_ns
        )


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)  # arrays have no plain ==
class Result:
    """An agent's answer to one subtask: class scores (one per label), features (an array
    of the agent's declared shape, with no labels), or an error."""

    KIND: ClassVar[str] = "result"
    VERSION: ClassVar[int] = 1

    task_id: TaskId
    stream: Name
    type: Name
    agent_id: Name
    model: ModelRef
    output: np.ndarray | None
    labels: tuple[Label, ...]  # names of the entries of ``output``
    latency_ms: float
    error: ErrorInfo | None = None
    window: Window = Window(0, 0)
    expected: tuple[Name, ...] = ()
    ingest_ns: int = 0
    weight: float = 1.0  # the agent's declared fusion weight, e.g. its validation accuracy
    deadline_ns: int = 0  # copied from the subtask
    ticket: bytes = b""  # copied from the subtask
    # Why ``model`` answered rather than the agent's preferred one: "" (it is the preferred
    # one), "deadline" or "backlog" (a faster model, so as to answer in time), "pinned"
    # (the plan names it), "canary" (the version on trial for a share of subtasks).
    selection: Label = ""

    @classmethod
    def of(
        cls,
        task: Task,
        *,
        type: str,
        agent_id: str,
        model: ModelRef,
        output: np.ndarray | None,
        labels: tuple[str, ...],
        latency_ms: float,
        weight: float,
        ticket: bytes,
        error: ErrorInfo | None = None,
        selection: str = "",
    ) -> Result:
        """An answer to ``task``, carrying its fields as the protocol says."""
        return cls(
            task_id=task.task_id,
            stream=task.stream,
            type=type,
            agent_id=agent_id,
            model=model,
            output=output,
            labels=labels,
            latency_ms=latency_ms,
            error=error,
            window=task.window,
            expected=task.expected,
            ingest_ns=task.ingest_ns,
            weight=weight,
            deadline_ns=task.deadline_ns,
            ticket=ticket,
            selection=selection,
        )

    @property
    def task(self) -> Task:
        """The task this result answers."""
        return Task(
            self.task_id, self.stream, self.window, self.expected, self.ingest_ns, self.deadline_ns
        )


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)  # arrays have no plain ==
class SubtaskBatch:
    """Subtasks of one type in one message, by column: row ``i`` of every field is subtask
    ``i``.

    The coordinator sends what is ready at the same moment this way, so that a busy
    pipeline pays the per-message costs (publish, store, deliver, ack, decode) once per
    batch rather than once per window, and an agent gets its model's input already stacked.
    Every subtask of a batch has inputs of the same names and shapes.
    """

    KIND: ClassVar[str] = "subtask_batch"
    VERSION: ClassVar[int] = 1

    type: Name
    task_ids: tuple[TaskId, ...]
    streams: tuple[Name, ...]
    windows: np.ndarray  # int64 [n, 2]: t_start_ns, t_end_ns
    inputs: dict[Name, np.ndarray]  # name -> [n, samples, channels]
    deadline_ns: np.ndarray  # int64 [n]
    expected: tuple[tuple[Name, ...], ...]
    ingest_ns: np.ndarray  # int64 [n]
    tickets: tuple[bytes, ...] = ()  # one per row, or none
    pins: tuple[Label, ...] = ()  # one per row (see ``Subtask.pin``), or none

    def __post_init__(self) -> None:
        n = len(self.task_ids)
        _check_rows(
            "SubtaskBatch",
            n,
            streams=len(self.streams) == n,
            tickets=len(self.tickets) in (0, n),
            pins=len(self.pins) in (0, n),
            expected=len(self.expected) == n,
            windows=self.windows.shape == (n, 2),
            deadline_ns=self.deadline_ns.shape == (n,),
            ingest_ns=self.ingest_ns.shape == (n,),
            **{f"inputs.{k}": v.ndim >= 1 and v.shape[0] == n for k, v in self.inputs.items()},
        )

    def __len__(self) -> int:
        return len(self.task_ids)

    @classmethod
    def of(cls, subtasks: list[Subtask]) -> SubtaskBatch:
        """Stack subtasks of one type whose inputs have the same names and shapes.

        Raises:
            SchemaError: they differ in type, input names or input shapes.
        """
        first = subtasks[0]
        shapes = {k: v.shape for k, v in first.inputs.items()}
        for s in subtasks:
            if s.type != first.type or {k: v.shape for k, v in s.inputs.items()} != shapes:
                raise SchemaError("bad_field", "a subtask batch needs one type and one input shape")
        return cls(
            type=first.type,
            task_ids=tuple(s.task_id for s in subtasks),
            streams=tuple(s.stream for s in subtasks),
            windows=np.array(
                [(s.window.t_start_ns, s.window.t_end_ns) for s in subtasks], np.int64
            ),
            inputs={k: np.stack([s.inputs[k] for s in subtasks]) for k in shapes},
            deadline_ns=np.array([s.deadline_ns for s in subtasks], np.int64),
            expected=tuple(s.expected for s in subtasks),
            ingest_ns=np.array([s.ingest_ns for s in subtasks], np.int64),
            tickets=tuple(s.ticket for s in subtasks) if any(s.ticket for s in subtasks) else (),
            pins=tuple(s.pin for s in subtasks) if any(s.pin for s in subtasks) else (),
        )

    def ticket(self, i: int) -> bytes:
        """Row ``i``'s ticket (empty when the batch carries none)."""
        return self.tickets[i] if self.tickets else b""

    def pin(self, i: int) -> str:
        """Row ``i``'s pinned model (empty when the batch carries none)."""
        return self.pins[i] if self.pins else ""

    def task(self, i: int) -> Task:
        """The task of row ``i``."""
        return Task(
            self.task_ids[i],
            self.streams[i],
            Window(int(self.windows[i, 0]), int(self.windows[i, 1])),
            self.expected[i],
            int(self.ingest_ns[i]),
            int(self.deadline_ns[i]),
        )

    def items(self) -> list[Subtask]:
        """The subtasks, one by one."""
        return [
            Subtask(
                task_id=task_id,
                stream=self.streams[i],
                type=self.type,
                window=Window(int(self.windows[i, 0]), int(self.windows[i, 1])),
                inputs={k: v[i] for k, v in self.inputs.items()},
                deadline_ns=int(self.deadline_ns[i]),
                expected=self.expected[i],
                ingest_ns=int(self.ingest_ns[i]),
                ticket=self.ticket(i),
                pin=self.pin(i),
            )
            for i, task_id in enumerate(self.task_ids)
        ]

    @classmethod
    def concat(cls, batches: list[SubtaskBatch]) -> SubtaskBatch:
        """One batch of every row of ``batches`` (of one type and input shape), in order."""
        if len(batches) == 1:
            return batches[0]
        return cls(
            type=batches[0].type,
            task_ids=tuple(t for b in batches for t in b.task_ids),
            streams=tuple(t for b in batches for t in b.streams),
            windows=np.concatenate([b.windows for b in batches]),
            inputs={k: np.concatenate([b.inputs[k] for b in batches]) for k in batches[0].inputs},
            deadline_ns=np.concatenate([b.deadline_ns for b in batches]),
            expected=tuple(e for b in batches for e in b.expected),
            ingest_ns=np.concatenate([b.ingest_ns for b in batches]),
            tickets=tuple(b.ticket(i) for b in batches for i in range(len(b)))
            if any(b.tickets for b in batches)
            else (),
            pins=tuple(b.pin(i) for b in batches for i in range(len(b)))
            if any(b.pins for b in batches)
            else (),
        )

    def select(self, rows: np.ndarray) -> SubtaskBatch:
        """The subtasks at ``rows`` (indexes, or a boolean mask), as a batch."""
        index = _row_index(rows)
        return SubtaskBatch(
            type=self.type,
            task_ids=tuple(self.task_ids[i] for i in index),
            streams=tuple(self.streams[i] for i in index),
            windows=self.windows[index],
            inputs={k: v[index] for k, v in self.inputs.items()},
            deadline_ns=self.deadline_ns[index],
            expected=tuple(self.expected[i] for i in index),
            ingest_ns=self.ingest_ns[index],
            tickets=tuple(self.tickets[i] for i in index) if self.tickets else (),
            pins=tuple(self.pins[i] for i in index) if self.pins else (),
        )


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)  # arrays have no plain ==
class ResultBatch:
    """One agent replica's answers to several subtasks of one stream, by column: row ``i``
    of ``task_ids``, ``outputs``, ``windows``, ``expected`` and ``ingest_ns`` is one
    result; the other fields are shared. Errors travel as single results."""

    KIND: ClassVar[str] = "result_batch"
    VERSION: ClassVar[int] = 1

    stream: Name
    type: Name
    agent_id: Name
    model: ModelRef
    labels: tuple[Label, ...]
    weight: float
    latency_ms: float
    task_ids: tuple[TaskId, ...]
    outputs: np.ndarray  # float32 [n, len(labels)], or features: [n, *shape]
    windows: np.ndarray  # int64 [n, 2]
    expected: tuple[tuple[Name, ...], ...]
    ingest_ns: np.ndarray  # int64 [n]
    deadline_ns: np.ndarray | None = None  # int64 [n], copied from the subtasks
    tickets: tuple[bytes, ...] = ()  # one per row, copied from the subtasks
    selection: Label = ""  # why ``model`` answered these rows (see ``Result.selection``)

    def __post_init__(self) -> None:
        n = len(self.task_ids)
        _check_rows(
            "ResultBatch",
            n,
            expected=len(self.expected) == n,
            tickets=len(self.tickets) in (0, n),
            deadline_ns=self.deadline_ns is None or self.deadline_ns.shape == (n,),
            outputs=self.outputs.ndim >= 2 and self.outputs.shape[0] == n,
            windows=self.windows.shape == (n, 2),
            ingest_ns=self.ingest_ns.shape == (n,),
        )

    def __len__(self) -> int:
        return len(self.task_ids)

    def items(self) -> list[Result]:
        """The results, one by one."""
        return [
            Result.of(
                self.task(i),
                type=self.type,
                agent_id=self.agent_id,
                model=self.model,
                output=self.outputs[i],
                labels=self.labels,
                latency_ms=self.latency_ms,
                weight=self.weight,
                ticket=self.ticket(i),
                selection=self.selection,
            )
            for i in range(len(self.task_ids))
        ]

    def ticket(self, i: int) -> bytes:
        """Row ``i``'s ticket (empty when the batch carries none)."""
        return self.tickets[i] if self.tickets else b""

    def deadline(self, i: int) -> int:
        """Row ``i``'s deadline (0 when the batch carries none)."""
        return int(self.deadline_ns[i]) if self.deadline_ns is not None else 0

    def task(self, i: int) -> Task:
        """The task row ``i`` answers."""
        return Task(
            self.task_ids[i],
            self.stream,
            Window(int(self.windows[i, 0]), int(self.windows[i, 1])),
            self.expected[i],
            int(self.ingest_ns[i]),
            self.deadline(i),
        )

    def select(self, rows: np.ndarray) -> ResultBatch:
        """The results at ``rows`` (indexes, or a boolean mask), as a batch."""
        index = _row_index(rows)
        return ResultBatch(
            stream=self.stream,
            type=self.type,
            agent_id=self.agent_id,
            model=self.model,
            labels=self.labels,
            weight=self.weight,
            latency_ms=self.latency_ms,
            task_ids=tuple(self.task_ids[i] for i in index),
            outputs=self.outputs[index],
            windows=self.windows[index],
            expected=tuple(self.expected[i] for i in index),
            ingest_ns=self.ingest_ns[index],
            deadline_ns=self.deadline_ns[index] if self.deadline_ns is not None else None,
            tickets=tuple(self.tickets[i] for i in index) if self.tickets else (),
            selection=self.selection,
        )


_MAX_TIME_NS = (1 << 63) - 1


def _check_times(
    where: str, start_ns: int, period_ns: int, samples: np.ndarray, *, period_needed: bool
) -> None:
    """Event times that make sense: a start at or after the epoch, a period (> 0 where one
    is needed), samples as ``[n, channels]``, and an end that fits in 64 bits."""
    if samples.ndim != 2:
        raise SchemaError(
            "bad_field", f"{where}: samples must be [n, channels], got {samples.shape}"
        )
    if start_ns < 0 or period_ns < 0 or (period_needed and period_ns == 0):
        raise SchemaError(
            "bad_field",
            f"{where}: start {start_ns} and period {period_ns} must be >= 0"
            + (" and the period > 0" if period_needed else ""),
        )
    if start_ns + samples.shape[0] * period_ns > _MAX_TIME_NS:
        raise SchemaError("bad_field", f"{where}: its end does not fit in 64 bits")


def _row_index(rows: np.ndarray) -> np.ndarray:
    """Row indexes from indexes or a boolean mask."""
    return np.flatnonzero(rows) if rows.dtype == np.bool_ else rows


def _check_rows(where: str, n: int, **columns: bool) -> None:
    """A batch has items, and every column one row per item (each ``columns`` value says
    whether that column does)."""
    if n < 1:
        raise SchemaError("bad_field", f"{where} is empty")
    for name, fits in columns.items():
        if not fits:
            raise SchemaError("bad_field", f"{where}.{name} does not have one row per item ({n})")


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskStatus:
    """The coordinator's word on a task that ended without every result."""

    KIND: ClassVar[str] = "task_status"
    VERSION: ClassVar[int] = 1

    task_id: TaskId
    stream: Name
    state: TaskState
    missing: tuple[Name, ...]
    reason: Label
    window: Window = Window(0, 0)
    expected: tuple[Name, ...] = ()
    ingest_ns: int = 0
    missing_sensors: tuple[Name, ...] = ()  # sensors with no usable data in the window
    deadline_ns: int = 0
    ticket: bytes = b""  # the coordinator's seal on the task
    # Why each type of the task with no usable answer has none (fused or not): "deadline",
    # "no input: <sensors>", "upstream: <type>" (a stage it reads did not answer), "error".
    missing_reasons: dict[Name, Label] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        task: Task,
        *,
        state: TaskState,
        missing: tuple[str, ...],
        reason: str,
        missing_sensors: tuple[str, ...] = (),
        ticket: bytes = b"",
        missing_reasons: dict[str, str] | None = None,
    ) -> TaskStatus:
        """The status of ``task``, ended in ``state``."""
        return cls(
            task_id=task.task_id,
            stream=task.stream,
            state=state,
            missing=missing,
            reason=reason,
            window=task.window,
            expected=task.expected,
            ingest_ns=task.ingest_ns,
            missing_sensors=missing_sensors,
            deadline_ns=task.deadline_ns,
            ticket=ticket,
            missing_reasons=dict(missing_reasons or {}),
        )

    @property
    def task(self) -> Task:
        """The task this status ends."""
        return Task(
            self.task_id, self.stream, self.window, self.expected, self.ingest_ns, self.deadline_ns
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """The fused answer for one task (one window of one stream)."""

    KIND: ClassVar[str] = "decision"
    VERSION: ClassVar[int] = 1

    task_id: TaskId
    stream: Name
    window: Window
    label: Label
    scores: dict[Label, float]
    status: TaskState
    contributors: tuple[Name, ...]
    missing: tuple[Name, ...]
    strategy: Label
    latency_ms: float  # ingest -> decision
    decided_ns: int = 0
    alarm: bool = False  # a threshold rule of the strategy fired
    missing_sensors: tuple[Name, ...] = ()  # sensors with no usable data in the window
    fusion: Label = ""  # the fusion agent (its --name) that decided: several may share a stream
    # With ``auto`` plans: types planned, or seen lately, that this window's task did not
    # expect because no replica was running when it opened.
    absent: tuple[Name, ...] = ()
    # Why each type with no usable answer has none, as in ``TaskStatus.missing_reasons``.
    missing_reasons: dict[Name, Label] = field(default_factory=dict)
    # The model that answered for each contributing type, as ``name@version``.
    models: dict[Name, Label] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter:
    """A message that could not be handled, kept with the reason and its original bytes."""

    KIND: ClassVar[str] = "dead_letter"
    VERSION: ClassVar[int] = 1

    component: Name
    subject: str
    reason: Label
    error: str
    data: bytes  # the original bytes, or their first few KiB when ``size`` is larger
    headers: dict[str, str] = field(default_factory=dict)
    first_seen_ns: int = 0
    size: int = 0  # of the original message, in bytes
    sha256: str = ""  # hex digest of the whole original message


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentInfo:
    """What an agent replica serves; published as its service metadata."""

    KIND: ClassVar[str] = "agent_info"
    VERSION: ClassVar[int] = 1

    agent_id: Name
    type: Name
    model: ModelRef
    runtime: Label
    inputs: tuple[InputSpec, ...]
    labels: tuple[Label, ...]
    weight: float = 1.0
    output: OutputKind = "scores"
    output_shape: tuple[int, ...] = ()  # per-row shape of ``features`` (0 = any size)
    # The models a plan may pin for this replica (``Subtask.pin``): each it holds, by the
    # name it is served under and by its card's; empty for a replica of one unnamed model.
    models: tuple[Label, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)  # arrays have no plain ==
class PendingStage:
    """A subtask type of an open task that waits for the answers of other types (its
    ``after``, and ``optional`` ones it runs without when they cannot come), with the
    inputs it has so far: sensor slices, and upstream outputs by type."""

    type: Name
    after: tuple[Name, ...] = ()
    optional: tuple[Name, ...] = ()
    inputs: dict[Name, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenTaskRecord:
    """What the coordinator's journal keeps of a task still open, so a restart can finish it."""

    task_id: TaskId
    stream: Name
    window: Window
    expected: tuple[Name, ...]
    deadline_ns: int
    ingest_ns: int
    seen: tuple[Name, ...] = ()
    unavailable: tuple[Name, ...] = ()
    missing_sensors: tuple[Name, ...] = ()
    errored: tuple[Name, ...] = ()  # of ``seen``, the types that answered with an error
    # Model chains: the task's types that are read by other types rather than fused, the
    # stages not yet published, and the types never published because an upstream failed.
    stages: tuple[Name, ...] = ()
    pending: tuple[PendingStage, ...] = ()
    blocked: dict[Name, Label] = field(default_factory=dict)

    @property
    def task(self) -> Task:
        """The task this record keeps."""
        return Task(
            self.task_id, self.stream, self.window, self.expected, self.ingest_ns, self.deadline_ns
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenTaskPage:
    """One write of the coordinator's journal: tasks that opened or changed since the last
    write, and tasks that ended since then after having been written. Replayed in order,
    the pages give the tasks still open."""

    KIND: ClassVar[str] = "open_task_page"
    VERSION: ClassVar[int] = 1

    records: tuple[OpenTaskRecord, ...] = ()
    ended: tuple[TaskId, ...] = ()
    # Per stream, the start of its first window not yet opened: a restarted coordinator
    # resumes cutting there, so data it is given again never reopens a window.
    cursors: dict[Name, int] = field(default_factory=dict)
    forgotten: tuple[Name, ...] = ()  # streams whose cursor no longer matters


#: How many earlier current versions a rollout remembers, for ``rollback``.
ROLLOUT_HISTORY = 16


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelRollout:
    """Which stored versions of one registry model serve, kept under the model's name in
    the rollout bucket; every replica that follows the model watches it.

    ``current`` answers; ``canary`` (with ``canary_share`` in (0, 1)) answers that share of
    subtasks, chosen by task id; ``shadow`` runs beside ``current`` on the same batches and
    its outputs go to the shadow subject, never to fusion. ``previous`` holds the versions
    that were current before, newest last, for ``rollback``.
    """

    KIND: ClassVar[str] = "model_rollout"
    VERSION: ClassVar[int] = 1

    name: Name
    type: Name
    current: Label
    previous: tuple[Label, ...] = ()
    canary: Label = ""
    canary_share: float = 0.0
    shadow: Label = ""
    updated_ns: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.canary_share < 1.0:
            raise SchemaError(
                "bad_field", f"ModelRollout.canary_share {self.canary_share!r} not in [0, 1)"
            )
        if bool(self.canary) != (self.canary_share > 0):
            raise SchemaError(
                "bad_field", "ModelRollout: a canary needs a share > 0, and a share a canary"
            )

    @property
    def versions(self) -> tuple[str, ...]:
        """The versions replicas load: current, then canary and shadow when set."""
        return tuple(dict.fromkeys(v for v in (self.current, self.canary, self.shadow) if v))


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)  # arrays have no plain ==
class ShadowBatch:
    """A shadow version's outputs beside the current version's, for the same subtasks of
    one batch (row ``i`` of every column is one subtask). Published on the shadow subject
    of the model's name; fusion never reads it."""

    KIND: ClassVar[str] = "shadow_batch"
    VERSION: ClassVar[int] = 1

    name: Name  # the registry model
    type: Name
    agent_id: Name
    current: ModelRef
    shadow: ModelRef
    labels: tuple[Label, ...]
    task_ids: tuple[TaskId, ...]
    streams: tuple[Name, ...]
    windows: np.ndarray  # int64 [n, 2]
    current_outputs: np.ndarray  # float32 [n, len(labels)]
    shadow_outputs: np.ndarray  # float32 [n, len(labels)]
    produced_ns: int = 0

    def __post_init__(self) -> None:
        n = len(self.task_ids)
        _check_rows(
            "ShadowBatch",
            n,
            streams=len(self.streams) == n,
            windows=self.windows.shape == (n, 2),
            current_outputs=self.current_outputs.ndim >= 2 and self.current_outputs.shape[0] == n,
            shadow_outputs=self.shadow_outputs.shape == self.current_outputs.shape,
        )

    def __len__(self) -> int:
        return len(self.task_ids)


#: The states a sensor can be reported in.
SENSOR_STATES = ("down", "up")


@dataclass(frozen=True, slots=True, kw_only=True)
class SensorStatus:
    """A sensor went silent for longer than its plan allows (``down``), or spoke again (``up``)."""

    KIND: ClassVar[str] = "sensor_status"
    VERSION: ClassVar[int] = 1

    stream: Name
    sensor: Name
    state: str  # one of SENSOR_STATES
    last_seen_ns: int  # wall clock of its last chunk
    silent_ms: float

    def __post_init__(self) -> None:
        if self.state not in SENSOR_STATES:
            raise SchemaError(
                "bad_field", f"SensorStatus.state: {self.state!r} not in {SENSOR_STATES}"
            )


#: The batch message that carries several of a message kind, by that kind.
BATCH_OF: dict[type, type] = {Subtask: SubtaskBatch, Result: ResultBatch}

#: Every top-level message, in the order the docs list them.
MESSAGES: tuple[type, ...] = (
    SensorChunk,
    SensorFrame,
    Subtask,
    SubtaskBatch,
    Result,
    ResultBatch,
    TaskStatus,
    Decision,
    DeadLetter,
    AgentInfo,
    OpenTaskPage,
    SensorStatus,
    ModelRollout,
    ShadowBatch,
)
