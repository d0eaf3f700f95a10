"""The model-rollout benchmark's figures: every promotion on a line, the checks, and the
section of ``docs/benchmarks.md`` (see :mod:`bench.rollout`)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from bench.rollout import RolloutRun, each_ms


def _range(values: Sequence[float], digits: int = 0) -> str:
    return (
        f"{statistics.median(values):.{digits}f} "
        f"({min(values):.{digits}f}-{max(values):.{digits}f})"
    )


def _each(name: str, values: Sequence[float]) -> str:
    return each_ms(values) if name.endswith("ms") else ", ".join(f"{v:.2f}" for v in values)


def figures(run: RolloutRun) -> dict[str, list[float]]:
    """Each figure, one value per promotion."""
    return {
        "last result ms": [p.last_result_ms for p in run.loaded],
        "last stats ms": [p.last_stats_ms for p in run.loaded],
        "dip": [p.dip for p in run.loaded],
        "floor": [p.floor for p in run.loaded],
        "slowest decision before ms": [p.worst_ms[0] for p in run.loaded],
        "slowest decision after ms": [p.worst_ms[1] for p in run.loaded],
        "idle last stats ms": [p.last_stats_ms for p in run.idle],
        "promote call ms": [p.call_ms for p in (*run.loaded, *run.idle)],
    }


def describe(run: RolloutRun) -> str:
    """Every promotion's figures and the integrity counts, a line each."""
    i = run.integrity
    lines = [f"under load: {p.describe()}" for p in run.loaded]
    lines += [f"idle: {p.describe()}" for p in run.idle]
    each = (f"{name} {_each(name, values)}" for name, values in figures(run).items())
    lines.append("rollout: " + " | ".join(each))
    answers = ", ".join(f"{n} result(s): {tasks}" for n, tasks in sorted(i.accel_answers.items()))
    promotions = len(run.loaded) + len(run.idle)
    lines.append(
        f"rollout integrity: frames {i.frames}, decisions {i.decisions}, distinct task ids "
        f"{i.decided}, unknown windows {i.unknown}; statuses {dict(i.statuses)}; accel tasks "
        f"by results {answers}; version changes seen per replica {list(i.changes.values())} "
        f"(promotions under load {len(run.loaded)}); switches per replica "
        f"{list(i.switches.values())} (promotions {promotions})"
    )
    lines.append(
        f"rollout checks: one decision each {i.one_decision_each}; one accel result each "
        f"{i.one_result_each}; switched once per promotion "
        f"{i.switched_each_time(promotions, len(run.loaded))}"
    )
    return "\n".join(lines)


def render_rollout(run: RolloutRun) -> str:
    """The model-rollout section of ``docs/benchmarks.md``, from one run."""
    f = figures(run)
    i = run.integrity
    return (
        "\n".join(
            [
                "## Model rollout",
                "",
                f"`python -m bench --only rollout` (see `bench/rollout.py`): {run.replicas} accel "
                f"replicas following registry model `accel`, each its own process, with a "
                f"coordinator, a fusion agent and a gyro agent, under {run.rate:.0f} BasicMotions "
                f"frames/s; {len(run.loaded)} promotions under load and {len(run.idle)} idle. "
                "Times from `promote` returning; median (min-max) over the promotions.",
                "",
                "| figure | value |",
                "|---|---:|",
                f"| to the last replica's first result with the new version, ms | {_range(f['last result ms'])} |",
                f"| to the last replica's `$SRV.STATS` serving it, under load, ms | {_range(f['last stats ms'])} |",
                f"| the same, idle replicas, ms | {_range(f['idle last stats ms'])} |",
                f"| lowest 100 ms bin of decisions after a promotion / median before | {_range(f['dip'], 2)} |",
                f"| lowest bin before / median before (noise) | {_range(f['floor'], 2)} |",
                f"| slowest decision (ingest to decision) in the {run.window_s:g} s after, ms | "
                f"{_range(f['slowest decision after ms'])} |",
                f"| the same in the {run.window_s:g} s before, ms | {_range(f['slowest decision before ms'])} |",
                f"| `promote` call, ms | {_range(f['promote call ms'], 1)} |",
                "",
                f"Frames {i.frames}, decisions {i.decisions} for {i.decided} task ids "
                f"({'one each' if i.one_decision_each else 'NOT one each'}), statuses "
                f"{dict(i.statuses)}.",
            ]
        )
        + "\n"
    )
