"""The coordinator's paged journal against a real nats-server: what a restart gets back,
and that spent pages are dropped."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from nats.aio.client import Client

from bus import PageLog, Subjects
from coordinator.journal import TaskJournal
from coordinator.tracker import OpenTask
from schemas import Task, Window

Connect = Callable[[str], Awaitable[Client]]


def task(index: int, seen: tuple[str, ...] = ()) -> OpenTask:
    # The deadline is far away, and within 64 bits as the wire requires.
    return OpenTask(
        Task(f"s:{index}:x", "s", Window(index, index + 1), ("a", "b"), index, 2**62),
        seen=set(seen),
    )


async def journal_of(nc: Client, subjects: Subjects, name: str = "main") -> TaskJournal:
    pages = PageLog(
        nc,
        stream=subjects.journal_stream,
        stream_subjects=subjects.all_journals(),
        subject=subjects.journal(name),
    )
    await pages.ensure()
    return TaskJournal(pages)


async def stored_pages(nc: Client, subjects: Subjects) -> int:
    return (await nc.jetstream().stream_info(subjects.journal_stream)).state.messages


async def test_a_restart_gets_back_exactly_the_tasks_still_open(
    subjects: Subjects, connect_bus: Connect
) -> None:
    """Pages replayed in order: the latest record of each task wins, ended tasks are gone,
    and tasks that ended before they were ever written cost nothing."""
    nc = await connect_bus("test")
    journal = await journal_of(nc, subjects)
    for i in range(5):
        journal.changed(task(i))
    journal.changed(task(9))
    journal.ended("s:9:x")  # opened and ended within one interval: never written
    await journal.flush()
    assert journal.writes == 5 and journal.pages_written == 1
    journal.changed(task(1, seen=("a",)))
    journal.ended("s:0:x")
    journal.ended("s:2:x")
    await journal.flush()

    restored, _ = await (await journal_of(nc, subjects)).load()
    assert sorted(r.task_id for r in restored) == ["s:1:x", "s:3:x", "s:4:x"]
    assert next(r for r in restored if r.task_id == "s:1:x").seen == ("a",)


async def test_spent_pages_are_dropped_and_each_coordinator_keeps_its_own(
    subjects: Subjects, connect_bus: Connect
) -> None:
    """Once every task of the front pages has ended, those pages are purged; another
    coordinator's pages in the same stream are untouched."""
    nc = await connect_bus("test")
    other = await journal_of(nc, subjects, "other")
    other.changed(task(100))
    await other.flush()
    journal = await journal_of(nc, subjects)
    for round_ in range(4):
        for i in range(50):
            journal.changed(task(round_ * 50 + i))
        await journal.flush()
    assert await stored_pages(nc, subjects) == 5
    for i in range(100):  # the first two pages' tasks end
        journal.ended(f"s:{i}:x")
    await journal.flush()  # writes a page of ended ids, then drops the two spent pages
    assert await stored_pages(nc, subjects) == 4
    for i in range(100, 200):
        journal.ended(f"s:{i}:x")
    await journal.flush()
    assert await stored_pages(nc, subjects) == 1  # only the other coordinator's page
    assert (await (await journal_of(nc, subjects)).load())[0] == []
    assert [r.task_id for r in (await (await journal_of(nc, subjects, "other")).load())[0]] == [
        "s:100:x"
    ]


async def test_a_task_that_ends_while_its_page_is_written_is_not_restored(
    subjects: Subjects, connect_bus: Connect
) -> None:
    """The record already on its way is cancelled by the next page."""
    nc = await connect_bus("test")
    journal = await journal_of(nc, subjects)
    append = journal.pages.append

    async def slow_append(page: bytes) -> int:
        journal.ended("s:1:x")  # the task ends while its page is in flight
        return await append(page)

    journal.changed(task(1))
    journal.changed(task(2))
    journal.pages.append = slow_append  # type: ignore[method-assign]
    await journal.flush()
    journal.pages.append = append  # type: ignore[method-assign]
    await journal.flush()
    restored, _ = await (await journal_of(nc, subjects)).load()
    assert [r.task_id for r in restored] == ["s:2:x"]


async def test_a_write_too_big_for_one_message_is_split_into_pages(
    subjects: Subjects, connect_bus: Connect
) -> None:
    """Under a small payload limit the tasks of one write spread over several pages, and
    all of them come back."""

    class SmallPages(PageLog):
        @property
        def max_page_bytes(self) -> int:
            return 4_000

    nc = await connect_bus("test")
    pages = SmallPages(
        nc,
        stream=subjects.journal_stream,
        stream_subjects=subjects.all_journals(),
        subject=subjects.journal("main"),
    )
    await pages.ensure()
    journal = TaskJournal(pages)
    for i in range(60):
        journal.changed(task(i))
    await journal.flush()
    assert journal.pages_written > 1 and journal.writes == 60
    restored, _ = await (await journal_of(nc, subjects)).load()
    assert len(restored) == 60


async def test_a_journal_stream_of_an_earlier_layout_is_switched_to_pages(
    subjects: Subjects, connect_bus: Connect
) -> None:
    """A stream made when the journal kept one subject per task takes pages after ensure."""
    from nats.js.api import StreamConfig

    nc = await connect_bus("test")
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(name=subjects.journal_stream, subjects=[f"{subjects.journal('main')}.*"])
    )
    journal = await journal_of(nc, subjects)
    journal.changed(task(1))
    await journal.flush()
    assert [r.task_id for r in (await (await journal_of(nc, subjects)).load())[0]] == ["s:1:x"]
