"""An append-only log of pages in a JetStream stream, dropped from the front when spent.

Used by the coordinator to journal its open tasks: each write is one page (however many
records it holds), and pages that no longer matter are dropped with one purge, so the cost
on the server is a couple of operations per write rather than one or two per record.
"""

from __future__ import annotations

from nats.aio.client import Client
from nats.js.api import DiscardPolicy, RetentionPolicy

from bus.streams import StoredMessage, read_stored
from bus.topology import TopologySettings, ensure_stream


class PageLog:
    """Pages on ``subject`` in ``stream`` (whose subjects are ``stream_subjects``; several
    logs may share a stream), in the order they were written."""

    def __init__(
        self,
        nc: Client,
        *,
        stream: str,
        stream_subjects: str,
        subject: str,
        max_age_s: float = 24 * 3600.0,
        topology: TopologySettings | None = None,
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self.stream = stream
        self.stream_subjects = stream_subjects
        self.subject = subject
        self.max_age_s = max_age_s
        self.topology = topology or TopologySettings()

    def __repr__(self) -> str:
        return f"PageLog({self.stream}, {self.subject})"

    @property
    def max_page_bytes(self) -> int:
        """The largest page the server takes."""
        return int(self._nc.max_payload)

    async def ensure(self) -> None:
        """Create the stream (with the topology's storage, replicas and placement) or bring
        it to the current layout; a stream made for other subjects (an earlier layout of the
        journal) is switched to ``stream_subjects``."""
        config = self.topology.stream_config(
            name=self.stream,
            subjects=[self.stream_subjects],
            max_age=self.max_age_s,
            retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.OLD,
        )
        await ensure_stream(self._js, config, self.topology)

    async def append(self, page: bytes) -> int:
        """Store ``page`` after the others; returns its sequence in the stream."""
        ack = await self._js.publish(self.subject, page, stream=self.stream)
        return int(ack.seq)

    async def drop_before(self, sequence: int) -> None:
        """Drop this log's pages stored before ``sequence``."""
        await self._js.purge_stream(self.stream, seq=sequence, subject=self.subject)

    async def load(self, *, timeout_s: float = 10.0) -> list[StoredMessage]:
        """This log's pages still stored, oldest first."""
        stored = await read_stored(self._js, self.stream, timeout_s=timeout_s)
        return [page for page in stored if page.subject == self.subject]
