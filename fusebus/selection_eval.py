"""``fusebus eval --selection``: what choosing among models by deadline gives under load.

One subtask type, several models for it (say a large accurate one and a small fast one).
The TEST split is replayed through the live bus, several rounds back to back, at a rate and
with a deadline that the accurate model alone cannot keep up with; each model serves alone,
then one replica serves with all of them and chooses per batch (see
:func:`agents.serving.choose`). The table gives, for each run, the accuracy of the decisions
(a window decided without an answer counts as wrong), the windows whose answer missed the
deadline, how many answers each model gave, and the decisions' latency.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agents.base import Agent
from agents.serving import Choice, Lineup
from bus import EmbeddedServer
from coordinator import Plan, SensorInput, SubtaskSpec
from fusebus.datasets import load_dataset
from fusebus.evaluate import RunResult, Scenario, build_agent, check_fit, live_run
from schemas import ConfigError

#: The only strategy a one-type plan needs: the decision is the type's answer.
STRATEGY = "weighted_mean"


@dataclass(frozen=True)
class SelectionSettings:
    """What ``fusebus eval --selection`` measures."""

    models: tuple[str, ...]  # two or more models of one type: names, files
    dataset: str = "basicmotions"
    spec: Path | None = None
    rate_hz: float = 1000.0  # frames per second, each waiting for its admission
    deadline_ms: float = 25.0
    rounds: int = 5  # times the TEST split is replayed, back to back
    max_batch: int = 64
    out_dir: Path = Path("out/eval")
    nats_url: str | None = None

    def __post_init__(self) -> None:
        if len(self.models) < 2:
            raise ConfigError("--selection needs at least two models of one type")
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")


@dataclass
class SelectionRow:
    """One run: one model alone, or all of them with selection."""

    what: str
    windows: int
    accuracy: float
    complete: int
    deadline_misses: int  # windows whose answer did not come before the deadline
    answers: dict[str, int] = field(default_factory=dict)  # by model, with why if not preferred
    p50_ms: float = 0.0
    p99_ms: float = 0.0


def selection_row(what: str, run: RunResult, truth: dict[int, str], type_name: str) -> SelectionRow:
    """The row of one run, from its decisions and results."""
    decisions = run.decisions_of(STRATEGY)
    right = [truth[d.window.t_start_ns] == d.label for d in decisions]
    answers = Counter(
        f"{r.model.name}" + (f" ({r.selection})" if r.selection else "")
        for r in run.results.get(type_name, [])
        if r.error is None
    )
    latencies = np.array([d.latency_ms for d in decisions] or [0.0])
    return SelectionRow(
        what=what,
        windows=len(decisions),
        accuracy=float(np.mean(right)) if right else 0.0,
        complete=sum(d.status == "complete" for d in decisions),
        deadline_misses=sum(d.missing_reasons.get(type_name) == "deadline" for d in decisions),
        answers=dict(sorted(answers.items())),
        p50_ms=float(np.percentile(latencies, 50)),
        p99_ms=float(np.percentile(latencies, 99)),
    )


def render_selection(rows: Sequence[SelectionRow], *, title: str) -> str:
    """The table as Markdown."""
    lines = [
        f"# {title}",
        "",
        "| models | windows | accuracy | complete | deadline misses | answers by | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        answers = ", ".join(f"{name} {n}" for name, n in r.answers.items()) or "-"
        lines.append(
            f"| {r.what} | {r.windows} | {r.accuracy:.3f} | {r.complete} | {r.deadline_misses} "
            f"| {answers} | {r.p50_ms:.1f} | {r.p99_ms:.1f} |"
        )
    return "\n".join(lines) + "\n"


def selection_scenarios(agents: Sequence[Agent], *, deadline_ms: float) -> list[Scenario]:
    """Each model alone, then all of them in one lineup, on a plan of their one type.

    Raises:
        ConfigError: the models do not serve one type with the same inputs and labels.
    """
    lineup = Lineup.ranked([Choice.of(a) for a in agents])  # refuses models that differ
    type_name = lineup.preferred.type
    plan = Plan(
        subtasks=(
            SubtaskSpec(type_name, tuple(SensorInput(i.sensor) for i in lineup.preferred.inputs)),
        ),
        deadline_ms=deadline_ms,
    )
    alone = [Scenario(f"{c.name} alone", plan, {type_name: c.current}) for c in lineup.choices]
    names = ", ".join(c.name for c in lineup.choices)
    return [*alone, Scenario(f"selection ({names})", plan, {type_name: lineup})]


async def run_selection_eval(settings: SelectionSettings) -> tuple[list[SelectionRow], Path]:
    """Run every scenario; returns the rows and the Markdown file written."""
    from agents import AgentSettings

    dataset = load_dataset(settings.dataset, spec=settings.spec)
    dataset.split("test")
    agents = [build_agent(name) for name in settings.models]
    type_name = agents[0].type
    check_fit(dataset, {f"{type_name}#{i}": a for i, a in enumerate(agents)})
    scenarios = selection_scenarios(agents, deadline_ms=settings.deadline_ms)
    server = EmbeddedServer().start() if settings.nats_url is None else None
    url = server.url if server is not None else str(settings.nats_url)
    rows = []
    try:
        for scenario in scenarios:
            started = time.perf_counter()
            run, truth = await live_run(
                url,
                dataset,
                scenario,
                [STRATEGY],
                settings.rate_hz,
                rounds=settings.rounds,
                agent_settings=AgentSettings(max_batch=settings.max_batch),
            )
            rows.append(selection_row(scenario.what, run, truth, type_name))
            print(f"  {scenario.what}: {time.perf_counter() - started:.1f} s", flush=True)
    finally:
        if server is not None:
            server.stop()
    title = (
        f"fusebus eval --selection: {dataset.name} TEST x {settings.rounds} "
        f"({len(dataset.y_test) * settings.rounds} windows) at {settings.rate_hz:g} frames/s, "
        f"deadline {settings.deadline_ms:g} ms"
    )
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    path = settings.out_dir / "selection.md"
    path.write_text(render_selection(rows, title=title), encoding="utf-8")
    return rows, path
