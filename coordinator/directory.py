"""Which agent types are running, learnt from service discovery: a pure bookkeeping class.

The coordinator polls ``$SRV.STATS`` and feeds the sightings here; a type is known from its
first sighting and forgotten when no replica of it has been seen for ``forget_after_s``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from coordinator.plan import SensorInput, StageInput, SubtaskSpec
from schemas import AgentInfo, InputSpec, OutputKind


@dataclass(frozen=True)
class KnownType:
    """An agent type seen on the bus."""

    type: str
    inputs: tuple[InputSpec, ...]
    replicas: int
    last_seen: float
    output: OutputKind = "scores"
    output_shape: tuple[int, ...] = ()  # per row; for scores, one per label
    # The models a plan may pin: held by every replica, and by at least one.
    models_everywhere: frozenset[str] = frozenset()
    models_somewhere: frozenset[str] = frozenset()

    @classmethod
    def of(cls, info: AgentInfo, replicas: int, now: float) -> KnownType:
        """What a replica's discovery metadata says of its type."""
        shape = info.output_shape if info.output == "features" else (len(info.labels),)
        held = frozenset(info.models)
        return cls(info.type, info.inputs, replicas, now, info.output, shape, held, held)

    @classmethod
    def of_replicas(cls, infos: list[AgentInfo], now: float) -> KnownType:
        """What the replicas of one type say of it (the first one's card; the models each
        holds, which may differ between replicas)."""
        first = cls.of(infos[0], len(infos), now)
        held = [frozenset(i.models) for i in infos]
        return dataclasses.replace(
            first,
            models_everywhere=frozenset.intersection(*held),
            models_somewhere=frozenset.union(*held),
        )

    def pin_problem(self, model: str) -> str:
        """Why subtasks of this type pinned to ``model`` would fail ("" if none would)."""
        if model not in self.models_somewhere:
            return f"no replica of {self.type!r} holds model {model!r}"
        if model not in self.models_everywhere:
            return (
                f"only some replicas of {self.type!r} hold model {model!r}: the subtasks "
                "the others take are answered with pin_unserved"
            )
        return ""

    def can_feed(self, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        """Whether sensors of these ``(samples, channels)`` shapes satisfy every sensor
        input (inputs that are other types' answers are not sensors)."""
        for spec in self.inputs:
            if spec.stage:
                continue
            shape = shapes.get(spec.sensor)
            if shape is None or len(shape) != 2:
                return False
            if (spec.samples and spec.samples != shape[0]) or (
                spec.channels and spec.channels != shape[1]
            ):
                return False
        return True

    @property
    def upstream(self) -> tuple[str, ...]:
        """The types whose answers this type needs (its optional ones it can do without)."""
        return tuple(spec.sensor for spec in self.inputs if spec.stage and not spec.optional)

    def spec(self) -> SubtaskSpec:
        """This type as a plan's subtask: its sensors, and the types it reads after."""
        return SubtaskSpec(
            self.type,
            tuple(SensorInput(spec.sensor) for spec in self.inputs if not spec.stage),
            tuple(StageInput(i.sensor, i.optional) for i in self.inputs if i.stage),
        )


class AgentDirectory:
    """The agent types currently running, by type name."""

    def __init__(self, *, forget_after_s: float = 2.0) -> None:
        self.forget_after_s = forget_after_s
        self._types: dict[str, KnownType] = {}
        self.by_type: Mapping[str, KnownType] = MappingProxyType(self._types)  # read-only, live

    def __repr__(self) -> str:
        return (
            f"AgentDirectory({', '.join(f'{t.type}x{t.replicas}' for t in self._types.values())})"
        )

    def __contains__(self, type_name: object) -> bool:
        return type_name in self._types

    @property
    def types(self) -> dict[str, KnownType]:
        """Every known type."""
        return dict(self._types)

    def observe(self, sightings: Iterable[AgentInfo], now: float) -> tuple[list[str], list[str]]:
        """Record one discovery round; returns the types that appeared and that went away."""
        replicas: dict[str, list[AgentInfo]] = {}
        for info in sightings:
            replicas.setdefault(info.type, []).append(info)
        appeared = [t for t in replicas if t not in self._types]
        for type_name, infos in replicas.items():
            self._types[type_name] = KnownType.of_replicas(infos, now)
        gone = [
            t for t, known in self._types.items() if now - known.last_seen > self.forget_after_s
        ]
        for type_name in gone:
            del self._types[type_name]
        return sorted(appeared), sorted(gone)

    def feedable(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        *,
        also: Iterable[str] = (),
        read: Iterable[str] = (),
    ) -> list[SubtaskSpec]:
        """A subtask spec for every known type that sensors of these shapes can feed, by
        name: one that reads other types' answers is included when each of those is fed,
        here or by the ``also`` types (a plan's listed ones). A type that answers features
        is included only when an included type, or a ``read`` one (what the plan's listed
        types read), reads it: nothing else could use its answer, and fusion cannot."""
        candidates = sorted(
            (k for k in self._types.values() if k.can_feed(shapes)), key=lambda k: k.type
        )
        fed = set(also) | {k.type for k in candidates if not k.upstream}
        grew = True
        while grew:
            grew = False
            for known in candidates:
                if known.type not in fed and all(u in fed for u in known.upstream):
                    fed.add(known.type)
                    grew = True
        chosen = [known for known in candidates if known.type in fed]
        wanted = set(read)
        shrank = True
        while shrank:  # dropping an unread stage may leave its own upstream unread
            readers = wanted | {u for known in chosen for u in known.spec().upstream}
            kept = [k for k in chosen if k.output != "features" or k.type in readers]
            shrank = len(kept) < len(chosen)
            chosen = kept
        return [known.spec() for known in chosen]


def chain_problems(
    specs: Sequence[SubtaskSpec], fused: Sequence[str], known: Mapping[str, KnownType]
) -> list[str]:
    """What cannot work in a plan's chain given what the running types declare: a stage
    whose card does not read an upstream the plan gives it, an upstream whose output shape
    is not what its reader takes, a fused type that answers features. Types not running
    are not judged. One sentence each."""
    problems = []
    for spec in specs:
        reader = known.get(spec.type)
        if spec.type in fused and reader is not None and reader.output == "features":
            problems.append(
                f"type {spec.type!r} is fused but answers features, which fusion cannot "
                "combine: let another type read it, or take it out of fuse"
            )
        if reader is None:
            continue
        takes = {i.sensor: i for i in reader.inputs if i.stage}
        for upstream in spec.upstream:
            wanted = takes.get(upstream)
            if wanted is None:
                problems.append(
                    f"type {spec.type!r} reads {upstream!r} in the plan, but its card has no "
                    f"stage input {upstream!r} (it reads {', '.join(takes) or 'none'})"
                )
                continue
            source = known.get(upstream)
            if source is None or not wanted.shape:
                continue
            given = source.output_shape
            if len(given) != len(wanted.shape) or any(
                w and g and w != g for w, g in zip(wanted.shape, given, strict=True)
            ):
                problems.append(
                    f"type {spec.type!r} reads {upstream!r} as shape {list(wanted.shape)}, but "
                    f"{upstream!r} answers {source.output} of shape {list(given)}"
                )
    return problems
