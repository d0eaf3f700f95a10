"""What each ``fusebus`` subcommand does, once :mod:`fusebus.cli` has parsed its arguments.

Imports happen inside the commands so that each process loads only what it runs (a LiteRT
agent never imports TensorFlow or matplotlib).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from schemas import FusebusError

if TYPE_CHECKING:
    from agents.fusion import FusionSpec
    from fusebus.config import Deployment


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


def _topology(
    args: argparse.Namespace, deployment: Deployment | None = None, **overrides: Any
) -> Any:
    """The topology settings: each of replicas, storage and placement from its flag (or
    FUSEBUS_* variable, the flag's default), else the config's ``[topology]``, else the
    default."""
    from bus import TopologySettings

    flags = {
        "replicas": args.replicas,
        "storage": args.storage,
        "placement_tags": args.placement_tags,
        "placement_cluster": args.placement_cluster,
    }
    chosen = dict(deployment.topology) if deployment is not None else {}
    chosen.update({key: value for key, value in flags.items() if value is not None})
    return TopologySettings(
        manage=args.manage_topology, partitions=args.partitions, **chosen, **overrides
    )


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _resolve_model(text: str) -> Path:
    from fusebus.paths import models_dir

    path = Path(text)
    if path.exists() or path.suffix:
        return path
    return models_dir() / f"{text}.tflite"


async def eval_command(args: argparse.Namespace) -> int:
    """``fusebus eval``: every agent alone and fused, with each one missing (with
    ``--config``, its plan and agents, and late fusion alone); prints and writes the table
    and the per-class reports."""
    from fusebus.evaluate import EvalSettings, render_markdown, run_eval

    if args.selection is not None:
        return await _eval_selection(args)
    if args.config is not None and args.agents is not None:
        raise _usage("--agents does not apply with --config: its [agents] table names them")
    settings = EvalSettings(
        dataset=args.dataset,
        spec=args.spec,
        agents=_names(args.agents or "accel,gyro,motion"),
        strategies=_names(args.strategies) if args.strategies is not None else None,
        rate_hz=100.0 if args.rate is None else args.rate,
        deadline_ms=args.deadline_ms,
        out_dir=args.out,
        nats_url=args.nats_url,
        config=args.config,
    )
    report = await run_eval(settings)
    print(render_markdown(report.rows, title="results"))
    print(report.class_reports_text)
    print(f"wrote {report.markdown}, {report.class_report} and {report.picture}")
    return 0


async def _eval_selection(args: argparse.Namespace) -> int:
    """``fusebus eval --selection A,B``: each model alone and with selection, under load."""
    from fusebus.selection_eval import SelectionSettings, render_selection, run_selection_eval

    for flag, value in (("--agents", args.agents), ("--config", args.config)):
        if value is not None:
            raise _usage(f"{flag} does not apply with --selection: it names the models")
    settings = SelectionSettings(
        models=_names(args.selection),
        dataset=args.dataset,
        spec=args.spec,
        rate_hz=1000.0 if args.rate is None else args.rate,
        deadline_ms=25.0 if args.deadline_ms is None else args.deadline_ms,
        rounds=args.rounds,
        out_dir=args.out,
        nats_url=args.nats_url,
    )
    rows, path = await run_selection_eval(settings)
    print(render_selection(rows, title="model selection under load"))
    print(f"wrote {path}")
    return 0


async def up(args: argparse.Namespace) -> int:
    """``fusebus up``: the whole system on one machine, fed with the shipped recording."""
    from fusebus.up import UpSettings, run_up

    if args.config is not None:
        for flag, value in (("--agents", args.agents), ("--deadline-ms", args.deadline_ms)):
            if value is not None:
                raise _usage(
                    f"{flag} does not apply with --config: the config's plan and [agents] "
                    "table say what runs"
                )
    return await run_up(
        UpSettings(
            nats_url=args.nats_url,
            prefix=args.prefix,
            frames=args.frames,
            speed=args.speed,
            rate_hz=args.rate,
            deadline_ms=2000.0 if args.deadline_ms is None else args.deadline_ms,
            agents=_names(args.agents or "accel,gyro"),
            log_dir=args.log_dir,
            config=args.config,
        )
    )


async def coordinator(args: argparse.Namespace) -> int:
    """``fusebus coordinator``: windows, subtasks and task tracking, until stopped."""
    from bus import Subjects
    from coordinator import Coordinator, CoordinatorSettings, PlanBook
    from coordinator.plan import BUILTIN_PLANS
    from fusebus.components import serve
    from fusebus.config import load_deployment

    deployment = load_deployment(args.config) if args.config is not None else None
    if deployment is not None:
        plans = deployment.plans
    else:
        make_plan = BUILTIN_PLANS.get(args.plan)
        if make_plan is None:
            raise _usage(f"unknown plan {args.plan!r}; known: {', '.join(sorted(BUILTIN_PLANS))}")
        plans = PlanBook(
            default=make_plan(deadline_ms=args.deadline_ms, max_inflight=args.max_inflight)
        )
    settings = CoordinatorSettings(
        name=args.name,
        drain_timeout_s=args.drain_s,
        subtask_batch=args.subtask_batch,
        durable_intake=args.durable_intake,
        lease_ttl_s=args.lease_ttl_s,
    )
    bus = _bus_settings(args, args.nats_url)
    topology = _topology(args, deployment, record_sensors=args.record)
    return await serve(
        lambda nc: Coordinator(
            nc, plans=plans, subjects=Subjects(bus.prefix), settings=settings, topology=topology
        ).start(),
        bus=bus,
        name="coordinator",
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )


async def agent(args: argparse.Namespace) -> int:
    """``fusebus agent``: one replica serving one subtask type, until stopped."""
    from agents import AgentSettings, ModelAgent
    from agents.follow import start_agent, store_name
    from agents.loading import load_agent
    from agents.serving import Choice
    from bus import Subjects
    from fusebus.components import serve

    settings = AgentSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    topology = _topology(args)
    files: list[Choice] = []
    stored: list[str] = []
    if args.agent_spec:
        params = dict(args.param)
        if args.type_name:
            params["type"] = args.type_name
        files.append(Choice.of(load_agent(args.agent_spec, params)))
    else:
        for spec in args.model:
            name = store_name(spec)
            if name is not None:
                stored.append(name)
                continue
            path = _resolve_model(spec)
            files.append(Choice.of(ModelAgent(path, type_name=args.type_name), path.stem))
    bus = _bus_settings(args, args.nats_url)

    async def start(nc: Any) -> Any:
        return await start_agent(
            nc,
            subjects=Subjects(bus.prefix),
            files=files,
            stored=stored,
            type_name=args.type_name,
            settings=settings,
            topology=topology,
        )

    first = files[0].current.type if files else (args.type_name or stored[0])
    return await serve(
        start,
        bus=bus,
        name=f"agent-{first}",
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )


async def models(args: argparse.Namespace) -> int:
    """``fusebus models ...``: the model registry (see :mod:`fusebus.models`)."""
    from fusebus.models import models_command

    return await models_command(args, _bus_settings(args, args.nats_url), _topology(args))


async def fusion(args: argparse.Namespace) -> int:
    """``fusebus fusion``: one decision per window, until stopped."""
    from agents.fusion import FusionAgent, FusionSettings, FusionSpec
    from bus import Subjects
    from fusebus.components import serve
    from fusebus.config import load_deployment

    deployment = load_deployment(args.config) if args.config is not None else None
    flags = FusionSpec(
        strategy=args.strategy or "weighted_mean",
        weights=dict(args.weight),
        target=args.target,
        threshold=args.threshold,
        k=args.k,
    )
    default, by_stream_specs = fusion_precedence(
        flags if args.strategy is not None else None, deployment, fallback=flags
    )
    by_stream = {s: spec.build() for s, spec in by_stream_specs.items()}
    bus = _bus_settings(args, args.nats_url)
    return await serve(
        lambda nc: FusionAgent(
            nc,
            subjects=Subjects(bus.prefix),
            strategy=default.build(),
            strategies=by_stream,
            name=args.name,
            topology=_topology(args, deployment),
            settings=FusionSettings(lease_ttl_s=args.lease_ttl_s),
        ).start(),
        bus=bus,
        name="fusion",
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )


async def status(args: argparse.Namespace) -> int:
    """``fusebus status``: the running components and their counters, once or refreshed."""
    from bus import connect
    from fusebus.status import watch_status

    bus = _bus_settings(args, args.nats_url)
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


async def decisions(args: argparse.Namespace) -> int:
    """``fusebus decisions``: the stored decisions as a table or JSON lines, followed."""
    import time

    from bus import Subjects, check_token, connect
    from fusebus.decisions import DecisionQuery, parse_since, show_decisions

    if args.stream is not None:
        check_token(args.stream, "stream")
    query = DecisionQuery(
        stream=args.stream,
        since_ns=parse_since(args.since, now_ns=time.time_ns()) if args.since else None,
        from_start=args.from_start,
        follow=args.follow,
        as_json=args.json,
        limit=args.count,
    )
    bus = _bus_settings(args, args.nats_url)
    nc = await connect(bus, name="decisions")
    try:
        await show_decisions(nc, Subjects(bus.prefix), query)
    finally:
        await nc.drain()
    return 0


async def topology(args: argparse.Namespace) -> int:
    """``fusebus topology``: the streams and consumers, and with ``--check`` whether they
    match the settings."""
    from bus import Subjects, connect
    from fusebus.topology import show_topology

    bus = _bus_settings(args, args.nats_url)
    nc = await connect(bus, name="topology")
    try:
        return await show_topology(nc, Subjects(bus.prefix), _topology(args), check=args.check)
    finally:
        await nc.drain()


async def replay(args: argparse.Namespace) -> int:
    """``fusebus replay``: a dataset or a recording sent as live sensors."""
    from bus import Subjects, connect
    from fusebus.datasets import load_dataset
    from fusebus.replay import Imperfections, ReplayRequest, is_recording, run_replay

    if not is_recording(args.source):  # an unknown name or a bad dataset fails before connecting
        load_dataset(args.source, spec=args.spec)
    request = ReplayRequest(
        source=args.source,
        spec=args.spec,
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
    bus = _bus_settings(args, args.nats_url)
    nc = await connect(bus, name="replay")
    try:
        print(await run_replay(nc, Subjects(bus.prefix), request))
    finally:
        await nc.drain()
    return 0


async def record(args: argparse.Namespace) -> int:
    """``fusebus record``: the recorded sensor traffic written to a file."""
    from bus import Subjects, connect
    from fusebus.recording import record as record_to_file

    bus = _bus_settings(args, args.nats_url)
    nc = await connect(bus, name="record")
    try:
        count = await record_to_file(nc, Subjects(bus.prefix), args.out, since_s=args.last_s)
    finally:
        await nc.drain()
    print(f"recorded {count} messages to {args.out}")
    return 0


def fusion_precedence(
    flag: FusionSpec | None, deployment: Deployment | None, *, fallback: FusionSpec
) -> tuple[FusionSpec, dict[str, FusionSpec]]:
    """Which fusion spec each stream gets, in one order: a stream's own ``[streams.<id>.fusion]``
    table first, then ``--strategy`` (``flag``, with its options), then the config's
    ``[default.fusion]``, then ``fallback`` (weighted_mean). Returns the default spec and the
    per-stream ones."""
    by_stream = dict(deployment.fusion_by_stream) if deployment is not None else {}
    if flag is not None:
        return flag, by_stream
    if deployment is not None:
        return deployment.fusion_default, by_stream
    return fallback, by_stream


async def train(args: argparse.Namespace) -> int:
    """``fusebus train``: one classifier per sensor of a dataset (the shipped one by default),
    with ``--models chain`` the model chain's per-sensor encoders and head, with
    ``--models selection`` a large and a small model of the first sensor, or with ``all``
    every one, fitted on its train split and scored once on its TEST split (blocking:
    nothing else runs)."""
    import numpy as np

    from agents.chain_training import train_chain_models
    from agents.selection_training import train_selection_models
    from agents.training import TrainingSettings, train_sensor_model
    from fusebus.datasets import load_dataset
    from fusebus.paths import models_dir

    dataset = load_dataset(args.dataset, spec=args.spec)
    x_train, y_train = dataset.split("train")
    x_test, y_test = dataset.split("test")
    out = args.out or models_dir()
    settings = TrainingSettings(seed=args.seed, epochs=args.epochs)
    counts = np.bincount(y_train, minlength=len(dataset.labels))
    for label, count in zip(dataset.labels, counts, strict=True):
        if count <= settings.val_per_class:
            raise _usage(
                f"label {label!r} has {count} train case(s); training holds "
                f"{settings.val_per_class} of each label out for validation, so it needs "
                f"at least {settings.val_per_class + 1}"
            )
    if args.models in ("classifiers", "all"):
        for sensor in dataset.sensors:
            card = train_sensor_model(
                type_name=sensor,
                sensor=sensor,
                x_train=dataset.sensor_view(x_train, sensor),
                y_train=y_train,
                x_test=dataset.sensor_view(x_test, sensor),
                y_test=y_test,
                labels=dataset.labels,
                out_dir=out,
                settings=settings,
            )
            print(f"{sensor}: {card.metrics} -> {out / sensor}.tflite")
    if args.models in ("chain", "all"):
        cards = train_chain_models(
            train_views={s: dataset.sensor_view(x_train, s) for s in dataset.sensors},
            y_train=y_train,
            test_views={s: dataset.sensor_view(x_test, s) for s in dataset.sensors},
            y_test=y_test,
            labels=dataset.labels,
            out_dir=out,
            dataset=dataset.name,
            settings=settings,
        )
        for type_name, card in cards.items():
            print(f"{type_name}: {card.metrics} -> {out / type_name}.tflite")
    if args.models in ("selection", "all"):
        sensor = next(iter(dataset.sensors))
        cards = train_selection_models(
            type_name=sensor,
            sensor=sensor,
            x_train=dataset.sensor_view(x_train, sensor),
            y_train=y_train,
            x_test=dataset.sensor_view(x_test, sensor),
            y_test=y_test,
            labels=dataset.labels,
            out_dir=out,
            dataset=dataset.name,
            settings=settings,
        )
        for variant, card in cards.items():
            print(f"{sensor}-{variant}: {card.metrics} -> {out / sensor}-{variant}.tflite")
    return 0


#: What runs each command, by the name its subparser gives (see :func:`fusebus.cli.build_parser`).
COMMANDS: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, int]]] = {
    "up": up,
    "coordinator": coordinator,
    "agent": agent,
    "fusion": fusion,
    "status": status,
    "decisions": decisions,
    "topology": topology,
    "replay": replay,
    "record": record,
    "eval": eval_command,
    "train": train,
    "models": models,
}


class _UsageError(FusebusError, ValueError):
    """A command-line value that cannot be used."""


def _usage(message: str) -> _UsageError:
    return _UsageError(message)
