"""Admission: whether a frame or chunk can be used, checked when it arrives (pure, no bus).

Data the pipeline cannot use is refused at the door, with a reason its producer is told and
the dead letter keeps, rather than answered ``accepted`` and failed later: a frame whose
sensors the plan does not declare, or that lacks a required one; event time far ahead of
the clock; and sensor data of another shape than the running agents that read it declare on
their cards. A frame is one window as it is: the plan's ``[window]`` applies to chunks only.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from coordinator.directory import KnownType
from coordinator.plan import Plan, SubtaskSpec
from schemas import SchemaError, SensorChunk, SensorFrame

#: Event time may run at most this far ahead of the coordinator's clock (a sensor whose
#: clock is wrong would otherwise open windows no later data can reach).
MAX_AHEAD_NS = 3600 * 10**9


def check_frame(
    frame: SensorFrame, plan: Plan, readers: Mapping[str, KnownType], now_ns: int
) -> tuple[str, ...]:
    """Check a frame against its stream's plan and the agent types that read it; returns
    the declared sensors it lacks (all optional).

    Raises:
        SchemaError: the frame cannot be used; ``reason`` says why.
    """
    if not frame.sensors:
        raise SchemaError("bad_field", "frame carries no sensor")
    lengths = {array.shape[0] for array in frame.sensors.values()}
    if len(lengths) != 1:
        raise SchemaError("bad_shape", f"frame's sensors differ in length: {_shapes(frame)}")
    _check_ahead(frame.t_ns, now_ns, f"frame of stream {frame.stream!r}")
    absent: tuple[str, ...] = ()
    if plan.sensors:
        declared = {s.name for s in plan.sensors}
        unknown = sorted(set(frame.sensors) - declared)
        if unknown:
            raise SchemaError(
                "unknown_sensor",
                f"stream {frame.stream!r} declares sensors {sorted(declared)}, not {unknown}",
            )
        required = [s.name for s in plan.sensors if s.required and s.name not in frame.sensors]
        if required:
            raise SchemaError(
                "missing_sensor", f"frame of stream {frame.stream!r} lacks required {required}"
            )
        absent = tuple(s.name for s in plan.sensors if s.name not in frame.sensors)
    for spec in plan.subtasks:
        _check_readable(spec, readers.get(spec.type), frame.sensors, frame.stream)
    return absent


def check_chunk(
    chunk: SensorChunk, plan: Plan, readers: Mapping[str, KnownType], now_ns: int
) -> None:
    """Check a chunk's time and channels against the clock and the agent types that read
    its sensor (the windower checks the rest as it buffers).

    Raises:
        SchemaError: the chunk cannot be used; ``reason`` says why.
    """
    _check_ahead(chunk.t0_ns, now_ns, f"chunk of {chunk.stream!r}/{chunk.sensor!r}")
    channels = chunk.samples.shape[1]
    for spec in plan.subtasks:
        known = readers.get(spec.type)
        if known is None:
            continue
        for given in spec.inputs:
            card = next((i for i in known.inputs if i.sensor == given.sensor and not i.stage), None)
            if given.sensor != chunk.sensor or card is None or not card.channels:
                continue
            width = len(given.channels) if given.channels is not None else channels
            if given.channels is not None and max(given.channels) >= channels:
                raise SchemaError(
                    "bad_shape",
                    f"sensor {chunk.sensor!r} sent {channels} channels; the plan reads "
                    f"{list(given.channels)} for type {spec.type!r}",
                )
            if width != card.channels:
                raise SchemaError(
                    "bad_shape",
                    f"type {spec.type!r} reads {card.channels} channels of {chunk.sensor!r}; "
                    f"this chunk gives {width}",
                )


def _check_ahead(t_ns: int, now_ns: int, what: str) -> None:
    if t_ns > now_ns + MAX_AHEAD_NS:
        raise SchemaError(
            "future",
            f"{what} starts {(t_ns - now_ns) / 3.6e12:,.1f} h ahead of the coordinator's clock; "
            f"at most {MAX_AHEAD_NS / 3.6e12:.0f} h is taken",
        )


def _check_readable(
    spec: SubtaskSpec,
    known: KnownType | None,
    sensors: Mapping[str, np.ndarray],
    stream: str,
) -> None:
    """The inputs ``spec`` slices from ``sensors`` have the shape the running replicas of
    its type declare (nothing to check when none runs or the card says ``0``: any)."""
    if known is None:
        return
    for given in spec.inputs:
        array = sensors.get(given.sensor)
        card = next((i for i in known.inputs if i.sensor == given.sensor and not i.stage), None)
        if array is None or card is None:
            continue
        try:
            shape = given.select(array).shape
        except SchemaError as exc:
            raise SchemaError("bad_shape", exc.detail) from None
        if (card.samples and card.samples != shape[0]) or (
            card.channels and card.channels != shape[1]
        ):
            want = f"{card.samples or 'any'} x {card.channels or 'any'}"
            raise SchemaError(
                "bad_shape",
                f"type {spec.type!r} reads {given.sensor!r} as {want} (samples x channels); "
                f"stream {stream!r} gives {shape[0]} x {shape[1]}",
            )


def _shapes(frame: SensorFrame) -> dict[str, tuple[int, ...]]:
    return {name: array.shape for name, array in frame.sensors.items()}
