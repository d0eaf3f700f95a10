"""Errors at the door: data the pipeline cannot use is refused when it arrives, with the
reason in the producer's answer and a dead letter, and a planned type nobody serves is said
at once."""

from __future__ import annotations

import numpy as np
import pytest
import structlog

from bus import Producer
from coordinator import KnownType, Plan, SensorInput, SubtaskSpec, basicmotions_plan
from coordinator.admission import MAX_AHEAD_NS, check_chunk, check_frame
from coordinator.plan import SensorSpec
from fusebus.datasets import SensorDataset
from schemas import DeadLetter, Decision, InputSpec, SchemaError, SensorChunk, SensorFrame
from tests.helpers import Collector, Pipeline, eventually
from tests.test_reliability import StartPipeline, frame_of

NOW = 1_800_000_000 * 10**9
ACCEL_CARD = {"accel": KnownType("accel", (InputSpec("accel", 100, 3),), 1, 0.0)}


def frame(**sensors: tuple[int, int]) -> SensorFrame:
    arrays = {name: np.zeros(shape, np.float32) for name, shape in sensors.items()}
    return SensorFrame(stream="s", t_ns=NOW, period_ns=10**8, sensors=arrays)


def refusal(call: object) -> str:
    with pytest.raises(SchemaError) as caught:
        call()  # type: ignore[operator]
    return caught.value.reason


def test_frames_are_checked_against_the_plan_and_the_cards_of_their_readers() -> None:
    """Undeclared and missing required sensors, unequal lengths, a clock far ahead and a shape
    the reading type's card does not take are each refused with their own reason; a frame
    lacking only an optional sensor passes and names it."""
    plan = basicmotions_plan()  # accel required, gyro optional
    good = frame(accel=(100, 3), gyro=(100, 3))
    assert check_frame(good, plan, ACCEL_CARD, NOW) == ()
    assert check_frame(frame(accel=(100, 3)), plan, ACCEL_CARD, NOW) == ("gyro",)
    cases = {
        "unknown_sensor": frame(accel=(100, 3), magnet=(100, 3)),
        "missing_sensor": frame(gyro=(100, 3)),
        "bad_shape": frame(accel=(50, 3), gyro=(50, 3)),  # the accel card reads 100 x 3
    }
    for reason, bad in cases.items():
        assert refusal(lambda bad=bad: check_frame(bad, plan, ACCEL_CARD, NOW)) == reason
    uneven = frame(accel=(100, 3), gyro=(90, 3))
    assert refusal(lambda: check_frame(uneven, plan, ACCEL_CARD, NOW)) == "bad_shape"
    ahead = NOW - MAX_AHEAD_NS - 1  # the frame's time is more than the allowance ahead
    assert refusal(lambda: check_frame(good, plan, ACCEL_CARD, ahead)) == "future"
    # No running reader: the shape is not held against it (nothing declares one).
    assert check_frame(frame(accel=(50, 3)), plan, {}, NOW) == ("gyro",)


def test_channel_selections_are_checked_against_the_data_and_the_card() -> None:
    """A type reading channels a sensor does not have, or a number of channels its card does
    not take, is refused for frames and chunks alike."""
    plan = Plan(
        subtasks=(SubtaskSpec("accel", (SensorInput("accel", (0, 1)),)),),
        sensors=(SensorSpec("accel"),),
    )
    two = {"accel": KnownType("accel", (InputSpec("accel", 0, 2),), 1, 0.0)}
    assert check_frame(frame(accel=(100, 3)), plan, two, NOW) == ()
    assert refusal(lambda: check_frame(frame(accel=(100, 1)), plan, two, NOW)) == "bad_shape"
    three = {"accel": KnownType("accel", (InputSpec("accel", 0, 3),), 1, 0.0)}
    assert refusal(lambda: check_frame(frame(accel=(100, 3)), plan, three, NOW)) == "bad_shape"
    chunk = SensorChunk(
        stream="s", sensor="accel", t0_ns=NOW, period_ns=10**8, samples=np.zeros((10, 1))
    )
    assert refusal(lambda: check_chunk(chunk, plan, two, NOW)) == "bad_shape"
    future = SensorChunk(
        stream="s",
        sensor="accel",
        t0_ns=NOW + 2 * MAX_AHEAD_NS,
        period_ns=1,
        samples=np.zeros((1, 3)),
    )
    assert refusal(lambda: check_chunk(future, plan, {}, NOW)) == "future"


async def test_unusable_frames_are_refused_at_once_with_their_reason(
    pipeline: StartPipeline, basicmotions: SensorDataset
) -> None:
    """Across the bus: a frame of the wrong shape for the running accel agents, one lacking
    the required sensor, a repeat of a window and one overlapping its predecessor are each
    answered `rejected: <reason>: <what>`; the first two are dead letters, no task is opened
    for any of them, and the good frames are decided."""
    parts: Pipeline = await pipeline()
    coordinator = parts.coordinator
    assert coordinator is not None
    subjects = parts.subjects
    letters = await Collector(DeadLetter).start(parts.nc, subjects.dlq("coordinator"))
    decisions = await Collector(Decision).start_stream(parts.nc, subjects.decision("door"))
    producer = Producer(parts.nc, subjects)
    await eventually(lambda: "accel" in coordinator.directory, what="accel discovered")

    good = frame_of(basicmotions, "door", 0)
    assert await producer.frame(good, wait_s=10) == b"accepted"
    short = SensorFrame(
        stream="door",
        t_ns=good.t_ns + 10**10,
        period_ns=good.period_ns,
        sensors={name: array[:50] for name, array in good.sensors.items()},
    )
    no_accel = SensorFrame(
        stream="door", t_ns=good.t_ns + 2 * 10**10, period_ns=good.period_ns,
        sensors={"gyro": good.sensors["gyro"]},
    )  # fmt: skip
    overlapping = SensorFrame(
        stream="door", t_ns=good.t_ns + 5 * 10**9, period_ns=good.period_ns, sensors=good.sensors
    )
    answers = {
        "short": await producer.frame(short, wait_s=10),
        "no_accel": await producer.frame(no_accel, wait_s=10),
        "repeat": await producer.frame(good, wait_s=10),
        "overlapping": await producer.frame(overlapping, wait_s=10),
    }
    assert answers["short"] is not None and answers["short"].startswith(
        b"rejected: bad_shape: type 'accel' reads 'accel' as 100 x 3"
    )
    assert answers["no_accel"] == (
        b"rejected: missing_sensor: frame of stream 'door' lacks required ['accel']"
    )
    assert answers["repeat"] is not None and answers["repeat"].startswith(
        b"rejected: duplicate_window"
    )
    assert answers["overlapping"] is not None and answers["overlapping"].startswith(
        b"rejected: overlapping_window"
    )
    reasons = [letter.reason for letter in await letters.wait_for(3)]
    assert reasons == ["bad_shape", "missing_sensor", "overlapping_window"]
    [decision] = await decisions.wait_for(1)
    assert decision.status == "complete" and decision.window.t_start_ns == good.t_ns
    assert coordinator.tracker.counts["opened"] == 1
    assert coordinator.tracker.counts["duplicate_windows"] == 1
    assert coordinator.stats()["streams"] == 1  # a frame stream counts as a stream


async def test_a_planned_type_nobody_serves_is_said_at_once_and_counted(
    pipeline: StartPipeline, basicmotions: SensorDataset
) -> None:
    """A plan listing `g3x` (a typo) with no replica running: the coordinator warns at start,
    names it in its stats, and counts every subtask sent to it."""
    plan = Plan(
        subtasks=(
            SubtaskSpec("accel", (SensorInput("accel"),)),
            SubtaskSpec("g3x", (SensorInput("gyro"),)),
        ),
        deadline_ms=300,
    )
    with structlog.testing.capture_logs() as logs:
        parts: Pipeline = await pipeline(plan=plan)
    coordinator = parts.coordinator
    assert coordinator is not None
    warnings = [e for e in logs if e["event"] == "plan.type_unserved"]
    assert [e["type"] for e in warnings] == ["g3x"], logs
    assert coordinator.stats()["unserved_types"] == ["g3x"]
    decisions = await Collector(Decision).start_stream(parts.nc, parts.subjects.decision("typo"))
    producer = Producer(parts.nc, parts.subjects)
    for i in range(3):
        await producer.frame(frame_of(basicmotions, "typo", i))
    done = await decisions.wait_for(3)
    assert {(d.status, d.missing) for d in done} == {("partial", ("g3x",))}
    assert coordinator.stats()["unserved"] == 3
