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

from schemas import FusebusError

DEFAULT_URL = "nats://127.0.0.1:4222"
# Mirrors fusebus.evaluate.DEFAULT_STRATEGIES, kept here so `--help` does not import numpy.
DEFAULT_STRATEGIES = ("weighted_mean", "mean", "majority_vote", "max_confidence")


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
        default=os.environ.get("FUSEBUS_MANAGE_TOPOLOGY", "1") not in ("0", "false", "no"),
        help="do not create streams, only wait for them (for roles without stream rights)",
    )
    group.add_argument(
        "--connect-wait-s",
        type=float,
        default=float(os.environ.get("FUSEBUS_CONNECT_WAIT_S", "5")),
        help="how long to wait for the server at start (default: 5)",
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
    """The full ``fusebus`` argument parser."""
    parser = _Parser(
        prog="fusebus", description="ML model agents fusing live sensor data over NATS."
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    env_url = os.environ.get("FUSEBUS_NATS_URL")

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
        "--deadline-ms", type=_positive(float), default=2000.0, help="task deadline (default: 2000)"
    )
    up.add_argument(
        "--agents", default="accel,gyro", help="agent types to start (default: accel,gyro)"
    )
    up.add_argument(
        "--log-dir", type=Path, help="folder for each process's log (default: a temp folder)"
    )

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
    coordinator.add_argument("--name", default="main", help="journal name (one per coordinator)")
    coordinator.add_argument(
        "--record",
        action="store_true",
        help="also keep sensor chunks and frames in the SENSORS stream (for `fusebus record`)",
    )
    coordinator.add_argument(
        "--drain-s",
        type=float,
        default=0.0,
        help="on SIGTERM, wait up to this long for open tasks to end (default: 0)",
    )

    agent = commands.add_parser("agent", help="run one agent replica")
    _bus_options(agent, url_default=env_url or DEFAULT_URL)
    which = agent.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--model",
        help="model file (.tflite or .keras) with a .json card beside it, or a shipped model's name",
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
    agent.add_argument("--max-wait-ms", type=float, default=1.0)

    status = commands.add_parser("status", help="list running agents by type, with their counters")
    _bus_options(status, url_default=env_url or DEFAULT_URL)
    status.add_argument(
        "--timeout-s", type=_positive(float), default=0.5, help="how long to wait for replies"
    )
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    status.add_argument("--interval-s", type=_positive(float), default=1.0, help="refresh interval")
    status.add_argument("--count", type=_positive(int), help="with --watch: stop after N refreshes")

    fusion = commands.add_parser("fusion", help="run the fusion agent")
    _bus_options(fusion, url_default=env_url or DEFAULT_URL)
    fusion.add_argument("--config", type=Path, help="plans file (TOML) with [*.fusion] tables")
    fusion.add_argument(
        "--strategy",
        default=None,
        help="strategy for streams the config does not set: mean, weighted_mean (default), "
        "majority_vote, max_confidence, threshold, k_of_n",
    )
    fusion.add_argument("--target", help="label a threshold rule watches")
    fusion.add_argument("--threshold", type=float, default=0.5, help="score a threshold rule needs")
    fusion.add_argument(
        "--k", type=_positive(int), default=1, help="agents k_of_n needs past the threshold"
    )
    fusion.add_argument(
        "--name", default="fusion", help="consumer and dedup name of this fusion agent"
    )
    fusion.add_argument(
        "--weight",
        type=_weight,
        action="append",
        default=[],
        metavar="TYPE=W",
        help="fusion weight of a type, overriding the agents' own (repeatable)",
    )

    replay = commands.add_parser(
        "replay", help="replay a dataset (or a recording file) as live sensors"
    )
    _bus_options(replay, url_default=env_url or DEFAULT_URL)
    replay.add_argument("source", help="dataset name (basicmotions) or a recording file")
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

    recorder = commands.add_parser("record", help="write recorded sensor traffic to a file")
    _bus_options(recorder, url_default=env_url or DEFAULT_URL)
    recorder.add_argument("--out", type=Path, required=True, help="recording file to write")
    recorder.add_argument(
        "--last-s", type=_positive(float), help="only the last N seconds (default: all kept)"
    )

    evaluate = commands.add_parser(
        "eval", help="measure agents and fusion strategies on a TEST split"
    )
    evaluate.add_argument(
        "--nats-url", default=env_url, help="NATS server; default: start an embedded one"
    )
    evaluate.add_argument("--dataset", default="basicmotions")
    evaluate.add_argument(
        "--agents",
        default="accel,gyro,motion",
        help="agent types (shipped models or registered agents)",
    )
    evaluate.add_argument(
        "--strategies", default=",".join(DEFAULT_STRATEGIES), help="first one is the default"
    )
    evaluate.add_argument("--rate", type=_positive(float), default=100.0, help="frames per second")
    evaluate.add_argument("--deadline-ms", type=_positive(float), default=500.0)
    evaluate.add_argument(
        "--out", type=Path, default=Path("out/eval"), help="folder for eval.md and confusion.png"
    )
    evaluate.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default="warning"
    )
    evaluate.add_argument("--log-format", choices=("auto", "json", "console"), default="auto")

    train = commands.add_parser("train", help="train the shipped models again (needs TensorFlow)")
    train.add_argument("--out", type=Path, default=None, help="output folder (default: models/)")
    train.add_argument("--seed", type=int, default=7)
    return parser


def _bus_settings(args: argparse.Namespace, url: str) -> Any:
    from bus import BusSettings

    password = args.password
    return BusSettings(
        url=url,
        prefix=args.prefix,
        user=args.user,
        password=password,
        token=args.token,
        creds_file=args.creds,
        wait_for_server_s=args.connect_wait_s,
    )


def _topology(args: argparse.Namespace, **overrides: Any) -> Any:
    from bus import TopologySettings

    return TopologySettings(manage=args.manage_topology, **overrides)


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _resolve_model(text: str) -> Path:
    from fusebus.paths import models_dir

    path = Path(text)
    if path.exists() or path.suffix:
        return path
    return models_dir() / f"{text}.tflite"


async def _run(args: argparse.Namespace) -> int:
    from bus import Subjects

    if args.command == "eval":
        from fusebus.evaluate import EvalSettings, render_markdown, run_eval

        eval_settings = EvalSettings(
            dataset=args.dataset,
            agents=_names(args.agents),
            strategies=_names(args.strategies),
            rate_hz=args.rate,
            deadline_ms=args.deadline_ms,
            out_dir=args.out,
            nats_url=args.nats_url,
        )
        rows, markdown, picture = await run_eval(eval_settings)
        print(render_markdown(rows, title="results"))
        print(f"wrote {markdown} and {picture}")
        return 0
    if args.command == "up":
        from fusebus.up import UpSettings, run_up

        agents = tuple(a.strip() for a in args.agents.split(",") if a.strip())
        return await run_up(
            UpSettings(
                nats_url=args.nats_url,
                prefix=args.prefix,
                frames=args.frames,
                speed=args.speed,
                rate_hz=args.rate,
                deadline_ms=args.deadline_ms,
                agents=agents,
                log_dir=args.log_dir,
            )
        )

    bus = _bus_settings(args, args.nats_url)
    subjects = Subjects(bus.prefix)
    from fusebus.components import serve

    if args.command == "coordinator":
        from coordinator import Coordinator, CoordinatorSettings, PlanBook
        from coordinator.plan import BUILTIN_PLANS
        from fusebus.config import load_deployment

        if args.config is not None:
            plans = load_deployment(args.config).plans
        else:
            make_plan = BUILTIN_PLANS.get(args.plan)
            if make_plan is None:
                raise _usage(
                    f"unknown plan {args.plan!r}; known: {', '.join(sorted(BUILTIN_PLANS))}"
                )
            plans = PlanBook(
                default=make_plan(deadline_ms=args.deadline_ms, max_inflight=args.max_inflight)
            )
        coordinator_settings = CoordinatorSettings(name=args.name, drain_timeout_s=args.drain_s)
        topology = _topology(args, record_sensors=args.record)
        return await serve(
            lambda nc: Coordinator(
                nc, plans=plans, subjects=subjects, settings=coordinator_settings, topology=topology
            ).start(),
            bus=bus,
            name="coordinator",
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
        )
    if args.command == "agent":
        from agents import AgentRuntime, AgentSettings, ModelAgent
        from agents.loading import load_agent

        settings = AgentSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
        if args.agent_spec:
            params = dict(args.param)
            if args.type_name:
                params["type"] = args.type_name
            model = load_agent(args.agent_spec, params)
        else:
            model = ModelAgent(_resolve_model(args.model), type_name=args.type_name)
        return await serve(
            lambda nc: AgentRuntime(
                model, nc, subjects=subjects, settings=settings, topology=_topology(args)
            ).start(),
            bus=bus,
            name=f"agent-{model.type}",
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
        )
    if args.command == "status":
        from bus import connect
        from fusebus.status import watch_status

        nc = await connect(bus, name="status")
        try:
            await watch_status(
                nc,
                prefix=bus.prefix,
                timeout_s=args.timeout_s,
                watch=args.watch,
                interval_s=args.interval_s,
                count=args.count,
            )
        finally:
            await nc.drain()
        return 0
    if args.command == "fusion":
        from agents.fusion import FusionAgent, FusionSpec
        from fusebus.config import load_deployment

        deployment = load_deployment(args.config) if args.config is not None else None
        if args.strategy is not None or deployment is None:
            default = FusionSpec(
                strategy=args.strategy or "weighted_mean",
                weights=dict(args.weight),
                target=args.target,
                threshold=args.threshold,
                k=args.k,
            )
        else:
            default = deployment.fusion_default
        by_stream = {
            s: spec.build()
            for s, spec in (deployment.fusion_by_stream if deployment else {}).items()
        }
        return await serve(
            lambda nc: FusionAgent(
                nc,
                subjects=subjects,
                strategy=default.build(),
                strategies=by_stream,
                name=args.name,
                topology=_topology(args),
            ).start(),
            bus=bus,
            name="fusion",
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
        )
    if args.command == "replay":
        from bus import connect
        from fusebus.replay import Imperfections, ReplayRequest, is_recording, run_replay

        is_recording(args.source)  # an unknown name fails here, before connecting
        request = ReplayRequest(
            source=args.source,
            stream=args.stream,
            streams=args.streams,
            speed=args.speed,
            chunk_ms=args.chunk_ms,
            split=args.split,
            limit=args.limit,
            frames=args.frames,
            rate_hz=args.rate,
            wait=args.wait,
            imperfections=Imperfections(
                jitter_ms=args.jitter_ms,
                reorder=args.reorder,
                gap_rate=args.gap_rate,
                dropout=args.dropout,
                seed=args.seed,
            ),
        )
        nc = await connect(bus, name="replay")
        try:
            print(await run_replay(nc, subjects, request))
        finally:
            await nc.drain()
        return 0
    if args.command == "record":
        from bus import connect
        from fusebus.recording import record

        nc = await connect(bus, name="record")
        try:
            count = await record(nc, subjects, args.out, since_s=args.last_s)
        finally:
            await nc.drain()
        print(f"recorded {count} messages to {args.out}")
        return 0
    raise _usage(f"unknown command {args.command!r}")


def _train(args: argparse.Namespace) -> int:
    from agents.training import TrainingSettings, train_sensor_model
    from fusebus.datasets import load_basicmotions
    from fusebus.paths import models_dir

    dataset = load_basicmotions()
    out = args.out or models_dir()
    for sensor in dataset.sensors:
        card = train_sensor_model(
            type_name=sensor,
            sensor=sensor,
            x_train=dataset.sensor_view(dataset.x_train, sensor),
            y_train=dataset.y_train,
            x_test=dataset.sensor_view(dataset.x_test, sensor),
            y_test=dataset.y_test,
            labels=dataset.labels,
            out_dir=out,
            settings=TrainingSettings(seed=args.seed),
        )
        print(f"{sensor}: {card.metrics} -> {out}")
    return 0


class _UsageError(FusebusError, ValueError):
    """A command-line value that cannot be used."""


def _usage(message: str) -> _UsageError:
    return _UsageError(message)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fusebus`` command."""
    args = build_parser().parse_args(argv)
    from fusebus.logs import configure_logging

    configure_logging(
        level=getattr(args, "log_level", "info"), fmt=getattr(args, "log_format", "auto")
    )
    try:
        if args.command == "train":
            return _train(args)
        return asyncio.run(_run(args))
    except FusebusError as exc:
        print(f"fusebus {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
