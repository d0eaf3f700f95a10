"""The coordinator's write-behind journal of open tasks, written a page at a time.

Every ``interval_ms`` one page goes to a :class:`~bus.PageLog`: the tasks that changed
(opened, or a result seen) and are still open, and the ids of written tasks that have
ended since. A task that opens and ends within one interval (the usual case) is never
written at all; under load, a whole interval's tasks cost one write. Replaying the pages
in order gives the open tasks, so a coordinator killed and restarted finishes every task
it had open. Pages also carry each stream's *cursor* (the start of its first window not yet
cut) when it moved, so a restarted coordinator never cuts a window twice. Pages at the front
whose every record and cursor has been ended or rewritten later are dropped with one purge.
What the last interval had not written yet is not lost in a crash: the sensor data of those
tasks is acked only after the page that holds them is stored, so a restarted coordinator
is given it again and opens the same tasks.
"""

from __future__ import annotations

from collections import Counter

import structlog

from bus import PageLog
from coordinator.tracker import OpenTask
from schemas import CODEC, OpenTaskPage, OpenTaskRecord, PendingStage, SchemaError, encode

log = structlog.get_logger("fusebus.coordinator")


def to_record(entry: OpenTask) -> OpenTaskRecord:
    """The journal record of an open task."""
    task = entry.task
    return OpenTaskRecord(
        task_id=task.task_id,
        stream=task.stream,
        window=task.window,
        expected=task.expected,
        deadline_ns=task.deadline_ns,
        ingest_ns=task.ingest_ns,
        seen=tuple(sorted(entry.seen)),
        unavailable=tuple(sorted(entry.unavailable)),
        missing_sensors=entry.missing_sensors,
        errored=tuple(sorted(entry.errored)),
        stages=tuple(sorted(entry.stages)),
        pending=tuple(
            PendingStage(type=name, after=w.after, optional=w.optional, inputs=w.inputs)
            for name, w in entry.waiting.items()
        ),
        blocked=dict(entry.blocked),
    )


class TaskJournal:
    """Tracks which open tasks changed and writes them out a page at a time."""

    def __init__(self, pages: PageLog) -> None:
        self.pages = pages
        self._dirty: dict[str, OpenTask] = {}
        self._ended: list[str] = []  # written tasks that ended since the last page
        self._page_of: dict[str, int] = {}  # task id -> the page holding its latest record
        self._cursor_page: dict[str, int] = {}  # stream -> the page holding its latest cursor
        self._writing: set[str] = set()  # in the page being written now
        self._ended_while_writing: set[str] = set()
        self._live = Counter[int]()  # page -> how many of its records are still current
        self._front = 0  # every page before this one is dropped
        self.writes = 0  # records written
        self.pages_written = 0

    def __repr__(self) -> str:
        return (
            f"TaskJournal(dirty={len(self._dirty)} written={len(self._page_of)} "
            f"pages={len(self._live)} writes={self.writes})"
        )

    def changed(self, entry: OpenTask) -> None:
        """``entry`` opened or saw a result: write it at the next flush if still open."""
        self._dirty[entry.task.task_id] = entry

    def ended(self, task_id: str) -> None:
        """``task_id`` ended: never write it again, and mark a written record as done."""
        self._dirty.pop(task_id, None)
        page = self._page_of.pop(task_id, None)
        if page is not None:
            self._retire(page)
        if page is not None or task_id in self._writing:
            self._ended.append(task_id)  # the next page says so
        if task_id in self._writing:
            self._ended_while_writing.add(task_id)

    async def flush(
        self, cursors: dict[str, int] | None = None, forgotten: tuple[str, ...] = ()
    ) -> None:
        """Write one page of what changed (more if it would not fit in one), with the
        ``cursors`` that moved and the streams ``forgotten``, then drop the pages at the
        front that no longer hold a current record or cursor."""
        cursors = cursors or {}
        if self._dirty or self._ended or cursors or forgotten:
            records = [to_record(entry) for entry in self._dirty.values()]
            ended, self._dirty, self._ended = tuple(self._ended), {}, []
            self._writing = {record.task_id for record in records}
            for stream in forgotten:
                held_in = self._cursor_page.pop(stream, None)
                if held_in is not None:
                    self._retire(held_in)
            try:
                for page, data in self._pages(records, ended, cursors, forgotten):
                    self._written(page, await self.pages.append(data))
            finally:
                self._writing, self._ended_while_writing = set(), set()
        await self._compact()

    def _pages(
        self,
        records: list[OpenTaskRecord],
        ended: tuple[str, ...],
        cursors: dict[str, int],
        forgotten: tuple[str, ...],
    ) -> list[tuple[OpenTaskPage, bytes]]:
        """``records`` and the rest as encoded pages the server takes, halving the records
        until they fit (the ids, cursors and streams go with the first half)."""
        page = OpenTaskPage(
            records=tuple(records), ended=ended, cursors=cursors, forgotten=forgotten
        )
        data = encode(page)
        if len(records) < 2 or len(data) <= self.pages.max_page_bytes // 2:
            return [(page, data)]
        half = len(records) // 2
        first = self._pages(records[:half], ended, cursors, forgotten)
        return first + self._pages(records[half:], (), {}, ())

    def _written(self, page: OpenTaskPage, sequence: int) -> None:
        self.pages_written += 1
        self.writes += len(page.records)
        for record in page.records:
            if record.task_id in self._ended_while_writing:
                continue  # ended meanwhile: the next page retires this record
            previous = self._page_of.get(record.task_id)
            if previous is not None:
                self._retire(previous)
            self._page_of[record.task_id] = sequence
            self._live[sequence] += 1
        for stream in page.cursors:
            previous = self._cursor_page.get(stream)
            if previous is not None:
                self._retire(previous)
            self._cursor_page[stream] = sequence
            self._live[sequence] += 1
        if not page.records and not page.cursors:
            self._live[sequence] += 0  # a page of ended ids only: known, and spent at once

    def _retire(self, page: int) -> None:
        self._live[page] -= 1

    async def _compact(self) -> None:
        if all(live > 0 for live in self._live.values()):
            return  # nothing spent
        oldest_live = min((page for page, live in self._live.items() if live > 0), default=None)
        newest = max(self._live)
        front = oldest_live if oldest_live is not None else newest + 1
        if front > self._front:
            await self.pages.drop_before(front)
            self._front = front
            for page in [p for p in self._live if p < front]:
                del self._live[page]

    async def load(self) -> tuple[list[OpenTaskRecord], dict[str, int]]:
        """The tasks a previous run left open and the cursor of each stream, from replaying
        its pages in order."""
        open_tasks: dict[str, tuple[int, OpenTaskRecord]] = {}
        cursors: dict[str, tuple[int, int]] = {}
        for stored in await self.pages.load():
            try:
                page = CODEC.decode(stored.data, OpenTaskPage)
            except SchemaError as exc:
                log.warning("journal.bad_page", sequence=stored.sequence, error=str(exc))
                continue
            for record in page.records:
                open_tasks[record.task_id] = (stored.sequence, record)
            for task_id in page.ended:
                open_tasks.pop(task_id, None)
            for stream in page.forgotten:
                cursors.pop(stream, None)
            for stream, start in page.cursors.items():
                cursors[stream] = (stored.sequence, start)
            self._live[stored.sequence] += 0
        for task_id, (sequence, _) in open_tasks.items():
            self._page_of[task_id] = sequence
            self._live[sequence] += 1
        for stream, (sequence, _) in cursors.items():
            self._cursor_page[stream] = sequence
            self._live[sequence] += 1
        records = [record for _, record in open_tasks.values()]
        return records, {stream: start for stream, (_, start) in cursors.items()}
