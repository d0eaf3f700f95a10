"""``fusebus eval``: what fusion buys, measured through the live bus.

For a dataset's TEST split the pipeline runs once with every agent and once with each agent
missing (dropout). In each run a fusion agent per strategy decides every window, so all
strategies see the same results. The table gives each agent alone (from its own results),
each strategy with every agent, and each strategy with each agent missing: accuracy,
macro-F1, complete/partial decisions and latency. It is printed, written as Markdown, and
the default strategy's confusion matrix is drawn as a PNG.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agents import AgentRuntime, ModelAgent
from agents.base import Agent
from agents.fusion import FusionAgent, FusionSpec
from agents.loading import load_agent
from bus import (
    BusSettings,
    EmbeddedServer,
    Producer,
    Subjects,
    TopologySettings,
    connect,
    ensure_streams,
    follow_stored,
)
from bus.types import Connection, Message
from coordinator import Coordinator, Plan, PlanBook, SensorInput, SubtaskSpec
from fusebus.datasets import SensorDataset, load_dataset
from fusebus.paths import models_dir
from fusebus.replay import replay_frames
from schemas import CODEC, ConfigError, Decision, Result

DEFAULT_STRATEGIES = ("weighted_mean", "mean", "majority_vote", "max_confidence")
STREAM = "eval"


@dataclass(frozen=True)
class EvalSettings:
    """What ``fusebus eval`` measures."""

    dataset: str = "basicmotions"
    agents: tuple[str, ...] = ("accel", "gyro", "motion")
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    rate_hz: float = 100.0
    deadline_ms: float = 500.0
    out_dir: Path = Path("out/eval")
    nats_url: str | None = None

    def __post_init__(self) -> None:
        if len(self.agents) < 2:
            raise ConfigError("eval needs at least two agents to fuse")
        if not self.strategies:
            raise ConfigError("eval needs at least one fusion strategy")
        for name in self.strategies:
            if name in ("threshold", "k_of_n"):
                raise ConfigError(
                    f"eval compares classifying strategies; {name!r} is an alarm rule"
                )
            FusionSpec(strategy=name)  # raises ConfigError for an unknown one


@dataclass
class Row:
    """One line of the table."""

    what: str
    strategy: str
    missing: str
    accuracy: float
    macro_f1: float
    complete: int | None
    partial: int | None
    p50_ms: float
    p99_ms: float


@dataclass
class RunResult:
    """What one live run collected."""

    missing: str | None
    decisions: dict[str, list[Decision]] = field(default_factory=lambda: defaultdict(list))
    results: dict[str, list[Result]] = field(default_factory=lambda: defaultdict(list))


def macro_f1(truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> float:
    """Mean over labels of F1 = 2TP / (2TP + FP + FN); a label never seen nor predicted counts 0."""
    scores = []
    for label in labels:
        tp = sum(t == label and p == label for t, p in zip(truth, predicted, strict=True))
        fp = sum(t != label and p == label for t, p in zip(truth, predicted, strict=True))
        fn = sum(t == label and p != label for t, p in zip(truth, predicted, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores))


def confusion(truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Counts of (true label, predicted label); predictions outside ``labels`` are dropped."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(truth, predicted, strict=True):
        if t in index and p in index:
            matrix[index[t], index[p]] += 1
    return matrix


def build_agent(name: str) -> Agent:
    """A shipped model by name, or else a registered agent class."""
    model = models_dir() / f"{name}.tflite"
    if model.exists():
        return ModelAgent(model)
    return load_agent(name)


async def live_run(
    url: str,
    dataset: SensorDataset,
    agents: dict[str, Agent],
    settings: EvalSettings,
    missing: str | None,
) -> tuple[RunResult, dict[int, str]]:
    """Run the TEST split through coordinator, agents (less ``missing``) and one fusion agent
    per strategy; returns what came back and the true label of each window."""
    subjects = Subjects(f"eval{uuid.uuid4().hex[:8]}")
    bus = BusSettings(url=url, prefix=subjects.prefix)
    connections: list[Connection] = []

    async def open_connection(name: str) -> Connection:
        nc = await connect(bus, name=name)
        connections.append(nc)
        return nc

    plan = Plan(
        subtasks=tuple(
            SubtaskSpec(type_name, tuple(SensorInput(spec.sensor) for spec in agent.inputs))
            for type_name, agent in agents.items()
        ),
        deadline_ms=settings.deadline_ms,
    )
    run = RunResult(missing)
    components: list[Any] = []
    nc = await open_connection("eval")
    try:
        await ensure_streams(nc.jetstream(), subjects, TopologySettings())
        for strategy in settings.strategies:
            fusion = FusionAgent(
                await open_connection(f"fusion-{strategy}"),
                subjects=subjects,
                name=f"eval-{strategy}",
                strategy=FusionSpec(strategy=strategy).build(),
            )
            components.append(await fusion.start())
        for type_name, agent in agents.items():
            if type_name != missing:
                runtime = AgentRuntime(agent, await open_connection(type_name), subjects=subjects)
                components.append(await runtime.start())
        coordinator = Coordinator(
            await open_connection("coordinator"), plans=PlanBook(default=plan), subjects=subjects
        )
        components.append(await coordinator.start())

        done = asyncio.Event()
        total = len(dataset.y_test)

        async def on_decision(msg: Message) -> None:
            decision = CODEC.decode(msg.data, Decision)
            run.decisions[decision.strategy].append(decision)
            if all(len(run.decisions[s]) >= total for s in names):
                done.set()

        async def on_result(msg: Message) -> None:
            for result in CODEC.decode_each(msg.data, Result):
                run.results[result.type].append(result)

        names = [FusionSpec(strategy=s).build().name for s in settings.strategies]
        await follow_stored(nc, subjects.decision(STREAM), on_decision)
        await nc.subscribe(subjects.result(STREAM), cb=on_result)
        sent = await replay_frames(
            Producer(nc, subjects), dataset, stream=STREAM, rate_hz=settings.rate_hz
        )
        async with asyncio.timeout(settings.deadline_ms / 1e3 + 30):
            await done.wait()
    finally:
        for component in reversed(components):
            await component.stop()
        for connection in connections:
            with contextlib.suppress(Exception):
                await connection.drain()
    return run, {w.t_start_ns: w.label for w in sent}


def _latencies(values: list[float]) -> tuple[float, float]:
    array = np.array(values) if values else np.zeros(1)
    return float(np.percentile(array, 50)), float(np.percentile(array, 99))


def tabulate(
    runs: list[tuple[RunResult, dict[int, str]]], labels: Sequence[str], strategies: Sequence[str]
) -> list[Row]:
    """Table rows: agents alone, then each strategy (in the given order) with each dropout."""
    rows = []
    full, full_truth = runs[0]
    for type_name, results in sorted(full.results.items()):
        truth = [full_truth[r.window.t_start_ns] for r in results]
        predicted = [
            r.labels[int(np.argmax(r.output))] if r.output is not None else "" for r in results
        ]
        p50, p99 = _latencies([r.latency_ms for r in results])
        rows.append(
            Row(
                f"{type_name} alone",
                "-",
                "-",
                float(np.mean([t == p for t, p in zip(truth, predicted, strict=True)])),
                macro_f1(truth, predicted, labels),
                None,
                None,
                p50,
                p99,
            )
        )
    for strategy in strategies:
        for run, truth_by_window in runs:
            decisions = run.decisions[strategy]
            truth = [truth_by_window[d.window.t_start_ns] for d in decisions]
            predicted = [d.label for d in decisions]
            p50, p99 = _latencies([d.latency_ms for d in decisions])
            rows.append(
                Row(
                    "fusion",
                    strategy,
                    run.missing or "none",
                    float(np.mean([t == p for t, p in zip(truth, predicted, strict=True)])),
                    macro_f1(truth, predicted, labels),
                    sum(d.status == "complete" for d in decisions),
                    sum(d.status == "partial" for d in decisions),
                    p50,
                    p99,
                )
            )
    return rows


def render_markdown(rows: list[Row], *, title: str) -> str:
    """The table as Markdown."""
    lines = [
        f"# {title}",
        "",
        "| agents / fusion | strategy | missing | accuracy | macro-F1 | complete | partial | p50 ms | p99 ms |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        complete = "-" if r.complete is None else str(r.complete)
        partial = "-" if r.partial is None else str(r.partial)
        lines.append(
            f"| {r.what} | {r.strategy} | {r.missing} | {r.accuracy:.3f} | {r.macro_f1:.3f} | "
            f"{complete} | {partial} | {r.p50_ms:.1f} | {r.p99_ms:.1f} |"
        )
    return "\n".join(lines) + "\n"


def draw_confusion(matrix: np.ndarray, labels: Sequence[str], path: Path, *, title: str) -> None:
    """Draw a confusion matrix with counts in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.2, 4.6), dpi=120)
    axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title, fontsize=10)
    limit = matrix.max() / 2 if matrix.size else 0
    for (i, j), count in np.ndenumerate(matrix):
        axes.text(
            j, i, str(count), ha="center", va="center", color="white" if count > limit else "black"
        )
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


async def run_eval(settings: EvalSettings) -> tuple[list[Row], Path, Path]:
    """Run every scenario; returns the rows and the paths of the Markdown and the PNG."""
    dataset = load_dataset(settings.dataset)
    agents = {name: build_agent(name) for name in settings.agents}
    for name, agent in agents.items():
        if agent.type != name:
            raise ConfigError(
                f"agent {name!r} serves type {agent.type!r}; name agents by their type"
            )
    server = EmbeddedServer().start() if settings.nats_url is None else None
    url = server.url if server is not None else str(settings.nats_url)
    try:
        runs = []
        for missing in (None, *settings.agents):
            started = time.perf_counter()
            runs.append(await live_run(url, dataset, agents, settings, missing))
            print(
                f"  run with {missing or 'no'} agent missing: {time.perf_counter() - started:.1f} s",
                flush=True,
            )
    finally:
        if server is not None:
            server.stop()
    names = [FusionSpec(strategy=s).build().name for s in settings.strategies]
    rows = tabulate(runs, dataset.labels, names)
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    title = f"fusebus eval: {dataset.name} TEST ({len(dataset.y_test)} windows), agents {', '.join(settings.agents)}"
    markdown = settings.out_dir / "eval.md"
    markdown.write_text(render_markdown(rows, title=title), encoding="utf-8")
    default = FusionSpec(strategy=settings.strategies[0]).build().name
    full, truth = runs[0]
    decisions = full.decisions[default]
    matrix = confusion(
        [truth[d.window.t_start_ns] for d in decisions],
        [d.label for d in decisions],
        dataset.labels,
    )
    picture = settings.out_dir / "confusion.png"
    draw_confusion(matrix, dataset.labels, picture, title=f"{dataset.name}: {default}, all agents")
    return rows, markdown, picture
