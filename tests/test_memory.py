"""Memory stays bounded: streams that go idle leave nothing behind in the coordinator, and
what the coordinator and fusion remember of ended tasks is capped."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client

from agents.fusion import FusionAgent, FusionSettings
from bus import Producer, Subjects
from coordinator import Coordinator, CoordinatorSettings, PlanBook, basicmotions_plan
from fusebus.datasets import SensorDataset
from fusebus.replay import aligned_start_ns, chunk_schedule, send_schedule
from schemas import Decision
from tests.helpers import Collector, eventually
from tests.test_faults import model_agent

Connect = Callable[[str], Awaitable[Client]]
CAP = 30  # ended / decided task ids remembered
STREAMS_REMEMBERED = 10  # streams whose answering types fusion remembers


def footprint(coordinator: Coordinator, fusion: FusionAgent) -> dict[str, int]:
    """The size of every per-task and per-stream structure of the two components."""
    tracker, intake = coordinator.tracker, coordinator.intake
    journal: Any = coordinator.journal
    return {
        "open": len(tracker),
        "by_stream": len(tracker._by_stream),
        "windows": len(tracker._windows),
        "ended": len(tracker._ended),
        "orphans": len(tracker._orphans),
        "windowers": intake.stats()["streams"],
        "waiting": len(intake._waiting),
        "liveness": len(intake.liveness._last),
        "held": len(coordinator._held),
        "awaiting_ack": len(coordinator._done),
        "journal_pages": len(journal._live),
        "journal_tasks": len(journal._page_of),
        "journal_cursors": len(journal._cursor_page),
        "unconfirmed": coordinator.producer.unconfirmed,
        "pending": len(fusion.pending),
        "decided": len(fusion.decided),
        "answered_lately": len(fusion.answered_lately),
        "fusion_unconfirmed": fusion.producer.unconfirmed,
    }


async def test_idle_streams_leave_nothing_behind_and_memories_are_capped(
    connect_bus: Connect, subjects: Subjects, basicmotions: SensorDataset
) -> None:
    """Three rounds of ten new chunk streams each, every stream going idle after its windows:
    after each round the coordinator holds no stream, task or journal entry, and the ids it
    and fusion remember stay at their caps, the same after round three as after round one."""
    nc = await connect_bus("test")
    agents = [await model_agent(connect_bus, subjects, t) for t in ("accel", "gyro")]
    fusion = await FusionAgent(
        await connect_bus("fusion"),
        subjects=subjects,
        settings=FusionSettings(remember_decided=CAP, remember_streams=STREAMS_REMEMBERED),
    ).start()
    coordinator = await Coordinator(
        await connect_bus("coordinator"),
        plans=PlanBook(default=basicmotions_plan(deadline_ms=2000)),
        subjects=subjects,
        settings=CoordinatorSettings(
            forget_stream_after_s=0.4, liveness_interval_s=0.05, remember_ended_tasks=CAP
        ),
    ).start()
    decisions = await Collector(Decision).start_stream(nc, subjects.all_decisions())
    rounds = []
    try:
        for round_no in range(3):
            streams = [f"r{round_no}-{i}" for i in range(10)]
            schedule, truth = chunk_schedule(
                basicmotions,
                streams=streams,
                speed=400,
                chunk_ms=1000,
                start_ns=aligned_start_ns(basicmotions),
                limit=5,
            )
            await send_schedule(Producer(nc, subjects), schedule)
            await decisions.wait_for(sum(map(len, truth.values())) * (round_no + 1))
            await eventually(
                lambda: coordinator.intake.stats()["streams"] == 0 and not coordinator._done,
                what="streams forgotten and acked",
            )
            await coordinator._durability_point()
            rounds.append(footprint(coordinator, fusion))
    finally:
        await coordinator.stop()
        await fusion.stop()
        for agent in agents:
            await agent.stop()
    # The newest journal page may be spent and dropped, or not yet, depending on when the
    # last interval's write fell: at most that one is kept, in every round.
    assert all(r["journal_pages"] <= 1 for r in rounds), rounds
    first, *_, last = ({k: v for k, v in r.items() if k != "journal_pages"} for r in rounds)
    assert first == last, rounds
    assert last["ended"] == CAP and last["decided"] == CAP
    assert last["answered_lately"] == STREAMS_REMEMBERED
    capped = ("ended", "decided", "answered_lately", "journal_pages")
    idle = {k: v for k, v in last.items() if k not in capped}
    assert set(idle.values()) == {0}, idle
