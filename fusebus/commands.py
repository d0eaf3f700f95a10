"""What each ``fusebus`` subcommand does, once :mod:`fusebus.cli` has parsed its arguments.

Imports happen inside the commands so that each process loads only what it runs (a LiteRT
agent never imports TensorFlow or matplotlib).
"""

from __future__ import annotations

import argparse
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


async def run_command(args: argparse.Namespace) -> int:
    """Run the long-running or one-shot command ``args.command``; returns the exit code."""
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
        coordinator_settings = CoordinatorSettings(
            name=args.name,
            drain_timeout_s=args.drain_s,
            subtask_batch=args.subtask_batch,
            durable_intake=args.durable_intake,
        )
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


def train(args: argparse.Namespace) -> int:
    """``fusebus train``: train the shipped models again."""
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
