"""The coordinator's write-behind journal of open tasks.

Every ``interval_ms`` the tasks that changed (opened, or a result seen) and are still open
are written to a :class:`~bus.RecordTable`, and the records of tasks that ended are deleted.
A task that opens and ends within one interval (the usual case) is never written at all, so
journalling costs nearly nothing per task; a coordinator killed and restarted loads the
records and finishes every task it had open. What the last interval had not written yet is
lost in a crash; the fusion agent still decides those tasks (it times out pending tasks).
"""

from __future__ import annotations

import structlog

from bus import RecordTable
from coordinator.tracker import OpenTask
from schemas import CODEC, OpenTaskRecord, SchemaError, encode

log = structlog.get_logger("fusebus.coordinator")


def to_record(task: OpenTask) -> OpenTaskRecord:
    """The journal record of an open task."""
    return OpenTaskRecord(
        task_id=task.task_id,
        stream=task.stream,
        window=task.window,
        expected=task.expected,
        deadline_ns=task.deadline_ns,
        ingest_ns=task.ingest_ns,
        seen=tuple(sorted(task.seen)),
        unavailable=tuple(sorted(task.unavailable)),
        missing_sensors=task.missing_sensors,
    )


class TaskJournal:
    """Tracks which open tasks changed and writes them out in batches."""

    def __init__(self, table: RecordTable) -> None:
        self.table = table
        self._dirty: dict[str, OpenTask] = {}
        self._ended: set[str] = set()
        self._writing: set[str] = set()
        self.writes = 0
        self.deletes = 0

    def __repr__(self) -> str:
        return f"TaskJournal(dirty={len(self._dirty)} writes={self.writes} deletes={self.deletes})"

    def changed(self, task: OpenTask) -> None:
        """``task`` opened or saw a result: write it at the next flush if still open."""
        self._dirty[task.task_id] = task

    def ended(self, task_id: str) -> None:
        """``task_id`` ended: never write it again, delete its record if it has one."""
        self._dirty.pop(task_id, None)
        if task_id in self.table or task_id in self._writing:
            self._ended.add(task_id)

    async def flush(self) -> None:
        """Write the changed open tasks and delete the ended ones."""
        if self._dirty:
            batch, self._dirty = self._dirty, {}
            self._writing = set(batch)
            try:
                await self.table.put_many({k: encode(to_record(t)) for k, t in batch.items()})
            finally:
                self._writing = set()
            self.writes += len(batch)
        if self._ended:
            gone, self._ended = list(self._ended), set()
            await self.table.delete_many(gone)
            self.deletes += len(gone)

    async def load(self) -> list[OpenTaskRecord]:
        """The tasks a previous run left open."""
        records = []
        for key, data in (await self.table.load()).items():
            try:
                records.append(CODEC.decode(data, OpenTaskRecord))
            except SchemaError as exc:
                log.warning("journal.bad_record", key=key, error=str(exc))
        return records
