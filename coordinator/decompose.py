"""Decomposing one window of sensor data into subtasks: pure, no bus."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coordinator.plan import SubtaskSpec, fused_types
from schemas import PendingStage, Subtask, Task, Window
from schemas.tickets import seal


def task_id_for(stream: str, window: Window) -> str:
    """The task id of a stream's window: ``<stream>:<window start ns>``, the same in every
    coordinator and every run, so a window opened again is recognised (and its subtasks'
    ``Nats-Msg-Id`` deduplicated by the server)."""
    return f"{stream}:{window.t_start_ns}"


@dataclass(frozen=True)
class Opening:
    """A task about to open: the task, its subtasks to publish, and its ticket.

    With stages, ``stages`` are the types read by other types rather than fused, and
    ``waiting`` the types that wait for upstream answers (with their sensor inputs).
    """

    task: Task
    unavailable: frozenset[str]  # types with no input in this window
    subtasks: tuple[Subtask, ...]
    ticket: bytes  # the seal fusion checks on every result and status of the task
    stages: frozenset[str] = frozenset()
    waiting: tuple[PendingStage, ...] = ()


def decompose(
    *,
    task_id: str,
    stream: str,
    window: Window,
    sensors: dict[str, np.ndarray],
    specs: list[SubtaskSpec],
    deadline_ms: float,
    now_ns: int,
    key: bytes,
    fuse: tuple[str, ...] = (),
    not_awaited: frozenset[str] = frozenset(),
) -> Opening:
    """One subtask per spec that reads only sensors, all present; a spec with a missing
    sensor is ``unavailable``, and one that reads other types' answers waits for them.
    The task expects the fused types (:func:`~coordinator.plan.fused_types` of ``fuse``).
    Optional upstream types in ``not_awaited`` (no replica runs them) are not waited for.
    Every subtask carries the task's ticket, sealed with ``key``.

    Raises:
        SchemaError: a sensor's data cannot be sliced as the spec says.
    """
    expected = fused_types(specs, fuse)
    task = Task(
        task_id=task_id,
        stream=stream,
        window=window,
        expected=expected,
        ingest_ns=now_ns,
        deadline_ns=now_ns + int(deadline_ms * 1e6),
    )
    ticket = seal(key, task)
    subtasks = []
    waiting = []
    unavailable = set()
    for spec in specs:
        if any(sensor not in sensors for sensor in spec.sensors):
            unavailable.add(spec.type)
            continue
        inputs = {i.sensor: i.select(sensors[i.sensor]) for i in spec.inputs}
        if spec.after:
            optional = tuple(u for u in spec.optional_upstream if u not in not_awaited)
            waiting.append(
                PendingStage(
                    type=spec.type, after=spec.required_upstream, optional=optional, inputs=inputs
                )
            )
            continue
        subtasks.append(stage_subtask(task, spec.type, inputs, ticket, pin=spec.model))
    return Opening(
        task=task,
        unavailable=frozenset(unavailable),
        subtasks=tuple(subtasks),
        ticket=ticket,
        stages=frozenset(s.type for s in specs if s.type not in expected),
        waiting=tuple(waiting),
    )


def stage_subtask(
    task: Task, type_name: str, inputs: dict[str, np.ndarray], ticket: bytes, *, pin: str = ""
) -> Subtask:
    """The subtask of ``type_name`` for ``task`` with ``inputs``: sensor slices, and for a
    stage the outputs of the upstream types it reads, by type; ``pin`` names the model the
    plan wants to answer it."""
    return Subtask(
        task_id=task.task_id,
        stream=task.stream,
        type=type_name,
        window=task.window,
        inputs=inputs,
        deadline_ns=task.deadline_ns,
        expected=task.expected,
        ingest_ns=task.ingest_ns,
        ticket=ticket,
        pin=pin,
    )
