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
