"""Partition leases in a JetStream key-value bucket: which member of a group owns what.

Each group (the coordinators of a deployment, the fusion agents of one fusion name) keeps, in
the bucket ``<P>_LEASES``:

- ``member.<group>.<member id>``: one key per live member, put again every renewal;
- ``lease.<group>.<partition>``: the partition's owner, created only if absent and renewed by
  a compare-and-set on its revision, so two members never both believe they hold it.

The bucket's max age is the lease time to live: a key nobody renews disappears, so a member
that dies (even SIGKILLed) loses its membership and its leases about one TTL after its last
renewal, and the others take its partitions. Members renew every third of the TTL, so a
renewal can be missed once without losing anything. Each round the keeper reads the bucket,
asks :func:`bus.shares.plan_moves` what to do, releases partitions above its fair share
(after ``on_release`` has stopped the work on them) and acquires free ones (then calls
``on_acquire``). A lease whose renewal fails was lost (this member stalled past its TTL):
``on_release`` is called for it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from nats.aio.client import Client
from nats.js.api import KeyValueConfig
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.errors import Error as JetStreamError
from nats.js.kv import KeyValue

from bus.loops import keep_running
from bus.shares import plan_moves
from bus.subjects import Subjects
from bus.topology import TopologySettings, keep_replicas_up, wait_for_leader
from schemas import BusError, ConfigError

log = structlog.get_logger("fusebus.bus")

OnPartition = Callable[[int], Awaitable[None]]


@dataclass(frozen=True)
class LeaseSettings:
    """Timings of partition leases."""

    # A dead member's partitions are taken over about this long after its last renewal.
    # The bucket's own max age wins when the bucket already exists.
    ttl_s: float = 6.0

    def __post_init__(self) -> None:
        if not self.ttl_s > 0:
            raise ConfigError(f"lease ttl_s must be > 0, got {self.ttl_s}")


@dataclass(frozen=True)
class LeaseView:
    """What the bucket said in one round: the group's live members and partition owners."""

    members: tuple[str, ...]
    owners: dict[int, str]


async def lease_bucket(
    nc: Client, subjects: Subjects, *, ttl_s: float, topology: TopologySettings | None = None
) -> KeyValue:
    """The deployment's lease bucket, created with ``ttl_s`` as its max age (and the
    topology's storage, replicas and placement) if missing."""
    topology = topology or TopologySettings()
    js = nc.jetstream()
    deadline = asyncio.get_running_loop().time() + topology.wait_for_streams_s
    while True:
        try:
            try:
                kv = await js.key_value(subjects.leases_bucket)
                await keep_replicas_up(js, f"KV_{subjects.leases_bucket}", topology)
            except BucketNotFoundError:
                kv = await js.create_key_value(
                    KeyValueConfig(
                        bucket=subjects.leases_bucket,
                        ttl=ttl_s,
                        history=1,
                        storage=topology.storage_type,
                        replicas=topology.replicas,
                        placement=topology.placement,
                    )
                )
            await wait_for_leader(
                js, f"KV_{subjects.leases_bucket}", timeout_s=topology.wait_for_streams_s
            )
            return kv
        except (TimeoutError, NotFoundError):
            # On a cluster, a bucket just made (by us or another member) may be unknown to
            # our node for a moment, or electing its leader (no answer). Each step is
            # idempotent, so ask again.
            if asyncio.get_running_loop().time() > deadline:
                raise BusError(f"no answer about bucket {subjects.leases_bucket}") from None


async def read_leases(kv: KeyValue, group: str) -> LeaseView:
    """The live members and the leased partitions of ``group``, from one watch of the bucket."""
    members: list[str] = []
    owners: dict[int, str] = {}
    watcher = await kv.watchall(ignore_deletes=True)
    try:
        async for entry in watcher:
            if entry is None:  # the watcher's marker: every current key has been seen
                break
            kind, _, rest = entry.key.partition(".")
            entry_group, _, name = rest.rpartition(".")
            if entry_group != group or entry.value is None:
                continue
            if kind == "member":
                members.append(name)
            elif kind == "lease" and name.isdigit():
                owners[int(name)] = entry.value.decode()
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
    return LeaseView(members=tuple(sorted(members)), owners=owners)


class LeaseKeeper:
    """Holds this member's fair share of a group's partitions, renewing and rebalancing.

    Args:
        nc: the connection.
        subjects: names the bucket and its keys.
        group: the lease group (``coordinator``, ``fusion-<name>``).
        member: this member's id, unique in the group (the value of its leases).
        partitions: how many partitions the deployment has.
        on_acquire: called after a partition's lease is taken, to start working on it.
        on_release: called before a lease is given back (or once it was lost), to stop.
        settings: the lease time to live.
        topology: the bucket's storage, replicas and placement, when this keeper creates it.
    """

    def __init__(
        self,
        nc: Client,
        *,
        subjects: Subjects,
        group: str,
        member: str,
        partitions: int,
        on_acquire: OnPartition,
        on_release: OnPartition,
        settings: LeaseSettings | None = None,
        topology: TopologySettings | None = None,
    ) -> None:
        self.nc = nc
        self.subjects = subjects
        self.group = group
        self.member = member
        self.partitions = partitions
        self.settings = settings or LeaseSettings()
        self.topology = topology or TopologySettings()
        self._on_acquire = on_acquire
        self._on_release = on_release
        self.owned: dict[int, int] = {}  # partition -> revision of our lease
        self.ttl_s = self.settings.ttl_s
        self._kv: KeyValue | None = None
        self._lock = asyncio.Lock()  # one KV operation on our keys at a time
        self._releasing: set[int] = set()  # partitions whose lost lease's work is stopping
        self._loops: list[asyncio.Task[None]] = []
        self.counts = dict.fromkeys(("acquired", "released", "lost", "rounds"), 0)

    def __repr__(self) -> str:
        return f"LeaseKeeper({self.group}/{self.member} owns={sorted(self.owned)} {self.counts})"

    async def start(self) -> LeaseKeeper:
        """Join the group, take a first share, then keep renewing and rebalancing."""
        self._kv = await lease_bucket(
            self.nc, self.subjects, ttl_s=self.settings.ttl_s, topology=self.topology
        )
        status = await self._kv.status()
        if status.ttl:  # an existing bucket's TTL is the deployment's
            self.ttl_s = float(status.ttl)
        await self._kv.put(self.subjects.member_key(self.group, self.member), b"1")
        await self.rebalance()
        self._loops = [
            asyncio.create_task(keep_running(self._renew_step, name="lease-renew")),
            asyncio.create_task(keep_running(self._rebalance_step, name="lease-rebalance")),
        ]
        return self

    async def stop(self) -> None:
        """Give back every lease (after ``on_release`` for each) and leave the group, so the
        others take over at once instead of after the TTL."""
        for task in self._loops:
            task.cancel()
        for task in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._loops = []
        for partition in sorted(self.owned):
            await self._release(partition)
        if self._kv is not None:
            with contextlib.suppress(JetStreamError, asyncio.TimeoutError):
                await self._kv.delete(self.subjects.member_key(self.group, self.member))

    @property
    def renew_every_s(self) -> float:
        """How often leases and membership are renewed: a third of the TTL."""
        return self.ttl_s / 3

    async def _renew_step(self) -> None:
        # Every third of the TTL from the start of the last round, not from its end: on a
        # busy machine a round's own requests would otherwise stretch the gap past the TTL.
        began = time.monotonic()
        await self.renew()
        await asyncio.sleep(max(0.0, self.renew_every_s - (time.monotonic() - began)))

    async def _rebalance_step(self) -> None:
        await asyncio.sleep(self.renew_every_s)
        await self.rebalance()

    async def renew(self) -> None:
        """Put the membership key again and renew every lease by compare-and-set; a lease
        whose revision moved (it expired, and maybe another member took it) is lost."""
        kv = self._bucket()
        await kv.put(self.subjects.member_key(self.group, self.member), b"1")
        for partition in sorted(self.owned):
            async with self._lock:
                revision = self.owned.get(partition)
                if revision is None:
                    continue
                try:
                    self.owned[partition] = await kv.update(
                        self.subjects.lease_key(self.group, partition),
                        self.member.encode(),
                        last=revision,
                    )
                    continue
                except (KeyWrongLastSequenceError, KeyNotFoundError):
                    del self.owned[partition]
                    self._releasing.add(partition)  # no _acquire until its work has stopped
            self.counts["lost"] += 1
            log.warning("lease.lost", group=self.group, member=self.member, partition=partition)
            try:
                await self._on_release(partition)
            finally:
                self._releasing.discard(partition)

    async def rebalance(self) -> LeaseView:
        """One round: read the group's members and owners, give back what is above this
        member's fair share, take free partitions up to it. Returns what was read."""
        self.counts["rounds"] += 1
        view = await read_leases(self._bucket(), self.group)
        moves = plan_moves(
            partitions=self.partitions, members=view.members, owners=view.owners, me=self.member
        )
        for partition in moves.release:
            if partition in self.owned:
                await self._release(partition)
        for partition in moves.acquire:
            await self._acquire(partition)
        return view

    async def _acquire(self, partition: int) -> None:
        key = self.subjects.lease_key(self.group, partition)
        try:
            async with self._lock:
                if partition in self._releasing:
                    return  # its lost lease's work is still being stopped: a later round
                held = partition in self.owned  # read under the lock: renew may drop it
                self.owned[partition] = await self._bucket().create(key, self.member.encode())
        except KeyWrongLastSequenceError:
            return  # another member was quicker (a lease of ours that ran out: renew finds it)
        if held:
            # Our lease ran out before its renewal (a stalled process) and nobody took it:
            # taken again, the work on the partition simply goes on.
            log.warning(
                "lease.renewed_late", group=self.group, member=self.member, partition=partition
            )
            return
        started = time.perf_counter()
        try:
            await self._on_acquire(partition)
        except Exception as exc:
            log.error("lease.acquire_failed", partition=partition, error=str(exc))
            await self._give_back(partition)
            return
        self.counts["acquired"] += 1
        log.info(
            "lease.acquired",
            group=self.group,
            member=self.member,
            partition=partition,
            duration_ms=round((time.perf_counter() - started) * 1e3, 1),
        )

    async def _release(self, partition: int) -> None:
        try:
            await self._on_release(partition)
        finally:
            await self._give_back(partition)
        self.counts["released"] += 1
        log.info("lease.released", group=self.group, member=self.member, partition=partition)

    async def _give_back(self, partition: int) -> None:
        async with self._lock:
            revision = self.owned.pop(partition, None)
            if revision is None:
                return
            with contextlib.suppress(JetStreamError, asyncio.TimeoutError):
                # Only if still ours: a lease that expired and was taken is not deleted.
                await self._bucket().delete(
                    self.subjects.lease_key(self.group, partition), last=revision
                )

    def _bucket(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("LeaseKeeper.start() was not called")
        return self._kv
