"""Decomposing one window of sensor data into subtasks: pure, no bus."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coordinator.plan import SubtaskSpec
from schemas import Subtask, Task, Window
from schemas.tickets import seal


def task_id_for(stream: str, window: Window) -> str:
    """The task id of a stream's window: ``<stream>:<window start ns>``, the same in every
    coordinator and every run, so a window opened again is recognised (and its subtasks'
    ``Nats-Msg-Id`` deduplicated by the server)."""
    return f"{stream}:{window.t_start_ns}"


@dataclass(frozen=True)
class Opening:
    """A task about to open: the task, its subtasks to publish, and its ticket."""

    task: Task
    unavailable: frozenset[str]  # expected types with no input in this window
    subtasks: tuple[Subtask, ...]
    ticket: bytes  # the seal fusion checks on every result and status of the task


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
) -> Opening:
    """One subtask per spec whose sensors are all present; the others are ``unavailable``.
    Every subtask carries the task's ticket, sealed with ``key``.

    Raises:
        SchemaError: a sensor's data cannot be sliced as the spec says.
    """
    task = Task(
        task_id=task_id,
        stream=stream,
        window=window,
        expected=tuple(spec.type for spec in specs),
        ingest_ns=now_ns,
        deadline_ns=now_ns + int(deadline_ms * 1e6),
    )
    ticket = seal(key, task)
    subtasks = []
    unavailable = set()
    for spec in specs:
        if any(sensor not in sensors for sensor in spec.sensors):
            unavailable.add(spec.type)
            continue
        subtasks.append(
            Subtask(
                task_id=task_id,
                stream=stream,
                type=spec.type,
                window=window,
                inputs={i.sensor: i.select(sensors[i.sensor]) for i in spec.inputs},
                deadline_ns=task.deadline_ns,
                expected=task.expected,
                ingest_ns=now_ns,
                ticket=ticket,
            )
        )
    return Opening(
        task=task, unavailable=frozenset(unavailable), subtasks=tuple(subtasks), ticket=ticket
    )
