"""Fusion strategies, as pure code, on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from agents.fusion import (
    STRATEGIES,
    FusionSpec,
    KOfN,
    MajorityVote,
    MaxConfidence,
    Mean,
    ThresholdAlarm,
    Vote,
    WeightedMean,
    make_strategy,
)
from schemas import ConfigError

LABELS = ("walk", "run", "stand")


def vote(
    type_name: str, probs: list[float], weight: float = 1.0, labels: tuple[str, ...] = LABELS
) -> Vote:
    return Vote(type_name, labels, np.array(probs, dtype=np.float32), weight)


def test_weighted_mean_uses_the_agents_weights() -> None:
    """(0.9*[.6,.3,.1] + 0.3*[.1,.8,.1]) / 1.2 = [.475, .425, .1]."""
    fused = WeightedMean().fuse(
        [vote("accel", [0.6, 0.3, 0.1], 0.9), vote("gyro", [0.1, 0.8, 0.1], 0.3)]
    )
    assert fused.label == "walk"
    assert fused.scores == pytest.approx({"walk": 0.475, "run": 0.425, "stand": 0.1})


def test_plan_weights_override_agent_weights() -> None:
    """Weights given for a type replace the weight the agent declared."""
    strategy = WeightedMean(weights={"gyro": 3.0})
    fused = strategy.fuse([vote("accel", [0.6, 0.3, 0.1], 0.9), vote("gyro", [0.1, 0.8, 0.1], 0.3)])
    # (0.9*.6 + 3*.1)/3.9 = .2154 ; (0.9*.3 + 3*.8)/3.9 = .6846
    assert fused.label == "run"
    assert fused.scores["run"] == pytest.approx(0.6846, abs=1e-4)


def test_labels_are_aligned_by_name_not_position() -> None:
    """Agents may list labels in different orders."""
    fused = Mean().fuse(
        [
            vote("accel", [0.6, 0.3, 0.1]),
            vote("gyro", [0.1, 0.6, 0.3], labels=("stand", "walk", "run")),
        ]
    )
    assert fused.scores == pytest.approx({"walk": 0.6, "run": 0.3, "stand": 0.1})


def test_partial_answers_renormalise_over_agents_present() -> None:
    """With one agent missing the scores still sum to one and follow the agent present."""
    fused = WeightedMean().fuse([vote("accel", [0.2, 0.7, 0.1], 0.8)])
    assert sum(fused.scores.values()) == pytest.approx(1.0)
    assert fused.scores == pytest.approx({"walk": 0.2, "run": 0.7, "stand": 0.1})


def test_mean_ignores_weights() -> None:
    """The plain mean treats every agent alike."""
    fused = Mean().fuse(
        [vote("a", [1, 0, 0], 100.0), vote("b", [0, 1, 0], 0.01), vote("c", [0, 1, 0], 0.01)]
    )
    assert fused.label == "run" and fused.scores["run"] == pytest.approx(2 / 3)


def test_strategies_refuse_bad_input() -> None:
    """No votes, mismatched lengths, bad weights or unknown names are errors."""
    with pytest.raises(ValueError):
        Mean().fuse([])
    with pytest.raises(ValueError, match="2 scores for 3 labels"):
        Mean().fuse([vote("a", [0.5, 0.5])])
    with pytest.raises(ConfigError):
        WeightedMean(weights={"a": 0.0})
    with pytest.raises(ConfigError, match="unknown fusion strategy"):
        make_strategy("soft-magic")


def test_majority_vote_counts_top_labels_and_breaks_ties_by_score() -> None:
    """Two of three agents say run: run wins on votes; a tie goes to the higher mean, and the
    scores show it: (votes + mean score) / (agents + 1), adding up to 1."""
    fused = MajorityVote().fuse(
        [
            vote("a", [0.1, 0.8, 0.1]),
            vote("b", [0.4, 0.5, 0.1]),
            vote("c", [0.9, 0.05, 0.05]),
        ]
    )
    assert fused.label == "run"
    means = {"walk": 1.4 / 3, "run": 1.35 / 3, "stand": 0.25 / 3}
    votes = {"walk": 1, "run": 2, "stand": 0}
    assert fused.scores == pytest.approx({k: (votes[k] + means[k]) / 4 for k in votes})
    assert sum(fused.scores.values()) == pytest.approx(1.0)
    tie = MajorityVote().fuse([vote("a", [0.6, 0.4, 0.0]), vote("b", [0.1, 0.9, 0.0])])
    assert tie.label == "run"  # mean run 0.65 beats mean walk 0.35
    assert tie.scores == pytest.approx({"walk": 1.35 / 3, "run": 1.65 / 3, "stand": 0.0})
    assert max(tie.scores, key=tie.scores.__getitem__) == tie.label  # the tie-break is visible


def test_majority_vote_counts_dominate_means_even_for_raw_scores() -> None:
    """With outputs that are not probabilities (negative logits), one more vote still wins
    over a higher mean score."""
    fused = MajorityVote().fuse(
        [
            vote("a", [-1.0, -9.0, -9.0]),
            vote("b", [-1.0, -9.0, -9.0]),
            vote("c", [-30.0, 5.0, -9.0]),
        ]
    )
    assert fused.label == "walk"
    assert max(fused.scores, key=fused.scores.__getitem__) == "walk"


def test_max_confidence_follows_the_surest_agent() -> None:
    """The agent with the highest top score decides, whatever the others say."""
    fused = MaxConfidence().fuse(
        [
            vote("a", [0.5, 0.4, 0.1]),
            vote("b", [0.05, 0.05, 0.9]),
            vote("c", [0.6, 0.3, 0.1]),
        ]
    )
    assert fused.label == "stand" and fused.scores["stand"] == pytest.approx(0.9)


def test_threshold_alarm_fires_on_the_fused_score() -> None:
    """An alarm when the fused score of the target reaches t; the label stays the fused one."""
    votes = [vote("a", [0.5, 0.4, 0.1]), vote("b", [0.5, 0.3, 0.2])]  # fused run = 0.35
    assert ThresholdAlarm("run", 0.35).fuse(votes).alarm
    quiet = ThresholdAlarm("run", 0.36).fuse(votes)
    assert not quiet.alarm and quiet.label == "walk"


def test_k_of_n_counts_agents_past_the_threshold() -> None:
    """k of n: the alarm needs k agents whose own target score passes t."""
    votes = [vote("a", [0.1, 0.7, 0.2]), vote("b", [0.3, 0.6, 0.1]), vote("c", [0.8, 0.1, 0.1])]
    assert KOfN("run", 0.6, k=2).fuse(votes).alarm
    assert not KOfN("run", 0.65, k=2).fuse(votes).alarm
    # With an agent missing the rule still needs k agents: one left cannot raise it.
    assert not KOfN("run", 0.6, k=2).fuse(votes[:1]).alarm
    assert KOfN("run", 0.6, k=1).fuse(votes[:1]).alarm


def test_fusion_spec_builds_each_strategy() -> None:
    """Every strategy name builds, carrying its parameters."""
    for name in STRATEGIES:
        spec = FusionSpec(strategy=name, target="run" if name in ("threshold", "k_of_n") else None)
        assert spec.build().name == name
    rule = FusionSpec(
        strategy="k_of_n", target="run", threshold=0.7, k=3, weights={"a": 2.0}
    ).build()
    assert isinstance(rule, KOfN) and (rule.k, rule.threshold) == (3, 0.7)
    assert isinstance(rule.base, WeightedMean) and rule.base.weights == {"a": 2.0}
