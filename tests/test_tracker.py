"""The task tracker decides, as pure code, how every task ends."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator import Ended, Seen, TaskTracker
from coordinator.journal import to_record
from schemas import CODEC, OpenTaskPage, PendingStage, Task, Window, encode

MS = 1_000_000


def open_task(
    tracker: TaskTracker,
    task_id: str = "t1",
    *,
    stream: str = "s",
    start: int = 0,
    deadline_ns: int = 100 * MS,
    unavailable: frozenset[str] = frozenset(),
    max_inflight: int | None = None,
) -> list[Ended]:
    task = Task(task_id, stream, Window(start, start + 10), ("accel", "gyro"), 0, deadline_ns)
    return tracker.open(task, unavailable=unavailable, max_inflight=max_inflight)


def test_task_completes_when_every_type_answers() -> None:
    """The last expected result ends the task as complete, with nothing missing."""
    tracker = TaskTracker()
    assert open_task(tracker) == []
    assert tracker.record("t1", "accel") == (Seen.NEW, None)
    seen, ended = tracker.record("t1", "gyro")
    assert seen is Seen.NEW and ended is not None
    assert (ended.state, ended.missing) == ("complete", ())
    assert len(tracker) == 0 and tracker.counts["complete"] == 1


def test_repeated_result_is_ignored_and_counted() -> None:
    """A redelivered result does not count twice."""
    tracker = TaskTracker()
    open_task(tracker)
    tracker.record("t1", "accel")
    assert tracker.record("t1", "accel") == (Seen.REPEAT, None)
    assert tracker.counts["repeat"] == 1 and "t1" in tracker


def test_deadline_ends_task_partial_with_missing_types() -> None:
    """At its deadline a task with some results ends partial, naming who is missing."""
    tracker = TaskTracker()
    open_task(tracker, deadline_ns=50 * MS)
    tracker.record("t1", "accel")
    assert tracker.expire(49 * MS) == []
    [ended] = tracker.expire(50 * MS)
    assert (ended.state, ended.missing, ended.reason) == ("partial", ("gyro",), "deadline")


def test_deadline_ends_task_failed_without_results() -> None:
    """A task nobody answered ends failed, with every type missing."""
    tracker = TaskTracker()
    open_task(tracker)
    [ended] = tracker.expire(10**12)
    assert (ended.state, ended.missing) == ("failed", ("accel", "gyro"))


def test_result_after_the_end_is_late_and_unknown_ids_are_unknown() -> None:
    """Results for ended tasks are recognised as late; never-opened ids as unknown."""
    tracker = TaskTracker()
    open_task(tracker)
    tracker.expire(10**12)
    assert tracker.record("t1", "gyro") == (Seen.LATE, None)
    assert tracker.record("nope", "gyro") == (Seen.UNKNOWN, None)
    assert (tracker.counts["late"], tracker.counts["unknown"]) == (1, 1)


def test_every_task_ends_exactly_once() -> None:
    """Whatever the order of events, each opened task ends once."""
    tracker = TaskTracker()
    ended = []
    for i in range(50):
        ended += open_task(tracker, f"t{i}", start=i * 10, deadline_ns=(i + 1) * MS)
    for i in range(0, 50, 2):
        for type_name in ("accel", "gyro", "accel"):
            _, done = tracker.record(f"t{i}", type_name)
            ended += [done] if done else []
    ended += tracker.expire(10**12)
    assert sorted(e.task.task_id for e in ended) == sorted(f"t{i}" for i in range(50))
    assert tracker.counts["complete"] == 25 and tracker.counts["failed"] == 25


def test_next_deadline_skips_ended_tasks() -> None:
    """The earliest deadline is that of a task still open."""
    tracker = TaskTracker()
    open_task(tracker, "a", start=0, deadline_ns=5)
    open_task(tracker, "b", start=10, deadline_ns=9)
    assert tracker.next_deadline_ns() == 5
    tracker.record("a", "accel")
    tracker.record("a", "gyro")
    assert tracker.next_deadline_ns() == 9


def test_over_max_inflight_the_oldest_task_is_shed() -> None:
    """Past the in-flight bound the oldest open task of that stream ends, counted as shed."""
    tracker = TaskTracker()
    open_task(tracker, "a", start=0, max_inflight=2)
    open_task(tracker, "b", start=10, max_inflight=2)
    open_task(tracker, "other", stream="s2", start=0, max_inflight=2)
    [shed] = open_task(tracker, "c", start=20, max_inflight=2)
    assert shed.task.task_id == "a" and shed.reason.startswith("shed")
    assert tracker.open_in("s") == 2 and tracker.open_in("s2") == 1 and tracker.counts["shed"] == 1


def test_types_without_input_end_the_task_once_the_rest_answer() -> None:
    """A type that could not be published is missing from the start; the task ends when the rest are in."""
    tracker = TaskTracker()
    assert open_task(tracker, unavailable=frozenset({"gyro"})) == []
    _, ended = tracker.record("t1", "accel")
    assert ended is not None and (ended.state, ended.missing) == ("partial", ("gyro",))


def test_task_nobody_can_answer_ends_failed_at_once() -> None:
    """With no input for any type, the task fails immediately instead of waiting."""
    tracker = TaskTracker()
    [ended] = open_task(tracker, unavailable=frozenset({"accel", "gyro"}))
    assert ended.state == "failed"


def test_opening_the_same_id_twice_is_an_error() -> None:
    """Task ids are unique."""
    tracker = TaskTracker()
    open_task(tracker)
    with pytest.raises(ValueError, match="already opened"):
        open_task(tracker)


def test_restored_tasks_keep_their_results_and_end_once() -> None:
    """A journalled task comes back with the types it had heard; a settled one ends at once;
    one already known is left alone."""
    from schemas import OpenTaskRecord

    tracker = TaskTracker()
    waiting = OpenTaskRecord(
        task_id="w",
        stream="s",
        window=Window(0, 10),
        expected=("accel", "gyro"),
        deadline_ns=5,
        ingest_ns=0,
        seen=("accel",),
    )
    done = OpenTaskRecord(
        task_id="d",
        stream="s",
        window=Window(10, 20),
        expected=("accel", "gyro"),
        deadline_ns=5,
        ingest_ns=0,
        seen=("accel",),
        unavailable=("gyro",),
        missing_sensors=("gyro",),
    )
    assert tracker.restore(waiting) == []
    [ended] = tracker.restore(done)
    assert (ended.state, ended.missing, ended.missing_sensors) == ("partial", ("gyro",), ("gyro",))
    assert tracker.restore(waiting) == [] and tracker.counts["restored"] == 2
    _, closed = tracker.record("w", "gyro")
    assert closed is not None and closed.state == "complete"


def test_an_error_answer_ends_the_wait_but_leaves_the_type_missing() -> None:
    """An agent that answers with an error is heard (the task need not wait out its
    deadline) but gave no vote: the task is partial, or failed when every answer was one."""
    tracker = TaskTracker()
    open_task(tracker, "t1")
    tracker.record("t1", "accel")
    seen, ended = tracker.record("t1", "gyro", error=True)
    assert seen is Seen.NEW and ended is not None
    assert (ended.state, ended.missing) == ("partial", ("gyro",))
    open_task(tracker, "t2", start=100)
    tracker.record("t2", "accel", error=True)
    _, ended = tracker.record("t2", "gyro", error=True)
    assert ended is not None and (ended.state, ended.missing) == ("failed", ("accel", "gyro"))


# Chains ------------------------------------------------------------------------------------
FEATURES = np.arange(4, dtype=np.float32)


def open_chain(
    tracker: TaskTracker,
    *waiting: PendingStage,
    expected: tuple[str, ...] = ("head",),
    stages: frozenset[str] = frozenset({"enc_a", "enc_b"}),
    unavailable: frozenset[str] = frozenset(),
) -> list[Ended]:
    task = Task("t1", "s", Window(0, 10), expected, 0, 100 * MS)
    return tracker.open(task, unavailable=unavailable, stages=stages, waiting=waiting)


HEAD = PendingStage(type="head", after=("enc_a", "enc_b"))


def test_a_stage_is_ready_once_every_upstream_answered_with_their_outputs() -> None:
    """The head waits for both encoders; the second answer makes it ready with both
    outputs as inputs; its own answer completes the task."""
    tracker = TaskTracker()
    assert open_chain(tracker, HEAD) == []
    assert tracker.take_ready() == []
    assert tracker.record("t1", "enc_a", output=FEATURES) == (Seen.NEW, None)
    assert tracker.take_ready() == []
    tracker.record("t1", "enc_b", output=FEATURES * 2)
    (ready,) = tracker.take_ready()
    assert ready.type == "head" and sorted(ready.inputs) == ["enc_a", "enc_b"]
    assert np.array_equal(ready.inputs["enc_b"], FEATURES * 2)
    _, ended = tracker.record("t1", "head")
    assert ended is not None and (ended.state, ended.missing) == ("complete", ())


def test_an_upstream_error_blocks_its_readers_down_the_chain() -> None:
    """enc_a errors: head, which needs it, is blocked, and so is top, which reads head;
    the task ends at once, failed, each with its reason."""
    tracker = TaskTracker()
    top = PendingStage(type="top", after=("head",))
    open_chain(tracker, HEAD, top, expected=("top",), stages=frozenset({"enc_a", "enc_b", "head"}))
    _, ended = tracker.record("t1", "enc_a", error=True)
    assert tracker.take_ready() == []
    assert ended is not None and ended.state == "failed" and ended.missing == ("top",)
    assert ended.missing_reasons == {
        "top": "upstream: head",
        "enc_a": "error",
        "enc_b": "no answer",  # still due when the task ended
        "head": "upstream: enc_a",
    }


def test_an_optional_upstream_with_no_input_is_not_waited_for() -> None:
    """enc_b has no sensor data: the head, for which it is optional, is ready as soon as
    enc_a answers, without enc_b's input."""
    tracker = TaskTracker()
    head = PendingStage(type="head", after=("enc_a",), optional=("enc_b",))
    open_chain(tracker, head, unavailable=frozenset({"enc_b"}))
    tracker.record("t1", "enc_a", output=FEATURES)
    (ready,) = tracker.take_ready()
    assert list(ready.inputs) == ["enc_a"]


def test_an_optional_upstream_that_may_still_come_is_waited_for() -> None:
    """Both encoders may answer: the head waits for the optional one too, and takes it."""
    tracker = TaskTracker()
    head = PendingStage(type="head", after=("enc_a",), optional=("enc_b",))
    open_chain(tracker, head)
    tracker.record("t1", "enc_a", output=FEATURES)
    assert tracker.take_ready() == []
    tracker.record("t1", "enc_b", output=FEATURES)
    (ready,) = tracker.take_ready()
    assert sorted(ready.inputs) == ["enc_a", "enc_b"]


def test_a_stage_with_only_optional_upstreams_and_none_arriving_is_blocked() -> None:
    """Nothing to run on: the head is blocked, naming the upstreams that did not come."""
    tracker = TaskTracker()
    head = PendingStage(type="head", optional=("enc_a", "enc_b"))
    (ended,) = open_chain(tracker, head, unavailable=frozenset({"enc_a", "enc_b"}))
    assert ended.state == "failed"
    assert ended.missing_reasons["head"] == "upstream: enc_a,enc_b"
    assert tracker.take_ready() == []


def test_at_the_deadline_a_waiting_stage_is_missing_with_its_upstream_named() -> None:
    """enc_b never answers: at the deadline the head was never published, and says why."""
    tracker = TaskTracker()
    open_chain(tracker, HEAD, expected=("head", "solo"))
    tracker.record("t1", "enc_a", output=FEATURES)
    tracker.record("t1", "solo")
    (ended,) = tracker.expire(100 * MS)
    assert ended.state == "partial" and ended.missing == ("head",)
    assert ended.missing_reasons == {"head": "upstream: enc_b", "enc_b": "deadline"}


def test_answers_that_come_before_the_task_feed_its_stages_when_it_opens() -> None:
    """After a restart an encoder's result may come before the data that reopens its
    task: its output is kept and given to the head when the task opens."""
    tracker = TaskTracker()
    assert tracker.record("t1", "enc_a", output=FEATURES)[0] is Seen.UNKNOWN
    tracker.record("t1", "enc_b", output=FEATURES)
    open_chain(tracker, HEAD)
    (ready,) = tracker.take_ready()
    assert np.array_equal(ready.inputs["enc_a"], FEATURES)


def test_a_restored_chain_keeps_its_waiting_stages_and_their_inputs() -> None:
    """The journal record of a half-done chain restores it: the waiting head still has
    enc_a's output, and enc_b's answer after the restart makes it ready."""
    before = TaskTracker()
    open_chain(before, HEAD)
    before.record("t1", "enc_a", output=FEATURES)
    entry = before.get("t1")
    assert entry is not None
    record = CODEC.decode(encode(OpenTaskPage(records=(to_record(entry),))), OpenTaskPage)
    after = TaskTracker()
    assert after.restore(record.records[0]) == []
    assert after.take_ready() == []
    after.record("t1", "enc_b", output=FEATURES)
    (ready,) = after.take_ready()
    assert np.array_equal(ready.inputs["enc_a"], FEATURES)
    assert after.record("t1", "enc_a") == (Seen.REPEAT, None)  # answered before the restart


def test_a_stage_whose_inputs_outgrow_one_message_is_blocked_with_the_reason() -> None:
    """Upstream answers too large to travel (or be journalled) together block the stage
    rather than sink the batch it would join."""
    tracker = TaskTracker(max_stage_bytes=1000)
    open_chain(tracker, HEAD)
    tracker.record("t1", "enc_a", output=np.zeros(200, np.float32))  # 800 bytes: fits
    _, ended = tracker.record("t1", "enc_b", output=np.zeros(200, np.float32))
    assert tracker.take_ready() == []
    assert ended is not None and ended.state == "failed"
    assert ended.missing_reasons["head"] == "too_large: 1600 bytes of inputs"


def test_outputs_kept_for_tasks_not_yet_open_are_bounded_in_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past the budget an early answer is remembered without its output, so answers for
    tasks that never open cannot grow memory; forgetting them gives the budget back."""
    monkeypatch.setattr("coordinator.tracker.ORPHAN_OUTPUT_BYTES", 1000)
    tracker = TaskTracker(remember_orphans=2)
    tracker.record("t1", "enc_a", output=np.zeros(200, np.float32))  # 800 bytes: kept
    tracker.record("t1", "enc_b", output=np.zeros(200, np.float32))  # over: answer only
    open_chain(tracker, HEAD)
    entry = tracker.get("t1")
    assert entry is not None and entry.seen == {"enc_a", "enc_b"}
    assert list(entry.waiting["head"].inputs) == ["enc_a"]
    for i in range(3):  # x0 is kept with its output, x1 and x2 without; x0 is forgotten
        tracker.record(f"x{i}", "enc_a", output=np.zeros(200, np.float32))
    assert tracker._orphan_bytes == 0
    tracker.record("x3", "enc_a", output=np.zeros(200, np.float32))  # the budget is back
    assert tracker._orphan_bytes == 800
