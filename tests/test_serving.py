"""Which model answers which subtask: the pure rules of selection and canaries."""

from __future__ import annotations

import numpy as np

from agents.serving import CANARY_BUCKETS, TIME_MARGIN, canary_rows, choose


def test_the_accurate_model_answers_while_time_allows() -> None:
    assert choose([0.002, 0.0001], rows=10, backlog_rows=0, time_left_s=1.0) == (0, "")


def test_a_batch_too_slow_for_its_deadline_goes_to_the_fast_model() -> None:
    # 100 rows at 2 ms is 0.2 s; 0.1 s is left.
    assert choose([0.002, 0.0001], rows=100, backlog_rows=0, time_left_s=0.1) == (1, "deadline")


def test_a_backlog_that_would_not_drain_in_time_goes_to_the_fast_model() -> None:
    # The batch alone fits (20 ms of 100 ms), the 200 rows behind it do not.
    assert choose([0.002, 0.0001], rows=10, backlog_rows=200, time_left_s=0.1) == (1, "backlog")


def test_the_budget_keeps_a_margin() -> None:
    cost, rows = 0.001, 100
    fits = rows * cost / TIME_MARGIN
    assert choose([cost, 0.0], rows=rows, backlog_rows=0, time_left_s=fits * 1.01)[0] == 0
    assert choose([cost, 0.0], rows=rows, backlog_rows=0, time_left_s=fits * 0.99)[0] == 1


def test_an_unmeasured_model_is_tried_and_when_none_fits_the_fastest_answers() -> None:
    assert choose([None, 0.001], rows=1000, backlog_rows=0, time_left_s=0.01) == (0, "")
    three = [0.01, 0.002, 0.004]
    assert choose(three, rows=1000, backlog_rows=0, time_left_s=0.01) == (1, "deadline")
    assert choose(three, rows=1, backlog_rows=0, time_left_s=-1.0) == (1, "deadline")


def test_a_canary_takes_its_share_of_task_ids_and_always_the_same_ones() -> None:
    ids = [f"s{i % 7}:{i * 10**9}" for i in range(20_000)]
    rows = canary_rows(ids, 0.1)
    assert abs(rows.mean() - 0.1) < 0.01  # 4.7 standard deviations of 20 000 draws
    assert np.array_equal(rows, canary_rows(ids, 0.1))  # a redelivery meets the same version
    wider = canary_rows(ids, 0.3)
    assert not (rows & ~wider).any()  # a larger share keeps the ones a smaller one took
    assert not canary_rows(ids, 0.0).any()
    assert canary_rows(ids[:5], 1 - 1 / CANARY_BUCKETS).sum() >= 4


def test_a_lineup_names_each_model_once() -> None:
    import pytest

    from agents import ModelAgent
    from agents.serving import Choice, Lineup
    from fusebus.paths import models_dir
    from schemas import ConfigError

    accel = ModelAgent(models_dir() / "accel.tflite")
    with pytest.raises(ConfigError, match="named twice"):
        Lineup((Choice.of(accel), Choice.of(accel)))
