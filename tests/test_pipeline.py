"""The whole pipeline across a real nats-server: frames in, one fused decision per window out."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable

import msgpack
import numpy as np

from bus import Producer
from coordinator import basicmotions_plan
from fusebus.datasets import SensorDataset
from fusebus.replay import replay_frames
from schemas import DeadLetter, Decision, encode_array
from tests.helpers import Collector, Pipeline

StartPipeline = Callable[..., Awaitable[Pipeline]]


async def test_every_test_case_gets_one_complete_accurate_decision(
    pipeline: StartPipeline, basicmotions: SensorDataset
) -> None:
    """All 40 BasicMotions TEST cases are decided once each, complete, with accuracy >= 0.95."""
    parts = await pipeline()
    decisions = await Collector(Decision).start(parts.nc, parts.subjects.decision("bm"))
    sent = await replay_frames(
        Producer(parts.nc, parts.subjects), basicmotions, stream="bm", rate_hz=200
    )
    await decisions.wait_for(len(sent))
    await decisions.settle()

    truth = {w.t_start_ns: w.label for w in sent}
    assert len(decisions.items) == 40
    assert Counter(d.task_id for d in decisions.items).most_common(1)[0][1] == 1
    assert {d.window.t_start_ns for d in decisions.items} == set(truth)
    assert all(d.status == "complete" and d.missing == () for d in decisions.items)
    assert all(set(d.contributors) == {"accel", "gyro"} for d in decisions.items)
    accuracy = sum(d.label == truth[d.window.t_start_ns] for d in decisions.items) / 40
    assert accuracy >= 0.95
    assert all(abs(sum(d.scores.values()) - 1.0) < 1e-4 for d in decisions.items)
    assert parts.coordinator is not None and parts.coordinator.tracker.counts["complete"] == 40
    assert sum(a.counts["processed"] for a in parts.agents) == 80


async def test_without_gyro_every_decision_is_partial_after_the_deadline(
    pipeline: StartPipeline, basicmotions: SensorDataset
) -> None:
    """With no gyro agent running, each of the 40 windows still gets exactly one decision,
    partial with gyro missing, emitted only once the task's deadline has passed."""
    deadline_ms = 1000.0  # room for the accel agent to answer on a loaded machine
    parts = await pipeline(agents=("accel",), plan=basicmotions_plan(deadline_ms=deadline_ms))
    decisions = await Collector(Decision).start(parts.nc, parts.subjects.decision("bm"))
    await replay_frames(Producer(parts.nc, parts.subjects), basicmotions, stream="bm", rate_hz=200)
    await decisions.wait_for(40)
    await decisions.settle()

    assert len(decisions.items) == 40
    assert len({d.task_id for d in decisions.items}) == 40
    for d in decisions.items:
        assert d.status == "partial"
        assert d.missing == ("gyro",) and d.contributors == ("accel",)
        assert d.latency_ms >= deadline_ms  # decided after the deadline, not before
        assert abs(sum(d.scores.values()) - 1.0) < 1e-4


async def test_malformed_bytes_become_dead_letters_and_the_pipeline_goes_on(
    pipeline: StartPipeline, basicmotions: SensorDataset
) -> None:
    """Garbage on a frame subject and on a task subject each end as a DeadLetter with a
    reason, and every later frame is still decided."""
    parts = await pipeline()
    subjects = parts.subjects
    letters = await Collector(DeadLetter).start(parts.nc, subjects.all_dlq())
    decisions = await Collector(Decision).start(parts.nc, subjects.decision("bm"))

    await parts.nc.publish(subjects.frame("bm"), b"\x93\x01\x02\x03")
    await parts.nc.jetstream().publish(subjects.task("accel"), b"\xc1\xc1")
    await letters.wait_for(2)

    by_component = {letter.component: letter for letter in letters.items}
    assert by_component["coordinator"].reason == "not_a_map"
    assert by_component["coordinator"].subject == subjects.frame("bm")
    assert by_component["coordinator"].data == b"\x93\x01\x02\x03"
    assert by_component["agent-accel"].reason == "not_msgpack"
    assert by_component["agent-accel"].data == b"\xc1\xc1"
    assert by_component["agent-accel"].error

    await replay_frames(
        Producer(parts.nc, subjects), basicmotions, stream="bm", rate_hz=200, limit=10
    )
    await decisions.wait_for(10)
    assert all(d.status == "complete" for d in decisions.items)
    assert parts.agents[0].stats()["dead_letters"] == 1


async def test_frame_the_plan_cannot_read_is_dead_lettered(pipeline: StartPipeline) -> None:
    """A frame whose sensor data is not [samples, channels] is refused with its reason (no
    SensorFrame can hold it, so it is sent as a hand-made map)."""
    parts = await pipeline()
    letters = await Collector(DeadLetter).start(parts.nc, parts.subjects.all_dlq())
    frame = {
        "v": 1,
        "kind": "sensor_frame",
        "stream": "bm",
        "t_ns": 1,
        "period_ns": 1,
        "sensors": {"accel": encode_array(np.zeros(5, np.float32))},
    }
    await parts.nc.publish(parts.subjects.frame("bm"), msgpack.packb(frame))
    [letter] = await letters.wait_for(1)
    assert letter.component == "coordinator"
    assert letter.reason == "bad_field" and "must be [n, channels]" in letter.error
