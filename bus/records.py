"""A small durable table in JetStream: one subject per key, the latest record per key kept.

Used by the coordinator to journal its open tasks. Writing a key replaces its previous record
(``max_msgs_per_subject = 1``); deleting removes it by sequence, leaving no marker, so the
stream only ever holds the live records and loading them at start is quick.
"""

from __future__ import annotations

import asyncio

import structlog
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from bus.streams import read_stored
from bus.subjects import check_token

log = structlog.get_logger("fusebus.bus")


class RecordTable:
    """Keyed records in stream ``stream`` under subjects ``<subject_prefix>.<key>``."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        stream: str,
        subject_prefix: str,
        max_age_s: float = 24 * 3600.0,
        storage: StorageType = StorageType.FILE,
    ) -> None:
        self._js = js
        self.stream = stream
        self.subject_prefix = subject_prefix
        self.max_age_s = max_age_s
        self.storage = storage
        self._seqs: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"RecordTable({self.stream}, {self.subject_prefix}.*, keys={len(self._seqs)})"

    def __contains__(self, key: object) -> bool:
        return key in self._seqs

    async def ensure(self) -> None:
        """Create the stream if needed."""
        config = StreamConfig(
            name=self.stream,
            subjects=[f"{self.subject_prefix}.*"],
            max_msgs_per_subject=1,
            max_age=self.max_age_s,
            storage=self.storage,
            discard=DiscardPolicy.OLD,
        )
        try:
            await self._js.stream_info(self.stream)
        except NotFoundError:
            await self._js.add_stream(config)

    def _subject(self, key: str) -> str:
        return f"{self.subject_prefix}.{check_token(key, 'record key')}"

    async def put_many(self, records: dict[str, bytes]) -> None:
        """Write several records at once (concurrently), each replacing its key's last one."""
        keys = list(records)
        acks = await asyncio.gather(*(self._js.publish(self._subject(k), records[k]) for k in keys))
        for key, ack in zip(keys, acks, strict=True):
            self._seqs[key] = ack.seq

    async def delete_many(self, keys: list[str]) -> None:
        """Remove the records of ``keys`` (those never written are skipped)."""
        seqs = [self._seqs.pop(k) for k in keys if k in self._seqs]
        results = await asyncio.gather(
            *(self._js.delete_msg(self.stream, seq) for seq in seqs), return_exceptions=True
        )
        for result in results:
            if isinstance(result, Exception) and not isinstance(result, NotFoundError):
                log.warning("records.delete_failed", stream=self.stream, error=str(result))

    async def load(self, *, timeout_s: float = 10.0) -> dict[str, bytes]:
        """Every live record, by key."""
        records: dict[str, bytes] = {}
        for stored in await read_stored(self._js, self.stream, timeout_s=timeout_s):
            key = stored.subject[len(self.subject_prefix) + 1 :]
            records[key] = stored.data
            self._seqs[key] = stored.sequence
        return records
