"""Subjects come from one builder that refuses tokens which would change what they match."""

from __future__ import annotations

import pytest

from bus import Subjects
from schemas import SubjectError


def test_subjects_follow_the_documented_layout() -> None:
    """Each builder gives the subject the design names."""
    s = Subjects("fb")
    assert s.sensor("watch1", "accel") == "fb.sensor.watch1.accel"
    assert s.frame("watch1") == "fb.frame.watch1"
    assert s.task("accel") == "fb.task.accel"
    assert s.result("watch1") == "fb.result.watch1"
    assert s.status("watch1") == "fb.status.watch1"
    assert s.decision("watch1") == "fb.decision.watch1"
    assert s.dlq("coordinator") == "fb.dlq.coordinator"
    assert s.all_tasks() == "fb.task.*"
    assert (s.tasks_stream, s.results_stream, s.decisions_stream, s.dlq_stream) == (
        "FB_TASKS",
        "FB_RESULTS",
        "FB_DECISIONS",
        "FB_DLQ",
    )
    assert s.task_consumer("gyro") == "agent-gyro"


@pytest.mark.parametrize("token", ["a.b", "a*", ">", "a b", "", "tab\there"])
def test_bad_tokens_are_refused(token: str) -> None:
    """A dot, wildcard or white space in a token is an error, not a different subject."""
    with pytest.raises(SubjectError):
        Subjects("fb").frame(token)


def test_prefix_is_checked_and_names_streams() -> None:
    """The prefix is one token and gives the stream names their stem."""
    with pytest.raises(SubjectError):
        Subjects("fb.x")
    assert Subjects("t-42").tasks_stream == "T-42_TASKS"


def test_stream_of_reads_the_stream_token() -> None:
    """The stream id is read back from a per-stream subject."""
    s = Subjects("fb")
    assert s.stream_of("fb.frame.watch7") == "watch7"
    with pytest.raises(SubjectError):
        s.stream_of("other.frame.watch7")
