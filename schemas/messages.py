"""Wire messages: frozen, tagged, versioned dataclasses.

Each top-level message has a ``KIND`` (its tag on the wire) and a ``VERSION``. Adding a field
needs a default so older senders stay readable; changing a field's meaning needs a new
``VERSION``. Times are integers in nanoseconds since the epoch (event time), durations are
named with their unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from schemas.errors import SchemaError

#: The final states a task can reach; every task the coordinator opens ends in one of them.
TASK_STATES = ("complete", "partial", "failed")


@dataclass(frozen=True, slots=True)
class Window:
    """An event-time interval ``[t_start_ns, t_end_ns)``."""

    t_start_ns: int
    t_end_ns: int


@dataclass(frozen=True, slots=True)
class ModelRef:
    """Which model produced a result."""

    name: str
    version: str


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """Why an agent could not answer: a stable ``code`` and a human ``text``."""

    code: str
    text: str


@dataclass(frozen=True, slots=True)
class InputSpec:
    """One input an agent reads: ``samples`` x ``channels`` from ``sensor`` (0 = any)."""

    sensor: str
    samples: int = 0
    channels: int = 0


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)  # arrays have no plain ==
class SensorChunk:
    """A run of samples from one sensor, starting at ``t0_ns``, ``period_ns`` apart."""

    KIND: ClassVar[str] = "sensor_chunk"
    VERSION: ClassVar[int] = 1

    stream: str
    sensor: str
    t0_ns: int
    period_ns: int
    samples: np.ndarray  # [n, channels]


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)  # arrays have no plain ==
class SensorFrame:
    """A pre-aligned frame: every sensor's samples for one window starting at ``t_ns``."""

    KIND: ClassVar[str] = "sensor_frame"
    VERSION: ClassVar[int] = 1

    stream: str
    t_ns: int
    sensors: dict[str, np.ndarray]  # name -> [n, channels]
    period_ns: int = 0  # sample period; with n samples the window ends at t_ns + n * period_ns


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)  # arrays have no plain ==
class Subtask:
    """One piece of a task: the inputs one agent type needs for one window."""

    KIND: ClassVar[str] = "subtask"
    VERSION: ClassVar[int] = 1

    task_id: str
    stream: str
    type: str
    window: Window
    inputs: dict[str, np.ndarray]
    deadline_ns: int
    expected: tuple[str, ...]  # every type the task waits for
    attempt: int = 1
    ingest_ns: int = 0  # when the coordinator received the data (wall clock)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)  # arrays have no plain ==
class Result:
    """An agent's answer to one subtask: class probabilities (or scores), or an error."""

    KIND: ClassVar[str] = "result"
    VERSION: ClassVar[int] = 1

    task_id: str
    stream: str
    type: str
    agent_id: str
    model: ModelRef
    output: np.ndarray | None
    labels: tuple[str, ...]  # names of the entries of ``output``
    latency_ms: float
    error: ErrorInfo | None = None
    window: Window = Window(0, 0)
    expected: tuple[str, ...] = ()
    ingest_ns: int = 0
    weight: float = 1.0  # the agent's declared fusion weight, e.g. its validation accuracy


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)  # arrays have no plain ==
class SubtaskBatch:
    """Several subtasks of one type in one message.

    The coordinator sends what is ready at the same moment this way, so that a busy
    pipeline pays the per-message costs (publish, store, deliver, ack) once per batch
    rather than once per window. Each subtask keeps its own task, deadline and window.
    """

    KIND: ClassVar[str] = "subtask_batch"
    VERSION: ClassVar[int] = 1
    ITEMS: ClassVar[str] = "subtasks"

    type: str
    subtasks: tuple[Subtask, ...]

    def __post_init__(self) -> None:
        _check_batch(self.subtasks, "type", self.type, "SubtaskBatch")


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)  # arrays have no plain ==
class ResultBatch:
    """Several results for one stream in one message: an agent's answers to a batch."""

    KIND: ClassVar[str] = "result_batch"
    VERSION: ClassVar[int] = 1
    ITEMS: ClassVar[str] = "results"

    stream: str
    results: tuple[Result, ...]

    def __post_init__(self) -> None:
        _check_batch(self.results, "stream", self.stream, "ResultBatch")


def _check_batch(items: tuple[object, ...], key: str, value: str, where: str) -> None:
    if not items:
        raise SchemaError("bad_field", f"{where} is empty")
    for item in items:
        if getattr(item, key) != value:
            raise SchemaError(
                "bad_field", f"{where}.{key} is {value!r} but an item has {getattr(item, key)!r}"
            )


#: The batch message that carries several of a message kind, by that kind.
BATCH_OF: dict[type, type] = {Subtask: SubtaskBatch, Result: ResultBatch}


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskStatus:
    """The coordinator's word on a task that ended without every result."""

    KIND: ClassVar[str] = "task_status"
    VERSION: ClassVar[int] = 1

    task_id: str
    stream: str
    state: str  # one of TASK_STATES
    missing: tuple[str, ...]
    reason: str
    window: Window = Window(0, 0)
    expected: tuple[str, ...] = ()
    ingest_ns: int = 0
    missing_sensors: tuple[str, ...] = ()  # sensors with no usable data in the window

    def __post_init__(self) -> None:
        if self.state not in TASK_STATES:
            raise SchemaError("bad_field", f"TaskStatus.state: {self.state!r} not in {TASK_STATES}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """The fused answer for one task (one window of one stream)."""

    KIND: ClassVar[str] = "decision"
    VERSION: ClassVar[int] = 1

    task_id: str
    stream: str
    window: Window
    label: str
    scores: dict[str, float]
    status: str  # one of TASK_STATES
    contributors: tuple[str, ...]
    missing: tuple[str, ...]
    strategy: str
    latency_ms: float  # ingest -> decision
    decided_ns: int = 0
    alarm: bool = False  # a threshold rule of the strategy fired
    missing_sensors: tuple[str, ...] = ()  # sensors with no usable data in the window


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter:
    """A message that could not be handled, kept with the reason and its original bytes."""

    KIND: ClassVar[str] = "dead_letter"
    VERSION: ClassVar[int] = 1

    component: str
    subject: str
    reason: str
    error: str
    data: bytes
    headers: dict[str, str] = field(default_factory=dict)
    first_seen_ns: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentInfo:
    """What an agent replica serves; published as its service metadata."""

    KIND: ClassVar[str] = "agent_info"
    VERSION: ClassVar[int] = 1

    agent_id: str
    type: str
    model: ModelRef
    runtime: str
    inputs: tuple[InputSpec, ...]
    labels: tuple[str, ...]
    weight: float = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenTaskRecord:
    """The coordinator's journal entry for a task still open, so a restart can finish it."""

    KIND: ClassVar[str] = "open_task"
    VERSION: ClassVar[int] = 1

    task_id: str
    stream: str
    window: Window
    expected: tuple[str, ...]
    deadline_ns: int
    ingest_ns: int
    seen: tuple[str, ...] = ()
    unavailable: tuple[str, ...] = ()
    missing_sensors: tuple[str, ...] = ()


#: The states a sensor can be reported in.
SENSOR_STATES = ("down", "up")


@dataclass(frozen=True, slots=True, kw_only=True)
class SensorStatus:
    """A sensor went silent for longer than its plan allows (``down``), or spoke again (``up``)."""

    KIND: ClassVar[str] = "sensor_status"
    VERSION: ClassVar[int] = 1

    stream: str
    sensor: str
    state: str  # one of SENSOR_STATES
    last_seen_ns: int  # wall clock of its last chunk
    silent_ms: float

    def __post_init__(self) -> None:
        if self.state not in SENSOR_STATES:
            raise SchemaError(
                "bad_field", f"SensorStatus.state: {self.state!r} not in {SENSOR_STATES}"
            )


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
    OpenTaskRecord,
    SensorStatus,
)
