"""`fusebus status` tells the truth: fusion agents apart by name, replicas added up, planned
types nobody serves named."""

from __future__ import annotations

import dataclasses
from typing import Any

from fusebus.status import BusStatus, TypeStatus, fusion_groups, render_status, render_summary
from schemas import AgentInfo, InputSpec, ModelRef


def fusion(
    name: str, complete: int, partial: int = 0, p99: float = 5.0
) -> tuple[str, dict[str, Any]]:
    return (
        "fusion",
        {
            "name": name,
            "decisions_complete": complete,
            "decisions_partial": partial,
            "decisions_failed": 0,
            "latency_p50_ms": 1.0,
            "latency_p99_ms": p99,
        },
    )


def coordinator(**counters: Any) -> tuple[str, dict[str, Any]]:
    return ("coordinator", {"streams": 3, "open_tasks": 2, "shed": 0, "unserved": 0, **counters})


def test_three_fusion_agents_on_one_stream_are_shown_apart() -> None:
    """Three fusion agents of different names that each decided 370 windows are three lines
    of 370, not one of 1110; two replicas of one name share the work, so they add up."""
    status = BusStatus(
        agents={},
        components=[
            coordinator(),
            fusion("alarms", 370),
            fusion("main", 200, p99=9.0),
            fusion("main", 170),
            fusion("audit", 360, partial=10),
        ],
    )
    groups = fusion_groups(status)
    assert list(groups) == ["alarms", "audit", "main"]
    assert groups["main"]["decisions_complete"] == 370 and groups["main"]["replicas"] == 2
    assert groups["main"]["latency_p99_ms"] == 9.0
    summary = render_summary(status, None, 1.0).splitlines()
    assert summary[0].startswith("streams 3 · open tasks 2")
    assert summary[1].startswith("fusion alarms (1 replica): decided 370 ")
    assert summary[2].startswith("fusion audit (1 replica): decided 370 ")
    assert "partial 10" in summary[2]
    assert summary[3].startswith("fusion main (2 replicas): decided 370 ")
    assert "1110" not in "\n".join(summary)


def test_decision_rate_is_per_fusion_name() -> None:
    """Decisions/s compares each fusion name with its own previous count."""
    before = BusStatus(agents={}, components=[fusion("main", 100), fusion("audit", 0)])
    after = BusStatus(agents={}, components=[fusion("main", 150), fusion("audit", 10)])
    lines = render_summary(after, before, 2.0).splitlines()
    assert "decisions/s 5.0" in lines[1] and lines[1].startswith("fusion audit")
    assert "decisions/s 25.0" in lines[2] and lines[2].startswith("fusion main")


def test_a_planned_type_with_no_replicas_gets_a_line() -> None:
    """A type some coordinator's plan lists, with no agent running, is named as such."""
    status = BusStatus(agents={}, components=[coordinator(unserved_types=["g3x"], unserved=12)])
    table = render_status(status).splitlines()
    assert any(line.startswith("g3x: no replicas") for line in table)
    assert "unserved subtasks 12" in render_summary(status, None, 1.0)
    assert "(no fusion agent running)" in render_summary(status, None, 1.0)


def test_a_chain_stage_says_what_it_reads_and_answers() -> None:
    """A type that reads other types' answers, or answers features, gets a line saying so."""
    stage = AgentInfo(
        agent_id="head-1",
        type="head",
        model=ModelRef("head", "1"),
        runtime="litert",
        inputs=(InputSpec("enc_a", stage=True, shape=(8,)), InputSpec("enc_b", stage=True)),
        labels=("a", "b"),
    )
    encoder = AgentInfo(
        agent_id="enc-1",
        type="enc_a",
        model=ModelRef("enc", "1"),
        runtime="litert",
        inputs=(InputSpec("accel", 100, 3),),
        labels=(),
        output="features",
        output_shape=(8,),
    )
    plain = dataclasses.replace(encoder, type="accel", output="scores", labels=("a",))
    agents = {
        info.type: TypeStatus(info.type, replicas=[(info, {})]) for info in (stage, encoder, plain)
    }
    table = render_status(BusStatus(agents=agents, components=[])).splitlines()
    assert "head: a chain stage: reads enc_a, enc_b; answers scores" in table
    assert "enc_a: a chain stage: answers features [8]" in table
    assert not any(line.startswith("accel: a chain stage") for line in table)


def test_each_replica_says_which_versions_it_serves_during_a_rollout() -> None:
    """Two replicas mid-rollout: the model column lists both versions, and each replica gets
    a line with what it serves (a canary, a shadow) and any version it refused."""
    info = AgentInfo(
        agent_id="accel-a",
        type="accel",
        model=ModelRef("accel", "1"),
        runtime="litert",
        inputs=(InputSpec("accel", 100, 3),),
        labels=("x", "y"),
    )
    switched = {"serving": [{"name": "accel", "model": "accel@2", "canary": "accel@3 10%"}]}
    behind = {"serving": [{"name": "accel", "model": "accel@1"}], "refused": {"accel@4": "bad"}}
    status = BusStatus(
        agents={
            "accel": TypeStatus(
                "accel",
                [(info, switched), (dataclasses.replace(info, agent_id="accel-b"), behind)],
            )
        },
        components=[],
    )
    lines = render_status(status).splitlines()
    assert lines[1].split()[3] == "accel@2,accel@1"
    assert "accel: accel-a serves accel@2 (canary accel@3 10%)" in lines
    assert "accel: accel-b serves accel@1" in lines
    assert "accel: accel-b refused accel@4: bad" in lines


def test_replicas_serving_the_model_they_started_with_get_no_extra_lines() -> None:
    info = AgentInfo(
        agent_id="gyro-a",
        type="gyro",
        model=ModelRef("gyro", "1"),
        runtime="litert",
        inputs=(InputSpec("gyro", 100, 3),),
        labels=("x",),
    )
    plain = {"serving": [{"name": "gyro", "model": "gyro@1"}], "refused": {}}
    status = BusStatus(agents={"gyro": TypeStatus("gyro", [(info, plain)])}, components=[])
    assert len(render_status(status).splitlines()) == 2
