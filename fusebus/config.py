"""Plans from a TOML file: how each stream is windowed, decomposed, bounded and fused.

::

    [default]                         # every stream without a section of its own
    deadline_ms = 2000
    max_inflight = 200
    overflow = "drop_oldest"          # or "block"
    types = "auto"                    # optional: also every discovered agent type

    [default.window]                  # for per-sensor streams
    size_ms = 10000
    hop_ms = 10000
    rate_hz = 10                      # sensors are resampled onto this grid
    lateness_ms = 1000
    max_gap_ms = 300                  # a longer gap makes the sensor missing (default 3 samples)

    [default.sensors.accel]
    required = true
    max_silence_ms = 3000

    [default.subtasks.accel]
    sensors = ["accel"]               # or [{ sensor = "watch", channels = [0, 1, 2] }]

    [default.subtasks.head]           # a stage: reads other types' answers of the window
    after = ["enc_accel", { type = "enc_gyro", optional = true }]
    # fuse = ["head", "accel"]        # in [default]: fused types (default: those none reads)

    [default.fusion]
    strategy = "weighted_mean"        # mean, majority_vote, max_confidence, threshold, k_of_n
    weights = { accel = 0.9 }
    target = "running"                # threshold rules only
    threshold = 0.8
    k = 2

    [streams.watch-7]                 # a stream's own plan: its keys replace the default's
    deadline_ms = 500

    [agents.accel]                    # what `up --config` and `eval --config` run per type
    model = "accel"                   # a shipped model's name, or a .tflite/.keras file
                                      # (relative to this file), with its .json card beside it
    [agents.stats]
    agent = "stats"                   # or: a name registered under fusebus.agents, module:Class
    params = { source = "accel" }     # keyword arguments of that class (it is also given type)

    [topology]                        # how the streams are kept (flags and FUSEBUS_* win)
    replicas = 3                      # copies of every stream and bucket, on a NATS cluster
    storage = "file"                  # or "memory"
    placement_tags = ["ssd"]          # servers a stream may be placed on
    placement_cluster = "east"

Only entry points read this file; the coordinator and the fusion agent get the validated
:class:`~coordinator.Plan` and :class:`~agents.fusion.FusionSpec` objects. Every problem is
one :class:`~schemas.ConfigError` naming the file, the key and what is wrong.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from agents.fusion import FusionSpec
from coordinator import Plan, PlanBook, SensorInput, StageInput, SubtaskSpec
from coordinator.plan import SensorSpec, WindowSpec
from fusebus.paths import models_dir
from schemas import ConfigError, FusebusError
from schemas.limits import check_name

T = TypeVar("T")

PLAN_KEYS = {
    "deadline_ms",
    "max_inflight",
    "overflow",
    "types",
    "window",
    "sensors",
    "subtasks",
    "fusion",
    "fuse",
}
WINDOW_KEYS = {"size_ms", "hop_ms", "rate_hz", "lateness_ms", "max_gap_ms"}
SENSOR_KEYS = {"required", "max_silence_ms"}
SUBTASK_KEYS = {"sensors", "after", "model"}
FUSION_KEYS = {"strategy", "weights", "target", "threshold", "k"}
TOPOLOGY_KEYS = {"replicas", "storage", "placement_tags", "placement_cluster"}
AGENT_KEYS = {"model", "agent", "params"}
MODEL_SUFFIXES = (".tflite", ".keras")


@dataclass(frozen=True)
class AgentEntry:
    """One ``[agents.<type>]`` table: the subtask type served, and by what, either a model
    file (with its card beside it) or an agent class with keyword ``params`` (as text, as
    ``fusebus agent --param`` gives them; the class is also given ``type``)."""

    type: str
    model: Path | None = None
    agent: str | None = None  # a name registered under fusebus.agents, or module:Class
    params: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Deployment:
    """Everything a plans file says: the plan book and the fusion spec of each stream."""

    plans: PlanBook
    fusion_default: FusionSpec = field(default_factory=FusionSpec)
    fusion_by_stream: dict[str, FusionSpec] = field(default_factory=dict)
    # [topology]: TopologySettings fields the file sets (replicas, storage, placement).
    topology: dict[str, Any] = field(default_factory=dict)
    # [agents]: what `up` and `eval` run, by type (empty: the file names none).
    agents: dict[str, AgentEntry] = field(default_factory=dict)
    source: str = "config"  # the file, for messages about it


def load_deployment(path: Path) -> Deployment:
    """Read and validate a plans file."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return parse_deployment(raw, source=str(path), base=path.parent)


def parse_deployment(
    raw: dict[str, Any], *, source: str = "config", base: Path | None = None
) -> Deployment:
    """Validate a parsed plans document (see the module docs for its layout); model files
    in ``[agents]`` are relative to ``base`` (the file's folder)."""
    _no_unknown(raw, {"default", "streams", "topology", "agents"}, source)
    default_raw = _table(raw.get("default", {}), f"{source}: default")
    streams_raw = _table(raw.get("streams", {}), f"{source}: streams")
    default_plan = _plan(default_raw, f"{source}: default") if default_raw else None
    plans, fusion = {}, {}
    for stream, body in streams_raw.items():
        where = f"{source}: streams.{stream}"
        merged = {**default_raw, **_table(body, where)}
        plans[stream] = _plan(merged, where)
        fusion[stream] = _fusion(merged.get("fusion", {}), f"{where}.fusion")
    if default_plan is None and not plans:
        raise ConfigError(f"{source}: needs a [default] plan or at least one [streams.<id>] plan")
    try:
        book = PlanBook(plans, default=default_plan)
    except FusebusError as exc:
        raise ConfigError(f"{source}: streams: {exc}") from None
    return Deployment(
        plans=book,
        fusion_default=_fusion(default_raw.get("fusion", {}), f"{source}: default.fusion"),
        fusion_by_stream=fusion,
        topology=_topology(_table(raw.get("topology", {}), f"{source}: topology"), source),
        agents=_agents(_table(raw.get("agents", {}), f"{source}: agents"), book, source, base),
        source=source,
    )


def _agents(
    body: dict[str, Any], book: PlanBook, source: str, base: Path | None
) -> dict[str, AgentEntry]:
    """The ``[agents]`` tables, checked: one per type the plans list, each naming a model or
    an agent class."""
    entries = {}
    for type_name, spec in body.items():
        where = f"{source}: agents.{type_name}"
        try:
            check_name(type_name, "type")
        except FusebusError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        item = _table(spec, where)
        _no_unknown(item, AGENT_KEYS, where)
        if "model" in item and "agent" in item:
            raise ConfigError(f"{where}: names both a model and an agent class; give one")
        if "model" not in item and "agent" not in item:
            raise ConfigError(
                f"{where}: needs model (a shipped model's name or a .tflite/.keras file) or "
                "agent (a registered name or module:Class)"
            )
        if "model" in item:
            if "params" in item:
                raise ConfigError(
                    f"{where}.params: only an agent class takes params (a model's card says "
                    "what it reads)"
                )
            entries[type_name] = AgentEntry(
                type_name, model=_model_path(item["model"], where, base)
            )
            continue
        agent = item["agent"]
        if not isinstance(agent, str) or not agent:
            raise ConfigError(f"{where}.agent: must be a non-empty string, got {agent!r}")
        params = _table(item.get("params", {}), f"{where}.params")
        entries[type_name] = AgentEntry(
            type_name, agent=agent, params=_param_text(params, f"{where}.params")
        )
    if entries and not book.any_auto:
        listed = book.listed_types
        for type_name in entries:
            if type_name not in listed:
                raise ConfigError(
                    f"{source}: agents.{type_name}: no plan lists the type {type_name!r} "
                    f"(they list {', '.join(listed)})"
                )
        unserved = [t for t in listed if t not in entries]
        if unserved:
            raise ConfigError(
                f"{source}: agents: no [agents.{unserved[0]}] for the type {unserved[0]!r} "
                "that the plans list (with an [agents] table, each listed type needs one)"
            )
    return entries


def _model_path(value: Any, where: str, base: Path | None) -> Path:
    """A shipped model's name (``accel``) or a model file, relative to ``base``."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}.model: must be a non-empty string, got {value!r}")
    path = Path(value)
    if not path.suffix:
        shipped = models_dir() / f"{value}.tflite"
        if not shipped.exists():
            raise ConfigError(
                f"{where}.model: no shipped model {value!r} in {models_dir()} (or give a "
                ".tflite/.keras file)"
            )
        return shipped
    if path.suffix not in MODEL_SUFFIXES:
        raise ConfigError(
            f"{where}.model: {value!r} is neither a shipped model's name nor a .tflite/.keras file"
        )
    path = path if path.is_absolute() or base is None else base / path
    if not path.exists():
        raise ConfigError(f"{where}.model: file {path} does not exist")
    return path


def _param_text(params: dict[str, Any], where: str) -> dict[str, str]:
    """Keyword arguments as the text ``--param KEY=VALUE`` would give (true/false for
    booleans), so an agent gets the same values in ``up``'s processes and in ``eval``."""
    text = {}
    for key, value in params.items():
        if not key.isidentifier():
            raise ConfigError(f"{where}.{key}: not a keyword argument name")
        if isinstance(value, bool):
            text[key] = "true" if value else "false"
        elif isinstance(value, int | float | str):
            text[key] = str(value)
        else:
            raise ConfigError(
                f"{where}.{key}: must be a string, number or boolean, got {type(value).__name__}"
            )
        if key == "type":
            raise ConfigError(f"{where}.type: the type is the table's name, not a param")
    return text


def _topology(body: dict[str, Any], source: str) -> dict[str, Any]:
    """The ``[topology]`` table, checked; the keys are TopologySettings fields."""
    where = f"{source}: topology"
    _no_unknown(body, TOPOLOGY_KEYS, where)
    found: dict[str, Any] = {}
    if "replicas" in body:
        replicas = body["replicas"]
        if isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas <= 5:
            raise ConfigError(f"{where}.replicas: must be an integer 1 to 5, got {replicas!r}")
        found["replicas"] = replicas
    if "storage" in body:
        if body["storage"] not in ("file", "memory"):
            raise ConfigError(
                f'{where}.storage: must be "file" or "memory", got {body["storage"]!r}'
            )
        found["storage"] = body["storage"]
    if "placement_tags" in body:
        tags = body["placement_tags"]
        if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
            raise ConfigError(f"{where}.placement_tags: must be a list of non-empty strings")
        found["placement_tags"] = tuple(tags)
    if "placement_cluster" in body:
        cluster = body["placement_cluster"]
        if not isinstance(cluster, str) or not cluster:
            raise ConfigError(f"{where}.placement_cluster: must be a non-empty string")
        found["placement_cluster"] = cluster
    return found


def _plan(body: dict[str, Any], where: str) -> Plan:
    _no_unknown(body, PLAN_KEYS, where)
    types = body.get("types")
    if types not in (None, "auto"):
        raise ConfigError(f'{where}.types: only "auto" is allowed here, got {types!r}')
    window = None
    if "window" in body:
        w = _table(body["window"], f"{where}.window")
        _no_unknown(w, WINDOW_KEYS, f"{where}.window")
        window = _build(WindowSpec, f"{where}.window", **_numbers(w, f"{where}.window"))
    sensors = []
    for name, spec in _table(body.get("sensors", {}), f"{where}.sensors").items():
        s = _table(spec, f"{where}.sensors.{name}")
        _no_unknown(s, SENSOR_KEYS, f"{where}.sensors.{name}")
        sensors.append(_build(SensorSpec, f"{where}.sensors.{name}", name=name, **s))
    subtasks = []
    for type_name, spec in _table(body.get("subtasks", {}), f"{where}.subtasks").items():
        s = _table(spec, f"{where}.subtasks.{type_name}")
        _no_unknown(s, SUBTASK_KEYS, f"{where}.subtasks.{type_name}")
        inputs = tuple(
            _input(i, f"{where}.subtasks.{type_name}.sensors")
            for i in _list(s.get("sensors", []), f"{where}.subtasks.{type_name}.sensors")
        )
        after = tuple(
            _after(i, f"{where}.subtasks.{type_name}.after")
            for i in _list(s.get("after", []), f"{where}.subtasks.{type_name}.after")
        )
        subtasks.append(
            _build(
                SubtaskSpec,
                f"{where}.subtasks.{type_name}",
                type=type_name,
                inputs=inputs,
                after=after,
                model=_pin(s, f"{where}.subtasks.{type_name}.model"),
            )
        )
    fuse = _list(body.get("fuse", []), f"{where}.fuse")
    if not all(isinstance(t, str) for t in fuse):
        raise ConfigError(f"{where}.fuse: must be a list of type names, got {fuse!r}")
    settings = {k: body[k] for k in ("deadline_ms", "max_inflight", "overflow") if k in body}
    for key in ("deadline_ms", "max_inflight"):
        if key in settings and (
            not isinstance(settings[key], int | float) or isinstance(settings[key], bool)
        ):
            raise ConfigError(f"{where}.{key}: must be a number, got {settings[key]!r}")
    return _build(
        Plan,
        where,
        subtasks=tuple(subtasks),
        auto=types == "auto",
        window=window,
        sensors=tuple(sensors),
        fuse=tuple(fuse),
        **settings,
    )


def _input(value: Any, where: str) -> SensorInput:
    if isinstance(value, str):
        return _build(SensorInput, where, sensor=value)
    item = _table(value, where)
    _no_unknown(item, {"sensor", "channels"}, where)
    channels = item.get("channels")
    if channels is not None and not (
        isinstance(channels, list) and all(isinstance(c, int) for c in channels)
    ):
        raise ConfigError(f"{where}: channels must be a list of integers, got {channels!r}")
    return _build(
        SensorInput,
        where,
        sensor=item.get("sensor", ""),
        channels=tuple(channels) if channels else None,
    )


def _after(value: Any, where: str) -> StageInput:
    if isinstance(value, str):
        return _build(StageInput, where, type=value)
    item = _table(value, where)
    _no_unknown(item, {"type", "optional"}, where)
    optional = item.get("optional", False)
    if not isinstance(optional, bool):
        raise ConfigError(f"{where}: optional must be true or false, got {optional!r}")
    return _build(StageInput, where, type=item.get("type", ""), optional=optional)


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: must be a list, got {type(value).__name__}")
    return value


def _fusion(value: Any, where: str) -> FusionSpec:
    body = _table(value, where)
    _no_unknown(body, FUSION_KEYS, where)
    weights = _table(body.get("weights", {}), f"{where}.weights")
    return _build(FusionSpec, where, **{**body, "weights": _numbers(weights, f"{where}.weights")})


def _build(cls: Callable[..., T], where: str, **kwargs: Any) -> T:
    try:
        return cls(**kwargs)
    except FusebusError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except TypeError as exc:
        missing = re.search(r"required (?:keyword-only |positional )?arguments?: (.+)$", str(exc))
        if missing:
            raise ConfigError(
                f"{where}: missing key {missing.group(1).split(' and ')[0]}"
            ) from None
        raise ConfigError(f"{where}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a table, got {type(value).__name__}")
    return value


def _numbers(body: dict[str, Any], where: str) -> dict[str, float]:
    for key, value in body.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{where}.{key}: must be a number, got {value!r}")
    return {k: float(v) for k, v in body.items()}


def _no_unknown(body: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})"
        )


def _pin(body: dict[str, Any], where: str) -> str:
    """A subtask's pinned model: a model's name when the key is given, else none."""
    if "model" not in body:
        return ""
    value = body["model"]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: must name a model (a registry name or a file's stem)")
    return value
