"""Plans: which subtasks a window of a stream needs, and from which sensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from schemas import ConfigError, SchemaError
from schemas.limits import check_name

#: What to do with a new window when a stream already has ``max_inflight`` open tasks:
#: ``drop_oldest`` ends the oldest open task (counted as shed) so fresh data goes first;
#: ``block`` holds the new window (and the reply to a producer that asked for one) until a
#: task ends, so a producer that waits for replies is slowed to the pipeline's pace.
OVERFLOW_POLICIES = ("drop_oldest", "block")


@dataclass(frozen=True)
class WindowSpec:
    """Event-time windows cut from per-sensor streams: size, hop and allowed lateness."""

    size_ms: float
    hop_ms: float
    rate_hz: float  # every sensor is resampled onto this grid
    lateness_ms: float = 0.0
    max_gap_ms: float = 0.0  # a sensor with a longer gap in a window is missing (0: 3 samples)

    def __post_init__(self) -> None:
        if not self.size_ms > 0 or not self.hop_ms > 0:
            raise ConfigError(
                f"window size_ms and hop_ms must be > 0, got {self.size_ms}, {self.hop_ms}"
            )
        if not self.rate_hz > 0:
            raise ConfigError(f"window rate_hz must be > 0, got {self.rate_hz}")
        if self.lateness_ms < 0 or self.max_gap_ms < 0:
            raise ConfigError("window lateness_ms and max_gap_ms must be >= 0")


@dataclass(frozen=True)
class SensorSpec:
    """A sensor a stream has: whether windows need it, and how long it may stay silent."""

    name: str
    required: bool = True
    max_silence_ms: float = 5000.0

    def __post_init__(self) -> None:
        check_name(self.name, "sensor")
        if not self.max_silence_ms > 0:
            raise ConfigError(f"sensor {self.name!r}: max_silence_ms must be > 0")


@dataclass(frozen=True)
class SensorInput:
    """Data a subtask type reads: one sensor, all its channels or the ``channels`` listed."""

    sensor: str
    channels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        check_name(self.sensor, "sensor")
        if self.channels is not None and (not self.channels or any(c < 0 for c in self.channels)):
            raise ConfigError(f"sensor {self.sensor!r}: channels must be non-negative indexes")

    def select(self, samples: np.ndarray) -> np.ndarray:
        """This input's slice of a sensor's ``[samples, channels]`` array."""
        if samples.ndim != 2:
            raise SchemaError(
                "bad_field",
                f"sensor {self.sensor!r}: expected [samples, channels], got shape {samples.shape}",
            )
        if self.channels is None:
            return samples
        if max(self.channels) >= samples.shape[1]:
            raise SchemaError(
                "bad_field",
                f"sensor {self.sensor!r} has {samples.shape[1]} channels, plan reads {list(self.channels)}",
            )
        return np.ascontiguousarray(samples[:, list(self.channels)])


@dataclass(frozen=True)
class StageInput:
    """The answer of another subtask type of the same window that a subtask type reads.

    An ``optional`` one is waited for only while it can still come: when it cannot (its
    sensors are missing, its own upstream failed, it answered with an error, or no replica
    serves it when the window opens) the reader runs on the inputs that did arrive.
    """

    type: str
    optional: bool = False

    def __post_init__(self) -> None:
        check_name(self.type, "type")


@dataclass(frozen=True)
class SubtaskSpec:
    """One subtask type of a plan: the sensor data it is given, and the other types of the
    window whose answers it reads (``after``), which makes the plan a small DAG of stages."""

    type: str
    inputs: tuple[SensorInput, ...] = ()
    after: tuple[StageInput, ...] = ()
    # The model (a registry name, or a model file's stem) that is to answer, where a
    # replica serves the type with several: "" lets the replica choose by deadline.
    model: str = ""

    def __post_init__(self) -> None:
        check_name(self.type, "type")
        if self.model:
            check_name(self.model, "pinned model")
        if not self.inputs and not self.after:
            raise ConfigError(f"subtask {self.type!r} reads no sensor and no other type")
        names = [*self.sensors, *self.upstream]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(
                f"subtask {self.type!r} names the input {twice[0]!r} twice (as a sensor or a "
                "type it reads after): each input needs its own name"
            )
        if self.type in self.upstream:
            raise ConfigError(f"subtask {self.type!r} reads its own answers")

    @property
    def sensors(self) -> tuple[str, ...]:
        """The sensors this subtask reads."""
        return tuple(i.sensor for i in self.inputs)

    @property
    def upstream(self) -> tuple[str, ...]:
        """The subtask types whose answers this one reads, required and optional."""
        return tuple(a.type for a in self.after)

    @property
    def required_upstream(self) -> tuple[str, ...]:
        """The upstream types this one cannot run without."""
        return tuple(a.type for a in self.after if not a.optional)

    @property
    def optional_upstream(self) -> tuple[str, ...]:
        """The upstream types this one runs without when they cannot come."""
        return tuple(a.type for a in self.after if a.optional)


def fused_types(specs: Sequence[SubtaskSpec], fuse: Sequence[str] = ()) -> tuple[str, ...]:
    """The types of ``specs`` whose answers are fused, in order: the ``fuse`` ones, and every
    type no other type of ``specs`` reads."""
    read = {u for spec in specs for u in spec.upstream}
    wanted = set(fuse)
    return tuple(s.type for s in specs if s.type in wanted or s.type not in read)


def stage_cycle(specs: Sequence[SubtaskSpec]) -> tuple[str, ...]:
    """A cycle among the ``after`` links of ``specs`` (``a, b, a``: a reads b, b reads a),
    or ``()`` when they form a DAG. Links to types not in ``specs`` are ignored."""
    after = {s.type: s.upstream for s in specs}
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> tuple[str, ...]:
        state[node] = 1
        path.append(node)
        for up in after.get(node, ()):
            if state.get(up) == 1:
                return (*path[path.index(up) :], up)
            if up in after and up not in state:
                found = visit(up)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return ()

    for spec in specs:
        if spec.type not in state:
            found = visit(spec.type)
            if found:
                return found
    return ()


@dataclass(frozen=True)
class Plan:
    """How the coordinator decomposes every window of a stream.

    With ``auto`` the subtask types are the listed ones plus every agent type found by
    service discovery whose inputs the stream's sensors can feed, so an agent started while
    a stream runs is included from the next windows on, and one that stops is no longer
    expected.

    ``deadline_ms`` is counted from the moment the task opens; ``max_inflight`` bounds the
    open tasks of one stream, past which ``overflow`` applies (see :data:`OVERFLOW_POLICIES`).
    """

    subtasks: tuple[SubtaskSpec, ...] = ()
    auto: bool = False  # also every discovered agent type whose inputs the stream can feed
    deadline_ms: float = 2000.0
    max_inflight: int = 1000
    overflow: str = "drop_oldest"
    window: WindowSpec | None = None  # None: each frame is one window
    sensors: tuple[SensorSpec, ...] = ()
    fuse: tuple[str, ...] = ()  # types fused although others read them (see fused_types)

    def __post_init__(self) -> None:
        if not self.subtasks and not self.auto:
            raise ConfigError("a plan needs at least one subtask type, or auto")
        types = [s.type for s in self.subtasks]
        if len(set(types)) != len(types):
            raise ConfigError(f"plan lists a subtask type twice: {types}")
        if not self.deadline_ms > 0:
            raise ConfigError(f"deadline_ms must be > 0, got {self.deadline_ms}")
        if self.max_inflight < 1:
            raise ConfigError(f"max_inflight must be >= 1, got {self.max_inflight}")
        if self.overflow not in OVERFLOW_POLICIES:
            raise ConfigError(f"overflow must be one of {OVERFLOW_POLICIES}, got {self.overflow!r}")
        names = [s.name for s in self.sensors]
        if len(set(names)) != len(names):
            raise ConfigError(f"plan lists a sensor twice: {names}")
        if self.sensors:
            for spec in self.subtasks:
                unknown = set(spec.sensors) - set(names)
                if unknown:
                    raise ConfigError(
                        f"subtask {spec.type!r} reads undeclared sensors {sorted(unknown)}"
                    )
        self._check_stages(set(types))

    def _check_stages(self, types: set[str]) -> None:
        """The ``after`` links form a DAG of listed types (any type, with ``auto``), and
        what is fused is listed."""
        if not self.auto:
            for spec in self.subtasks:
                for up in spec.upstream:
                    if up not in types:
                        raise ConfigError(
                            f"subtask {spec.type!r} reads the answers of {up!r}, which the plan "
                            f"does not list (it lists {', '.join(sorted(types))})"
                        )
        cycle = stage_cycle(self.subtasks)
        if cycle:
            raise ConfigError(f"the plan's stages form a cycle: {' -> '.join(cycle)}")
        for name in self.fuse:
            check_name(name, "fused type")
            if name not in types and not self.auto:
                raise ConfigError(f"fuse names {name!r}, which the plan does not list")

    @property
    def types(self) -> tuple[str, ...]:
        """Every subtask type, in plan order."""
        return tuple(s.type for s in self.subtasks)

    @property
    def fused(self) -> tuple[str, ...]:
        """The listed types whose answers the fusion agent fuses, in plan order."""
        return fused_types(self.subtasks, self.fuse)

    @property
    def chained(self) -> bool:
        """Whether some listed type reads the answers of another."""
        return any(spec.after for spec in self.subtasks)


def basicmotions_plan(
    *, deadline_ms: float = 2000.0, max_inflight: int = 1000, max_silence_ms: float = 3000.0
) -> Plan:
    """The demo plan: ``accel`` reads the accelerometer, ``gyro`` the gyroscope.

    Per-sensor data is cut into 10 s windows at 10 Hz (one BasicMotions case each), with 2 s
    of allowed lateness; the accelerometer is required, the gyroscope optional.
    """
    return Plan(
        subtasks=(
            SubtaskSpec("accel", (SensorInput("accel"),)),
            SubtaskSpec("gyro", (SensorInput("gyro"),)),
        ),
        deadline_ms=deadline_ms,
        max_inflight=max_inflight,
        window=WindowSpec(size_ms=10_000, hop_ms=10_000, rate_hz=10, lateness_ms=2_000),
        sensors=(
            SensorSpec("accel", required=True, max_silence_ms=max_silence_ms),
            SensorSpec("gyro", required=False, max_silence_ms=max_silence_ms),
        ),
    )


class PlanBook:
    """The plan of every stream: an explicit plan per stream id, else the default."""

    def __init__(
        self, plans: dict[str, Plan] | None = None, *, default: Plan | None = None
    ) -> None:
        self.plans = dict(plans or {})
        for stream in self.plans:
            check_name(stream, "stream")
        self.default = default

    def __repr__(self) -> str:
        return f"PlanBook(streams={sorted(self.plans)}, default={self.default is not None})"

    @property
    def any_auto(self) -> bool:
        """Whether any plan learns its types from discovery."""
        return any(p.auto for p in (*self.plans.values(), self.default) if p is not None)

    def all(self) -> tuple[Plan, ...]:
        """Every plan: the streams' own, then the default."""
        return tuple(p for p in (*self.plans.values(), self.default) if p is not None)

    @property
    def any_chained(self) -> bool:
        """Whether any plan has stages that read other types' answers."""
        return any(p.chained for p in (*self.plans.values(), self.default) if p is not None)

    @property
    def listed_types(self) -> tuple[str, ...]:
        """Every subtask type some plan lists by name, sorted."""
        plans = (*self.plans.values(), self.default)
        return tuple(sorted({t for p in plans if p is not None for t in p.types}))

    def for_stream(self, stream: str) -> Plan | None:
        """The plan that applies to ``stream``, or ``None`` when no plan does."""
        return self.plans.get(stream, self.default)


def auto_plan(*, deadline_ms: float = 2000.0, max_inflight: int = 1000) -> Plan:
    """Every discovered agent type the stream can feed, nothing listed."""
    return Plan(auto=True, deadline_ms=deadline_ms, max_inflight=max_inflight)


#: Plans shipped with fusebus, by name.
BUILTIN_PLANS = {"basicmotions": basicmotions_plan, "auto": auto_plan}
