"""`fusebus eval`: its metrics as pure code, and a live run across the real server."""

from __future__ import annotations

from pathlib import Path

import pytest

from bus import EmbeddedServer
from fusebus.evaluate import EvalSettings, confusion, macro_f1, run_eval
from schemas import ConfigError


def test_macro_f1_and_confusion_on_a_hand_computed_case() -> None:
    """a: TP2 FP1 FN0 -> 0.8; b: TP1 FP0 FN1 -> 0.667; c: never seen nor predicted -> 0."""
    truth = ["a", "a", "b", "b"]
    predicted = ["a", "a", "a", "b"]
    assert macro_f1(truth, predicted, ["a", "b"]) == pytest.approx((0.8 + 2 / 3) / 2)
    assert macro_f1(truth, predicted, ["a", "b", "c"]) == pytest.approx((0.8 + 2 / 3) / 3)
    assert confusion(truth, predicted, ["a", "b"]).tolist() == [[2, 0], [1, 1]]


def test_eval_settings_are_checked() -> None:
    """Unknown strategies, a lone agent, or an alarm rule in place of a classifier are refused."""
    with pytest.raises(ConfigError, match="unknown fusion strategy"):
        EvalSettings(strategies=("best",))
    with pytest.raises(ConfigError, match="at least two agents"):
        EvalSettings(agents=("accel",))
    with pytest.raises(ConfigError, match="is an alarm rule"):
        EvalSettings(strategies=("threshold",))


async def test_eval_runs_every_scenario_through_the_bus(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    """Agents alone, each strategy with all agents and with each one missing: the table has
    every row, partial decisions appear exactly when an agent is missing, and the Markdown
    table and confusion-matrix PNG are written."""
    settings = EvalSettings(
        agents=("accel", "motion"),
        strategies=("weighted_mean", "majority_vote"),
        deadline_ms=1000,  # room for every agent to answer on a loaded machine
        rate_hz=200,
        out_dir=tmp_path,
        nats_url=nats_server.url,
    )
    report = await run_eval(settings)
    rows, markdown, picture = report.rows, report.markdown, report.picture
    alone = [r for r in rows if r.what.endswith("alone")]
    fused = [r for r in rows if r.what == "fusion"]
    assert [r.what for r in alone] == ["accel alone", "motion alone"]
    assert [(r.strategy, r.missing) for r in fused] == [
        (s, m) for s in ("weighted_mean", "majority_vote") for m in ("none", "accel", "motion")
    ]
    for row in fused:
        assert (row.complete, row.partial) == ((40, 0) if row.missing == "none" else (0, 40))
        assert row.accuracy >= 0.9
        if row.missing != "none":
            assert row.p50_ms >= 1000  # decided at the deadline
    assert "| fusion | weighted_mean | accel |" in markdown.read_text()
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(report.class_reports) == {"weighted_mean", "majority_vote"}
    for strategy, per_class in report.class_reports.items():
        full = next(r for r in fused if r.strategy == strategy and r.missing == "none")
        assert per_class.accuracy == pytest.approx(full.accuracy)
        assert per_class.macro.f1 == pytest.approx(full.macro_f1)
        assert [c.support for c in per_class.classes] == [10, 10, 10, 10]


def test_a_selection_row_counts_wrong_and_late_windows_and_answers_by_model() -> None:
    import numpy as np

    from fusebus.evaluate import RunResult
    from fusebus.selection_eval import STRATEGY, render_selection, selection_row
    from schemas import Decision, ModelRef, Result, Window

    def decision(t: int, label: str, status: str, reasons: dict[str, str]) -> Decision:
        return Decision(
            task_id=f"s:{t}",
            stream="s",
            window=Window(t, t + 1),
            label=label,
            scores={},
            status=status,  # type: ignore[arg-type]
            contributors=(),
            missing=tuple(reasons),
            strategy=STRATEGY,
            latency_ms=float(t),
            missing_reasons=reasons,
        )

    def result(t: int, model: str, selection: str) -> Result:
        return Result(
            task_id=f"s:{t}",
            stream="s",
            type="accel",
            agent_id="a",
            model=ModelRef(model, "1"),
            output=np.zeros(2, np.float32),
            labels=("x", "y"),
            latency_ms=1.0,
            selection=selection,
        )

    run = RunResult(None)
    for d in (
        decision(1, "x", "complete", {}),
        decision(2, "y", "complete", {}),
        decision(3, "", "failed", {"accel": "deadline"}),
    ):
        run.decided[STRATEGY][d.window.t_start_ns] = d
    run.results["accel"] = [result(1, "large", ""), result(2, "small", "deadline")]
    row = selection_row("selection", run, {1: "x", 2: "x", 3: "y"}, "accel")
    assert (row.windows, row.complete, row.deadline_misses) == (3, 2, 1)
    assert row.accuracy == pytest.approx(1 / 3)  # one right; a late window counts as wrong
    assert row.answers == {"large": 1, "small (deadline)": 1}
    table = render_selection([row], title="t")
    assert "| selection | 3 | 0.333 | 2 | 1 | large 1, small (deadline) 1 |" in table


async def test_eval_selection_runs_each_model_alone_then_all_of_them(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    """Every run decides each window exactly once; the selection run's answers come from the
    two models, the fast one saying why it answered."""
    from fusebus.selection_eval import SelectionSettings, run_selection_eval

    rows, path = await run_selection_eval(
        SelectionSettings(
            models=("accel-large", "accel-small"),
            rounds=2,
            out_dir=tmp_path,
            nats_url=nats_server.url,
        )
    )
    large, small, both = (r.what for r in rows)
    assert (large, small) == ("basicmotions-accel-large alone", "basicmotions-accel-small alone")
    assert both == "selection (basicmotions-accel-large, basicmotions-accel-small)"
    assert [r.windows for r in rows] == [80, 80, 80]
    allowed = {
        "basicmotions-accel-large",
        "basicmotions-accel-small (deadline)",
        "basicmotions-accel-small (backlog)",
    }
    assert set(rows[2].answers) <= allowed
    assert set(rows[0].answers) == {"basicmotions-accel-large"}
    assert "| selection (basicmotions-accel-large" in path.read_text()


def test_eval_selection_needs_two_models() -> None:
    from fusebus.selection_eval import SelectionSettings

    with pytest.raises(ConfigError, match="at least two models"):
        SelectionSettings(models=("accel-large",))
