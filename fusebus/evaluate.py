"""``fusebus eval``: what fusion buys, measured through the live bus.

For a dataset's TEST split (a shipped dataset or the user's ``.npz``) the pipeline runs once
with every agent and once with each agent missing (dropout). In each run a fusion agent per
strategy decides every window, so all strategies see the same results. The table gives each
agent alone (from its own results), each strategy with every agent, and each strategy with
each agent missing: accuracy, macro-F1, complete/partial decisions and latency. Each
strategy's decisions with every agent also get a per-class report (precision, recall, F1 and
support per label, with accuracy and macro and weighted averages). Both are printed and
written as Markdown, and the first strategy's confusion matrix is drawn as a PNG.

With a config (``--config examples/chain.toml``) the plan and the agents are the config's
(its ``[agents]`` table, checked against the plan first): the runs are the whole config,
each of its agents missing, and, for a chain, late fusion alone (the fused types that read
only sensors, without the stages and the head). Types that answer features are not scored
alone; the table says why each missing type was missing (``missing_reasons``: a head
``upstream: enc_accel`` when an encoder it waits for did not answer).

A run that cannot finish says why: a frame the coordinator refuses stops it with the
coordinator's reason, and decisions that do not all come within a bound stop it with how
many each strategy got.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from agents import AgentRuntime, AgentSettings, ModelAgent
from agents.base import Agent
from agents.fusion import FusionAgent, FusionSpec
from agents.fusion.strategies import CLASSIFYING_STRATEGIES
from agents.loading import load_agent
from agents.serving import Lineup
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
from fusebus.config import Deployment, load_deployment
from fusebus.datasets import SensorDataset, load_dataset
from fusebus.lineup import Served, check_lineup, plan_for
from fusebus.lineup import build_agent as build_entry
from fusebus.paths import models_dir
from fusebus.replay import replay_frames, replay_start_ns
from fusebus.scores import (
    ClassReport,
    class_report,
    class_report_markdown,
    confusion,
    macro_f1,
    render_class_report,
)
from schemas import CODEC, ConfigError, Decision, FusebusError, Result

__all__ = [
    "EvalReport",
    "EvalSettings",
    "Row",
    "build_agents",
    "class_report",
    "confusion",
    "macro_f1",
    "render_markdown",
    "run_eval",
]

log = structlog.get_logger("fusebus.eval")

DEFAULT_STRATEGIES = CLASSIFYING_STRATEGIES
#: The deadline of the plan eval builds from its agents (a config's plan has its own).
DEFAULT_DEADLINE_MS = 500.0
STREAM = "eval"
#: How long a stopping component or connection may take before eval moves on without it.
TEARDOWN_S = 10.0
#: How long past the deadline eval waits for the last decisions of a run.
DECISION_GRACE_S = 30.0


class EvalError(FusebusError, RuntimeError):
    """A run of ``fusebus eval`` could not finish; the message says what was missing."""


@dataclass(frozen=True)
class EvalSettings:
    """What ``fusebus eval`` measures."""

    dataset: str = "basicmotions"  # a shipped dataset's name or a .npz file
    spec: Path | None = None  # the .npz's spec, when not the .toml beside it
    agents: tuple[str, ...] = ("accel", "gyro", "motion")  # names, model files or agent specs
    # None: the config's [default.fusion] strategy when it classifies, else the default ones
    strategies: tuple[str, ...] | None = DEFAULT_STRATEGIES
    rate_hz: float = 100.0
    deadline_ms: float | None = None  # None: the config plan's, else DEFAULT_DEADLINE_MS
    out_dir: Path = Path("out/eval")
    nats_url: str | None = None
    config: Path | None = None  # a plans file with [agents]: its plan and agents, not ``agents``

    def __post_init__(self) -> None:
        if self.config is None and len(self.agents) < 2:
            raise ConfigError("eval needs at least two agents to fuse")
        if self.strategies is not None and not self.strategies:
            raise ConfigError("eval needs at least one fusion strategy")
        for name in self.strategies or ():
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
    why_missing: str = ""  # the decisions' missing_reasons, most frequent first


@dataclass(frozen=True)
class Scenario:
    """One live run: a plan, the agents serving it, and the one left out (if any)."""

    what: str  # the table's first column: fusion, chain, late fusion
    plan: Plan
    agents: Mapping[str, Agent | Lineup]  # by type: one model, or several to choose among
    missing: str | None = None


@dataclass
class RunResult:
    """What one live run collected: per strategy, one decision per window (by its start)."""

    missing: str | None
    what: str = "fusion"
    decided: dict[str, dict[int, Decision]] = field(default_factory=lambda: defaultdict(dict))
    results: dict[str, list[Result]] = field(default_factory=lambda: defaultdict(list))

    def decisions_of(self, strategy: str) -> list[Decision]:
        """A strategy's decisions in window order."""
        by_window = self.decided.get(strategy, {})
        return [by_window[t] for t in sorted(by_window)]


@dataclass(frozen=True)
class EvalReport:
    """Everything ``fusebus eval`` measured, and where it wrote it."""

    rows: list[Row]
    class_reports: dict[str, ClassReport]  # per strategy, with every agent
    markdown: Path
    class_report: Path
    picture: Path

    @property
    def class_reports_text(self) -> str:
        """The per-class reports as plain text, one block per strategy."""
        return "\n".join(
            render_class_report(report, title=f"{strategy}, all agents")
            for strategy, report in self.class_reports.items()
        )


def build_agent(name: str) -> Agent:
    """A model file (``.tflite``/``.keras`` with its card), a shipped model by name, or else
    a registered agent class (``package.module:Class`` or an entry-point name)."""
    if Path(name).suffix in (".tflite", ".keras"):
        return ModelAgent(Path(name))
    model = models_dir() / f"{name}.tflite"
    if model.exists():
        return ModelAgent(model)
    return load_agent(name)


def check_fit(dataset: SensorDataset, agents: dict[str, Agent]) -> None:
    """Refuse, before anything runs, agents the dataset cannot feed or score.

    Raises:
        ConfigError: an agent reads a sensor the dataset lacks, another window length or
            channel count, or names labels the dataset does not have.
    """
    samples = dataset.x_test.shape[1]
    for type_name, agent in agents.items():
        for spec in agent.inputs:
            if spec.stage:  # another type's answer, which the plan checks
                continue
            channels = dataset.sensors.get(spec.sensor)
            if channels is None:
                raise ConfigError(
                    f"agent {type_name!r} reads sensor {spec.sensor!r}; dataset "
                    f"{dataset.name!r} has {', '.join(dataset.sensors)}"
                )
            if spec.samples and spec.samples != samples:
                raise ConfigError(
                    f"agent {type_name!r} reads {spec.samples} samples of {spec.sensor!r}; the "
                    f"cases of {dataset.name!r} are {samples} samples long"
                )
            if spec.channels and spec.channels != len(channels):
                raise ConfigError(
                    f"agent {type_name!r} reads {spec.channels} channels of {spec.sensor!r}; "
                    f"dataset {dataset.name!r} gives it {len(channels)}"
                )
        unknown = [label for label in agent.labels if label not in dataset.labels]
        if unknown:
            raise ConfigError(
                f"agent {type_name!r} answers labels {unknown[:5]} that dataset "
                f"{dataset.name!r} does not have (its labels: {', '.join(dataset.labels)})"
            )


async def _stop_within(what: str, stop: Awaitable[Any]) -> None:
    """Await a component's stop or a drain, but never longer than :data:`TEARDOWN_S`: a part
    stuck in its shutdown must not hold the whole evaluation."""
    try:
        async with asyncio.timeout(TEARDOWN_S):
            await stop
    except TimeoutError:
        log.warning("eval.stop_timeout", what=what, after_s=TEARDOWN_S)
    except Exception as exc:  # a connection already closed, say: teardown goes on
        log.debug("eval.stop_failed", what=what, error=str(exc))


async def live_run(
    url: str,
    dataset: SensorDataset,
    scenario: Scenario,
    strategies: Sequence[str],
    rate_hz: float,
    *,
    rounds: int = 1,
    agent_settings: AgentSettings | None = None,
) -> tuple[RunResult, dict[int, str]]:
    """Run the TEST split (``rounds`` times over, back to back in event time) through the
    coordinator, the scenario's agents (less its missing one) and one fusion agent per
    strategy; returns what came back and the true label of each window."""
    subjects = Subjects(f"eval{uuid.uuid4().hex[:8]}")
    bus = BusSettings(url=url, prefix=subjects.prefix)
    connections: list[Connection] = []

    async def open_connection(name: str) -> Connection:
        nc = await connect(bus, name=name)
        connections.append(nc)
        return nc

    plan, agents, missing = scenario.plan, scenario.agents, scenario.missing
    deadline_s = plan.deadline_ms / 1e3
    run = RunResult(missing, what=scenario.what)
    components: list[Any] = []
    nc = await open_connection("eval")
    try:
        await ensure_streams(nc.jetstream(), subjects, TopologySettings())
        for strategy in strategies:
            fusion = FusionAgent(
                await open_connection(f"fusion-{strategy}"),
                subjects=subjects,
                name=f"eval-{strategy}",
                strategy=FusionSpec(strategy=strategy).build(),
            )
            components.append(await fusion.start())
        for type_name, agent in agents.items():
            if type_name != missing:
                runtime = AgentRuntime(
                    agent,
                    await open_connection(type_name),
                    subjects=subjects,
                    settings=agent_settings,
                )
                components.append(await runtime.start())
        coordinator = Coordinator(
            await open_connection("coordinator"), plans=PlanBook(default=plan), subjects=subjects
        )
        components.append(await coordinator.start())

        done = asyncio.Event()
        cases = len(dataset.y_test)
        total = cases * rounds

        async def on_decision(msg: Message) -> None:
            decision = CODEC.decode(msg.data, Decision)
            run.decided[decision.strategy][decision.window.t_start_ns] = decision
            if all(len(run.decided[s]) >= total for s in names):
                done.set()

        async def on_result(msg: Message) -> None:
            for result in CODEC.decode_each(msg.data, Result):
                run.results[result.type].append(result)

        names = [FusionSpec(strategy=s).build().name for s in strategies]
        await follow_stored(nc, subjects.decision(STREAM), on_decision)
        await nc.subscribe(subjects.result(STREAM), cb=on_result)
        # Each frame waits for the coordinator's answer, so a refused one stops the run
        # with its reason instead of leaving a window that will never be decided.
        start_ns = replay_start_ns(
            now_ns=time.time_ns(),
            grid_ns=dataset.case_ns,
            span_ns=total * dataset.case_ns,
            send_s=total / rate_hz,
        )
        producer = Producer(nc, subjects)
        sent = []
        for round_ in range(rounds):
            sent += await replay_frames(
                producer,
                dataset,
                stream=STREAM,
                rate_hz=rate_hz,
                start_ns=start_ns + round_ * cases * dataset.case_ns,
                wait_s=deadline_s + DECISION_GRACE_S,
            )
        refused = [w for w in sent if w.answer != b"accepted"]
        if refused:
            answer = (refused[0].answer or b"").decode(errors="replace")[:300]
            raise EvalError(
                f"the coordinator refused {len(refused)} of {len(sent)} frames of "
                f"{dataset.name!r}, the first with: {answer}"
            )
        try:
            async with asyncio.timeout(deadline_s + DECISION_GRACE_S):
                await done.wait()
        except TimeoutError:
            got = ", ".join(f"{s} {len(run.decided[s])}" for s in names)
            raise EvalError(
                f"{scenario.what} run with {missing or 'no'} agent missing: after "
                f"{deadline_s + DECISION_GRACE_S:.0f} s, decisions of "
                f"{total} windows: {got}"
            ) from None
    finally:
        for component in reversed(components):
            await _stop_within(type(component).__name__, component.stop())
        for connection in connections:
            await _stop_within("connection", connection.drain())
    return run, {w.t_start_ns: w.label for w in sent}


def _latencies(values: list[float]) -> tuple[float, float]:
    array = np.array(values) if values else np.zeros(1)
    return float(np.percentile(array, 50)), float(np.percentile(array, 99))


def tabulate(
    runs: list[tuple[RunResult, dict[int, str]]], labels: Sequence[str], strategies: Sequence[str]
) -> list[Row]:
    """Table rows: agents alone (those that answer class scores), then each strategy (in the
    given order) with each run: every agent, each one missing, late fusion alone."""
    rows = []
    full, full_truth = runs[0]
    for type_name, every in sorted(full.results.items()):
        results = [r for r in every if r.labels]  # a stage's features are no classification
        if not results:
            continue
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
            decisions = run.decisions_of(strategy)
            truth = [truth_by_window[d.window.t_start_ns] for d in decisions]
            predicted = [d.label for d in decisions]
            p50, p99 = _latencies([d.latency_ms for d in decisions])
            rows.append(
                Row(
                    run.what,
                    strategy,
                    run.missing or "none",
                    float(np.mean([t == p for t, p in zip(truth, predicted, strict=True)])),
                    macro_f1(truth, predicted, labels),
                    sum(d.status == "complete" for d in decisions),
                    sum(d.status == "partial" for d in decisions),
                    p50,
                    p99,
                    why_missing(decisions),
                )
            )
    return rows


def why_missing(decisions: Sequence[Decision]) -> str:
    """The decisions' reasons for missing types, most frequent first (``type: reason``),
    with how many decisions gave each when not all did."""
    counts = Counter(pair for d in decisions for pair in d.missing_reasons.items())
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return "; ".join(
        f"{t}: {reason}" + ("" if n == len(decisions) else f" ({n})") for (t, reason), n in ranked
    )


def render_markdown(rows: list[Row], *, title: str) -> str:
    """The table as Markdown."""
    lines = [
        f"# {title}",
        "",
        "| agents / fusion | strategy | missing | accuracy | macro-F1 | complete | partial | p50 ms | p99 ms | why missing |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        complete = "-" if r.complete is None else str(r.complete)
        partial = "-" if r.partial is None else str(r.partial)
        lines.append(
            f"| {r.what} | {r.strategy} | {r.missing} | {r.accuracy:.3f} | {r.macro_f1:.3f} | "
            f"{complete} | {partial} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.why_missing or '-'} |"
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


def build_agents(dataset: SensorDataset, names: Sequence[str]) -> dict[str, Agent]:
    """The agents to fuse, by the type each serves, checked against the dataset.

    Raises:
        ConfigError: an agent cannot be built, two serve one type, or the dataset cannot feed
            or score one (see :func:`check_fit`).
    """
    agents: dict[str, Agent] = {}
    for name in names:
        agent = build_agent(name)
        if agent.type in agents:
            raise ConfigError(f"two agents serve type {agent.type!r}; eval fuses one per type")
        agents[agent.type] = agent
    check_fit(dataset, agents)
    return agents


def agents_plan(agents: dict[str, Agent], *, deadline_ms: float) -> Plan:
    """The plan of a plain eval: one subtask type per agent, reading the sensors it reads,
    each frame one window."""
    return Plan(
        subtasks=tuple(
            SubtaskSpec(type_name, tuple(SensorInput(spec.sensor) for spec in agent.inputs))
            for type_name, agent in agents.items()
        ),
        deadline_ms=deadline_ms,
    )


def config_scenarios(
    deployment: Deployment, dataset: SensorDataset, *, deadline_ms: float | None = None
) -> list[Scenario]:
    """The runs of ``eval --config``: the config's plan with all its agents, late fusion
    alone (for a chain: the fused types that read only sensors), and each agent missing.

    Raises:
        ConfigError: the config has no ``[agents]``, they do not fit its plan (see
            :func:`~fusebus.lineup.check_lineup`) or the dataset.
    """
    source = deployment.source
    if not deployment.agents:
        raise ConfigError(
            f"{source}: no [agents] table: `fusebus eval --config` runs the agents it names "
            "(see examples/chain.toml)"
        )
    plan, _ = plan_for(deployment, STREAM)
    if deadline_ms is not None:
        plan = dataclasses.replace(plan, deadline_ms=deadline_ms)
    agents = {t: build_entry(e, source=source) for t, e in deployment.agents.items()}
    check_lineup(deployment, {t: Served.of_agent(a) for t, a in agents.items()}, stream=STREAM)
    check_fit(dataset, agents)
    what = "chain" if plan.chained else "fusion"
    scenarios = [Scenario(what, plan, agents)]
    late = tuple(s for s in plan.subtasks if s.type in plan.fused and not s.after)
    if plan.chained and late:
        late_plan = dataclasses.replace(plan, subtasks=late, fuse=())
        scenarios.append(Scenario("late fusion", late_plan, {s.type: agents[s.type] for s in late}))
    return scenarios + [Scenario(what, plan, agents, missing=t) for t in agents]


def eval_strategies(settings: EvalSettings, deployment: Deployment | None) -> tuple[str, ...]:
    """The strategies to compare: those asked for; else the config's own when it classifies,
    else :data:`DEFAULT_STRATEGIES`."""
    if settings.strategies is not None:
        return settings.strategies
    if deployment is not None and deployment.fusion_default.strategy in CLASSIFYING_STRATEGIES:
        return (deployment.fusion_default.strategy,)
    return DEFAULT_STRATEGIES


async def run_eval(settings: EvalSettings) -> EvalReport:
    """Run every scenario; returns what was measured and the paths of what was written."""
    dataset = load_dataset(settings.dataset, spec=settings.spec)
    dataset.split("test")  # a dataset without cases to score fails here, not mid-run
    deployment = load_deployment(settings.config) if settings.config is not None else None
    if deployment is not None:
        scenarios = config_scenarios(deployment, dataset, deadline_ms=settings.deadline_ms)
    else:
        built = build_agents(dataset, settings.agents)
        plan = agents_plan(built, deadline_ms=settings.deadline_ms or DEFAULT_DEADLINE_MS)
        scenarios = [Scenario("fusion", plan, built, m) for m in (None, *built)]
    agents = scenarios[0].agents
    strategies = eval_strategies(settings, deployment)
    server = EmbeddedServer().start() if settings.nats_url is None else None
    url = server.url if server is not None else str(settings.nats_url)
    try:
        runs = []
        for scenario in scenarios:
            started = time.perf_counter()
            runs.append(await live_run(url, dataset, scenario, strategies, settings.rate_hz))
            print(
                f"  {scenario.what} run with {scenario.missing or 'no'} agent missing: "
                f"{time.perf_counter() - started:.1f} s",
                flush=True,
            )
    finally:
        if server is not None:
            server.stop()
    names = [FusionSpec(strategy=s).build().name for s in strategies]
    rows = tabulate(runs, dataset.labels, names)
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    config = f", config {settings.config}" if settings.config is not None else ""
    title = (
        f"fusebus eval: {dataset.name} TEST ({len(dataset.y_test)} windows){config}, "
        f"agents {', '.join(agents)}"
    )
    markdown = settings.out_dir / "eval.md"
    markdown.write_text(render_markdown(rows, title=title), encoding="utf-8")
    full, truth = runs[0]
    reports = {
        name: class_report(
            [truth[d.window.t_start_ns] for d in full.decisions_of(name)],
            [d.label for d in full.decisions_of(name)],
            dataset.labels,
        )
        for name in names
    }
    report_path = settings.out_dir / "report.md"
    report_path.write_text(
        f"# Per-class report: {dataset.name} TEST, agents {', '.join(agents)}\n\n"
        + "\n".join(
            class_report_markdown(report, title=f"{name}, all agents")
            for name, report in reports.items()
        ),
        encoding="utf-8",
    )
    default = names[0]
    matrix = confusion(
        [truth[d.window.t_start_ns] for d in full.decisions_of(default)],
        [d.label for d in full.decisions_of(default)],
        dataset.labels,
    )
    picture = settings.out_dir / "confusion.png"
    draw_confusion(matrix, dataset.labels, picture, title=f"{dataset.name}: {default}, all agents")
    return EvalReport(rows, reports, markdown, report_path, picture)
