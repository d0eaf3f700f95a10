"""The ``fusebus`` command line.

Every subcommand validates its arguments at the edge; a bad value or a failure the user can
fix ends with one line naming the problem and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from schemas import ConfigError, FusebusError

DEFAULT_URL = "nats://127.0.0.1:4222"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive(kind: type[float] | type[int]) -> Any:
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} must be > 0")
        return value

    return parse


def _weight(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not TYPE=WEIGHT") from None


def _dropout(text: str) -> tuple[str, float, float]:
    sensor, _, rest = text.partition(":")
    start, _, end = rest.partition(":")
    try:
        if not sensor:
            raise ValueError
        return sensor, float(start), float(end)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not SENSOR:START:END") from None


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def _env_flag(name: str, *, default: bool) -> bool:
    """A yes/no environment variable; raises :class:`ConfigError` naming it when it is
    neither."""
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    value = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
    if text.strip().lower() not in value:
        raise ConfigError(f"{name}={text[:40]!r}: expected 1/0, true/false or yes/no")
    return value[text.strip().lower()]


def _env_seconds(name: str, *, default: float) -> float:
    """A duration in seconds (>= 0) from the environment; raises :class:`ConfigError`
    naming the variable when it is not one."""
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        seconds = float(text)
    except ValueError:
        raise ConfigError(f"{name}={text[:40]!r}: expected a number of seconds") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise ConfigError(f"{name}={text[:40]!r}: expected a finite number of seconds >= 0")
    return seconds


def _env_replicas(name: str) -> int | None:
    """A replica count from the environment (1 to 5); raises :class:`ConfigError` naming the
    variable when it is not one."""
    text = os.environ.get(name)
    if text is None or text == "":
        return None
    if not text.strip().isdigit() or not 1 <= int(text) <= 5:
        raise ConfigError(f"{name}={text[:40]!r}: expected a replica count from 1 to 5")
    return int(text)


def _env_choice(name: str, choices: tuple[str, ...]) -> str | None:
    """One of ``choices`` from the environment; raises :class:`ConfigError` naming the
    variable otherwise."""
    text = os.environ.get(name)
    if text is None or text == "":
        return None
    if text.strip() not in choices:
        raise ConfigError(f"{name}={text[:40]!r}: expected one of {', '.join(choices)}")
    return text.strip()


def _tags(text: str) -> tuple[str, ...]:
    return tuple(tag.strip() for tag in text.split(",") if tag.strip())


def _env_count(name: str, *, default: int) -> int:
    """A whole number >= 1 from the environment; raises :class:`ConfigError` naming the
    variable when it is not one."""
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        count = int(text)
    except ValueError:
        raise ConfigError(f"{name}={text[:40]!r}: expected a whole number >= 1") from None
    if count < 1:
        raise ConfigError(f"{name}={text[:40]!r}: expected a whole number >= 1")
    return count


def _bus_options(parser: argparse.ArgumentParser, *, url_default: str | None) -> None:
    group = parser.add_argument_group("bus")
    group.add_argument(
        "--nats-url",
        default=url_default,
        help="NATS server URL(s), comma-separated"
        + ("" if url_default else "; default: start an embedded nats-server"),
    )
    group.add_argument(
        "--prefix",
        default=os.environ.get("FUSEBUS_PREFIX", "fb"),
        help="subject prefix (default: fb)",
    )
    group.add_argument("--user", default=os.environ.get("FUSEBUS_NATS_USER"), help="NATS user")
    group.add_argument(
        "--password", default=os.environ.get("FUSEBUS_NATS_PASSWORD"), help="NATS password"
    )
    group.add_argument("--token", default=os.environ.get("FUSEBUS_NATS_TOKEN"), help="NATS token")
    group.add_argument(
        "--creds", type=Path, default=os.environ.get("FUSEBUS_NATS_CREDS"), help="NATS .creds file"
    )
    group.add_argument(
        "--no-manage-topology",
        dest="manage_topology",
        action="store_false",
        default=_env_flag("FUSEBUS_MANAGE_TOPOLOGY", default=True),
        help="do not create streams, only wait for them (for roles without stream rights)",
    )
    group.add_argument(
        "--connect-wait-s",
        type=float,
        default=_env_seconds("FUSEBUS_CONNECT_WAIT_S", default=5.0),
        help="how long to wait for the server at start (default: 5)",
    )
    streams = parser.add_argument_group(
        "streams (flags win over FUSEBUS_* variables, which win over a config's [topology])"
    )
    streams.add_argument(
        "--replicas",
        type=_positive(int),
        default=_env_replicas("FUSEBUS_REPLICAS"),
        help="copies of every stream, bucket and consumer on a NATS cluster (1-5; default 1); "
        "an existing stream with more keeps them",
    )
    streams.add_argument(
        "--storage",
        choices=("file", "memory"),
        default=_env_choice("FUSEBUS_STORAGE", ("file", "memory")),
        help="storage of the streams created (default: file; existing streams keep theirs)",
    )
    streams.add_argument(
        "--placement-tags",
        type=_tags,
        default=_tags(os.environ.get("FUSEBUS_PLACEMENT_TAGS") or "") or None,
        metavar="TAG,TAG",
        help="place streams only on servers with all these tags",
    )
    streams.add_argument(
        "--placement-cluster",
        default=os.environ.get("FUSEBUS_PLACEMENT_CLUSTER") or None,
        help="place streams in this NATS cluster (of a super-cluster)",
    )
    group.add_argument(
        "--partitions",
        type=_positive(int),
        default=_env_count("FUSEBUS_PARTITIONS", default=1),
        help="partitions of the deployment's stream ids, shared by coordinators and by fusion "
        "agents of one name through leases; the same for every component (default: 1, none)",
    )
    group.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port"
    )
    group.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address of the metrics endpoint (default: loopback)",
    )
    logs = parser.add_argument_group("logging")
    logs.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    logs.add_argument("--log-format", choices=("auto", "json", "console"), default="auto")


def build_parser() -> argparse.ArgumentParser:
    """The full ``fusebus`` argument parser: one subparser per command, each added by its own
    function below and naming the function of :mod:`fusebus.commands` that runs it."""
    parser = _Parser(
        prog="fusebus", description="ML model agents fusing live sensor data over NATS."
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    env_url = os.environ.get("FUSEBUS_NATS_URL")
    for add in (
        _up_parser,
        _coordinator_parser,
        _agent_parser,
        _fusion_parser,
        _status_parser,
        _decisions_parser,
        _topology_parser,
        _replay_parser,
        _record_parser,
        _eval_parser,
        _train_parser,
        _models_parser,
    ):
        add(commands, env_url)
    return parser


def _up_parser(commands: Any, env_url: str | None) -> None:
    up = commands.add_parser("up", help="run everything on one machine with recorded data")
    _bus_options(up, url_default=env_url)
    up.add_argument(
        "--speed",
        type=_positive(float),
        default=100.0,
        help="replay speed, x real time (default: 100, a 10 s recording every 0.1 s)",
    )
    up.add_argument(
        "--frames", action="store_true", help="send pre-aligned frames instead of chunks"
    )
    up.add_argument(
        "--rate", type=_positive(float), default=10.0, help="with --frames: frames per second"
    )
    up.add_argument(
        "--deadline-ms",
        type=_positive(float),
        default=None,
        help="task deadline (default: 2000; with --config, the plan's)",
    )
    up.add_argument("--agents", default=None, help="agent types to start (default: accel,gyro)")
    up.add_argument(
        "--config",
        type=Path,
        help="plans file with an [agents] table (e.g. examples/chain.toml): the coordinator "
        "and fusion read it, and the agents it names are started, one process each "
        "(replaces --agents and --deadline-ms)",
    )
    up.add_argument(
        "--log-dir", type=Path, help="folder for each process's log (default: a temp folder)"
    )
    up.set_defaults(run="up")


def _coordinator_parser(commands: Any, env_url: str | None) -> None:
    coordinator = commands.add_parser("coordinator", help="run the coordinator")
    _bus_options(coordinator, url_default=env_url or DEFAULT_URL)
    coordinator.add_argument(
        "--config",
        type=Path,
        help="plans file (TOML); replaces --plan, --deadline-ms, --max-inflight",
    )
    coordinator.add_argument(
        "--plan",
        default="basicmotions",
        help="built-in plan for every stream: basicmotions or auto",
    )
    coordinator.add_argument("--deadline-ms", type=_positive(float), default=2000.0)
    coordinator.add_argument("--max-inflight", type=_positive(int), default=1000)
    coordinator.add_argument(
        "--name",
        default="main",
        help="journal name (one per coordinator); with --partitions > 1 journals are per "
        "partition and the name only labels this coordinator",
    )
    _lease_option(coordinator)
    coordinator.add_argument(
        "--record",
        action="store_true",
        help="also keep a copy of sensor chunks and frames in the SENSORS stream "
        "(for `fusebus record`)",
    )
    coordinator.add_argument(
        "--drain-s",
        type=float,
        default=0.0,
        help="on SIGTERM, wait up to this long for open tasks to end (default: 0)",
    )
    coordinator.add_argument(
        "--subtask-batch",
        type=_positive(int),
        default=64,
        help="most subtasks of a type sent in one message when windows arrive together "
        "(default: 64; 1 for agents that read only single subtasks)",
    )
    coordinator.add_argument(
        "--no-durable-intake",
        dest="durable_intake",
        action="store_false",
        help="take sensor data from core NATS instead of the INTAKE stream: faster, but what "
        "arrives while the coordinator is down, or before it has made a window durable, is lost",
    )
    coordinator.set_defaults(run="coordinator")


def _lease_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lease-ttl-s",
        type=_positive(float),
        default=_env_seconds("FUSEBUS_LEASE_TTL_S", default=6.0) or 6.0,
        help="with --partitions > 1: a dead member's partitions are taken over about this long "
        "after its last lease renewal (default: 6)",
    )


def _models_parser(commands: Any, env_url: str | None) -> None:
    models = commands.add_parser(
        "models", help="the model registry: store, list, roll out and compare model versions"
    )
    actions = models.add_subparsers(dest="action", required=True, parser_class=_Parser)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(name, help=help_text)
        _bus_options(parser, url_default=env_url or DEFAULT_URL)
        # What a command did is its printed answer; its log lines only say more when asked.
        parser.set_defaults(run="models", log_level="warning")
        return parser

    put = action("put", "check a model file with its card and store it as a new version")
    put.add_argument("path", type=Path, help="the .tflite or .keras file; its .json card beside it")
    put.add_argument("--name", help="registry name (default: the file's stem)")
    put.add_argument("--version", help="version to store it as (default: the card's)")
    action("list", "every stored version, with which serve")
    promote = action("promote", "make a stored version the current one")
    promote.add_argument("name")
    promote.add_argument("version")
    rollback = action("rollback", "make the version current before the current one current again")
    rollback.add_argument("name")
    canary = action("canary", "let a version answer a share of the subtasks (0 ends it)")
    canary.add_argument("name")
    canary.add_argument("version")
    canary.add_argument(
        "share",
        type=_share,
        help="the share of subtasks it answers: 0.1 or 10%%; 0 ends the canary",
    )
    shadow = action("shadow", "run a version beside the current one, its outputs never fused")
    shadow.add_argument("name")
    shadow.add_argument("version", nargs="?", help="the version (omit with --off)")
    shadow.add_argument("--off", action="store_true", help="end the shadow")
    rm = action("rm", "remove a version that does not serve, or a whole model")
    rm.add_argument("name")
    rm.add_argument(
        "version", nargs="?", help="the version (default: every version and the rollout)"
    )
    compare = action("compare", "how a shadow version agrees with the current one")
    compare.add_argument("name")
    compare.add_argument(
        "--dataset",
        help="also score versions on this dataset's TEST split (basicmotions, or an .npz)",
    )
    compare.add_argument(
        "--versions",
        nargs="+",
        help="with --dataset: the versions to score (default: current and shadow or canary)",
    )


def _share(text: str) -> float:
    """A canary share: a fraction in [0, 1) (``0.1``), or a percent with its sign (``10%``)."""
    percent = text.endswith("%")
    try:
        value = float(text[:-1] if percent else text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a share: {text!r} (give 0.1 or 10%)") from None
    if percent:
        value /= 100
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(
            f"a canary share is a fraction in [0, 1) or a percent in [0%, 100%) (promote to "
            f"answer everything), got {text!r}"
        )
    return value


def _agent_parser(commands: Any, env_url: str | None) -> None:
    agent = commands.add_parser("agent", help="run one agent replica")
    _bus_options(agent, url_default=env_url or DEFAULT_URL)
    which = agent.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--model",
        action="append",
        metavar="MODEL",
        help="model file (.tflite or .keras) with a .json card beside it, a shipped model's "
        "name, or store:NAME, a model of the registry, followed as it is rolled out; "
        "repeat to serve the type with several models (the most accurate answers when the "
        "deadline and the backlog leave room, a faster one otherwise)",
    )
    which.add_argument(
        "--agent",
        dest="agent_spec",
        metavar="SPEC",
        help="an agent class as package.module:Class, or a name registered under fusebus.agents",
    )
    agent.add_argument(
        "--type", dest="type_name", help="subtask type to serve (default: the agent's)"
    )
    agent.add_argument(
        "--param",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keyword argument for an --agent class (repeatable)",
    )
    agent.add_argument("--max-batch", type=_positive(int), default=64)
    agent.add_argument("--max-wait-ms", type=float, default=0.0)
    agent.set_defaults(run="agent")


def _fusion_parser(commands: Any, env_url: str | None) -> None:
    from agents.fusion.strategies import DEFAULT_STRATEGY, STRATEGY_TABLE

    fusion = commands.add_parser(
        "fusion",
        help="run the fusion agent",
        epilog="strategies: "
        + "; ".join(f"{name}: {entry.summary}" for name, entry in STRATEGY_TABLE.items()),
    )
    _bus_options(fusion, url_default=env_url or DEFAULT_URL)
    fusion.add_argument("--config", type=Path, help="plans file (TOML) with [*.fusion] tables")
    fusion.add_argument(
        "--strategy",
        default=None,
        choices=tuple(STRATEGY_TABLE),
        help="strategy for every stream without a [streams.<id>.fusion] table of its own "
        f"(replaces the config's [default.fusion]; default: {DEFAULT_STRATEGY})",
    )
    fusion.add_argument("--target", help="label a threshold rule watches")
    fusion.add_argument("--threshold", type=float, default=0.5, help="score a threshold rule needs")
    fusion.add_argument(
        "--k", type=_positive(int), default=1, help="agents k_of_n needs past the threshold"
    )
    fusion.add_argument(
        "--name", default="fusion", help="consumer and dedup name of this fusion agent"
    )
    _lease_option(fusion)
    fusion.add_argument(
        "--weight",
        type=_weight,
        action="append",
        default=[],
        metavar="TYPE=W",
        help="fusion weight of a type, overriding the agents' own (repeatable)",
    )
    fusion.set_defaults(run="fusion")


def _status_parser(commands: Any, env_url: str | None) -> None:
    status = commands.add_parser("status", help="list running agents by type, with their counters")
    _bus_options(status, url_default=env_url or DEFAULT_URL)
    status.add_argument(
        "--timeout-s", type=_positive(float), default=0.5, help="how long to wait for replies"
    )
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    status.add_argument("--interval-s", type=_positive(float), default=1.0, help="refresh interval")
    status.add_argument("--count", type=_positive(int), help="with --watch: stop after N refreshes")
    status.set_defaults(run="status")


def _decisions_parser(commands: Any, env_url: str | None) -> None:
    decisions = commands.add_parser(
        "decisions", help="show the fused decisions, as a table or JSON lines, and follow new ones"
    )
    _bus_options(decisions, url_default=env_url or DEFAULT_URL)
    decisions.add_argument("--stream", help="only this stream's decisions (default: every stream)")
    begin = decisions.add_mutually_exclusive_group()
    begin.add_argument(
        "--since",
        metavar="WHEN",
        help="begin with decisions stored since a duration ago (90s, 10m, 2h, 1d) or an ISO "
        "time (2026-12-02T15:00:00Z)",
    )
    begin.add_argument(
        "--from-start", action="store_true", help="begin with the oldest decision kept"
    )
    decisions.add_argument(
        "--no-follow",
        dest="follow",
        action="store_false",
        help="stop once caught up instead of following new decisions (then the default "
        "beginning is the oldest decision kept)",
    )
    decisions.add_argument("--json", action="store_true", help="one JSON object per line")
    decisions.add_argument("--count", type=_positive(int), help="stop after N decisions")
    decisions.set_defaults(run="decisions")


def _topology_parser(commands: Any, env_url: str | None) -> None:
    topology = commands.add_parser(
        "topology", help="list the streams and consumers with replicas, leader and lag"
    )
    _bus_options(topology, url_default=env_url or DEFAULT_URL)
    topology.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when a stream or consumer does not match --replicas, --storage or the "
        "placement (or a core stream is missing)",
    )
    topology.set_defaults(run="topology")


def _spec_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--spec",
        type=Path,
        help="the TOML spec of a .npz dataset (default: the .toml beside it); see the README",
    )


def _replay_parser(commands: Any, env_url: str | None) -> None:
    replay = commands.add_parser(
        "replay", help="replay a dataset (shipped, your .npz, or a recording file) as live sensors"
    )
    _bus_options(replay, url_default=env_url or DEFAULT_URL)
    replay.add_argument(
        "source",
        help="a shipped dataset's name (basicmotions), your .npz dataset, or a recording file",
    )
    _spec_option(replay)
    replay.add_argument("--stream", default=None, help="stream id (default: the dataset name)")
    replay.add_argument("--streams", type=_positive(int), default=1, help="concurrent streams")
    replay.add_argument(
        "--speed", type=_positive(float), default=1.0, help="x real time (default 1)"
    )
    replay.add_argument(
        "--chunk-ms", type=_positive(float), default=1000.0, help="event time per chunk"
    )
    replay.add_argument(
        "--jitter-ms", type=float, default=0.0, help="send each chunk up to this late"
    )
    replay.add_argument("--reorder", type=int, default=0, help="shuffle chunks within groups of N")
    replay.add_argument("--gap-rate", type=float, default=0.0, help="share of chunks lost")
    replay.add_argument(
        "--dropout",
        type=_dropout,
        metavar="SENSOR:START:END",
        help="a sensor sends nothing between these fractions of the replay, e.g. gyro:0.3:0.6",
    )
    replay.add_argument("--seed", type=int, default=0, help="seed of every injected imperfection")
    replay.add_argument("--split", choices=("train", "test"), default="test")
    replay.add_argument("--limit", type=_positive(int), help="cases per stream")
    replay.add_argument("--frames", action="store_true", help="send pre-aligned frames, not chunks")
    replay.add_argument(
        "--rate", type=_positive(float), default=10.0, help="frames per second (--frames)"
    )
    replay.add_argument(
        "--wait",
        action="store_true",
        help="with --frames: send each frame as a request and wait for the coordinator to accept it",
    )
    replay.set_defaults(run="replay")


def _record_parser(commands: Any, env_url: str | None) -> None:
    recorder = commands.add_parser("record", help="write recorded sensor traffic to a file")
    _bus_options(recorder, url_default=env_url or DEFAULT_URL)
    recorder.add_argument("--out", type=Path, required=True, help="recording file to write")
    recorder.add_argument(
        "--last-s", type=_positive(float), help="only the last N seconds (default: all kept)"
    )
    recorder.set_defaults(run="record")


def _eval_parser(commands: Any, env_url: str | None) -> None:
    from agents.fusion.strategies import CLASSIFYING_STRATEGIES

    evaluate = commands.add_parser(
        "eval", help="measure agents and fusion strategies on a dataset's TEST split"
    )
    evaluate.add_argument(
        "--nats-url", default=env_url, help="NATS server; default: start an embedded one"
    )
    evaluate.add_argument(
        "--dataset", default="basicmotions", help="a shipped dataset's name or your .npz file"
    )
    _spec_option(evaluate)
    evaluate.add_argument(
        "--agents",
        default=None,
        help="agents to fuse, comma-separated: shipped models' names, model files "
        "(.tflite/.keras with their cards), or registered agents (default: accel,gyro,motion)",
    )
    evaluate.add_argument(
        "--config",
        type=Path,
        help="plans file with an [agents] table (e.g. examples/chain.toml): compare its plan "
        "with all its agents, late fusion alone and each agent missing (replaces --agents)",
    )
    evaluate.add_argument(
        "--strategies",
        default=None,
        help="comma-separated; the first one draws the confusion matrix "
        f"(default: {','.join(CLASSIFYING_STRATEGIES)}; with --config, its fusion strategy)",
    )
    evaluate.add_argument(
        "--selection",
        metavar="MODELS",
        help="instead: several models of one type, comma-separated (e.g. "
        "accel-large,accel-small): each alone, then one replica choosing among them by "
        "deadline and backlog, under a load the most accurate cannot keep up with; accuracy, "
        "deadline misses and answers by model (writes selection.md)",
    )
    evaluate.add_argument(
        "--rounds",
        type=_positive(int),
        default=5,
        help="with --selection: times the TEST split is replayed (default: 5)",
    )
    evaluate.add_argument(
        "--rate",
        type=_positive(float),
        default=None,
        help="frames per second (default: 100; with --selection, 1000)",
    )
    evaluate.add_argument(
        "--deadline-ms",
        type=_positive(float),
        default=None,
        help="task deadline (default: 500; with --selection, 25; with --config, the plan's)",
    )
    evaluate.add_argument(
        "--out",
        type=Path,
        default=Path("out/eval"),
        help="folder for eval.md, report.md and confusion.png (with --selection: selection.md)",
    )
    evaluate.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default="warning"
    )
    evaluate.add_argument("--log-format", choices=("auto", "json", "console"), default="auto")
    evaluate.set_defaults(run="eval")


def _train_parser(commands: Any, env_url: str | None) -> None:
    del env_url  # training never touches the bus
    train = commands.add_parser(
        "train",
        help="train one classifier per sensor of a dataset, a model chain's per-sensor "
        "encoders and head, and a large and a small model to select from (needs TensorFlow)",
    )
    train.add_argument(
        "--dataset",
        default="basicmotions",
        help="a shipped dataset's name or your .npz file with a train split (X_train, y_train)",
    )
    _spec_option(train)
    train.add_argument(
        "--out", type=Path, default=None, help="output folder (default: the shipped models/)"
    )
    train.add_argument("--seed", type=int, default=7)
    train.add_argument(
        "--epochs", type=_positive(int), default=120, help="training epochs (default: 120)"
    )
    train.add_argument(
        "--models",
        choices=("classifiers", "chain", "selection", "all"),
        default="classifiers",
        help="classifiers: one per sensor (default); chain: the model chain of "
        "examples/chain.toml, an encoder per sensor (enc_<sensor>) and the head reading their "
        "features and the stats stage's; selection: a costly accurate model and a fast cheap "
        "one of the first sensor (<sensor>-large, <sensor>-small), for an agent that picks "
        "one by deadline; all: every one",
    )
    train.set_defaults(run="train")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fusebus`` command."""
    try:
        parser = build_parser()  # reads the FUSEBUS_* environment defaults
    except ConfigError as exc:
        print(f"fusebus: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    from fusebus.logs import configure_logging

    configure_logging(
        level=getattr(args, "log_level", "info"), fmt=getattr(args, "log_format", "auto")
    )
    from bus import TransportError
    from fusebus.commands import COMMANDS

    try:
        return asyncio.run(COMMANDS[args.run](args))
    except BrokenPipeError:  # the reader went away (`fusebus decisions | head`): done
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  # so the exit's flush has somewhere to go
        return 0
    except FusebusError as exc:
        print(f"fusebus {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except TransportError as exc:  # the server refused or did not answer a request
        print(f"fusebus {args.command}: error: NATS: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
