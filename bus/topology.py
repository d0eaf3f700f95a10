"""The JetStream streams and consumers fusebus needs, created idempotently at start.

| stream | subjects | retention |
|---|---|---|
| ``<P>_TASKS`` | ``fb.task.*`` | work queue: a subtask is removed once an agent acks it |
| ``<P>_RESULTS`` | ``fb.result.*``, ``fb.status.*`` | limits, short max age |
| ``<P>_DECISIONS`` | ``fb.decision.*`` | limits, so readers can consume durably |
| ``<P>_DLQ`` | ``fb.dlq.*`` | limits: max age, size and count |
| ``<P>_INTAKE`` | ``fb.sensor.*.*``, ``fb.frame.*`` | work queue: sensor data until the coordinator acks it |
| ``<P>_SENSORS`` | ``fb.rec.>`` | limits; only with ``record_sensors`` |

Every component calls :func:`ensure_streams` when it starts, so start order does not matter;
the intake stream is the coordinator's (its only reader), so only the coordinator asks for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    Placement,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
    SubjectTransform,
)
from nats.js.errors import BadRequestError, NotFoundError, ServiceUnavailableError
from nats.js.errors import Error as JetStreamError

from bus.subjects import Subjects
from schemas import BusError, ConfigError

log = structlog.get_logger("fusebus.bus")


@dataclass(frozen=True)
class TopologySettings:
    """Limits and timings of the streams and consumers."""

    # "file" survives a server restart; "memory" is faster. None: file for what is created,
    # and whatever an existing stream has is kept.
    storage: str | None = None
    # Copies of every stream, bucket and (inherited) consumer: 1, or 3 or 5 on a cluster. An
    # existing stream with more is never brought down.
    replicas: int = 1
    placement_cluster: str | None = None  # the NATS cluster streams are placed in
    placement_tags: tuple[str, ...] = ()  # server tags a stream's servers must all have
    dedup_window_s: float = 120.0  # a re-published subtask or decision within it is dropped
    task_max_age_s: float = 3600.0
    results_max_age_s: float = 900.0
    decisions_max_age_s: float = 7 * 24 * 3600.0
    decisions_max_msgs: int = 1_000_000
    dlq_max_age_s: float = 14 * 24 * 3600.0
    dlq_max_bytes: int = 256 * 1024 * 1024
    dlq_max_msgs: int = 1_000_000
    task_ack_wait_s: float = 10.0  # an unacked subtask is redelivered after this
    task_max_deliver: int = 5
    task_max_ack_pending: int = 20_000
    reader_ack_wait_s: float = 30.0  # coordinator's and fusion's consumers on results
    reader_max_deliver: int = 10  # then the message is dead-lettered
    # Sensor data waits in the intake stream until the windows it feeds are durably opened;
    # a chunk can wait a whole window (plus lateness) for its window to close.
    intake_max_age_s: float = 600.0
    intake_max_bytes: int = 1024 * 1024 * 1024
    intake_ack_wait_s: float = 60.0
    intake_max_deliver: int = 10
    intake_max_ack_pending: int = 200_000
    manage: bool = True  # create/update streams; off: only wait for them (least-privilege roles)
    wait_for_streams_s: float = 60.0  # without ``manage``, how long to wait for them to appear
    record_sensors: bool = False  # also keep sensor chunks and frames in <P>_SENSORS
    sensors_max_age_s: float = 3600.0
    # Partitions of the deployment's stream ids (see :func:`partitioned`); 1: none, as before.
    partitions: int = 1

    def __post_init__(self) -> None:
        if self.partitions < 1:
            raise ConfigError(f"partitions must be >= 1, got {self.partitions}")
        if self.storage not in (None, "file", "memory"):
            raise ConfigError(f"storage must be 'file' or 'memory', got {self.storage!r}")
        if isinstance(self.replicas, bool) or self.replicas not in range(1, MAX_REPLICAS + 1):
            raise ConfigError(
                f"replicas must be 1 to {MAX_REPLICAS} (JetStream's limit), got {self.replicas!r}"
            )
        for name in ("dedup_window_s", "task_ack_wait_s", "reader_ack_wait_s", "intake_ack_wait_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0")
        for name in ("task_max_deliver", "reader_max_deliver", "intake_max_deliver"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")

    @property
    def storage_type(self) -> StorageType:
        """The JetStream storage type of what is created."""
        return StorageType.MEMORY if self.storage == "memory" else StorageType.FILE

    @property
    def placement(self) -> Placement | None:
        """Where streams go in a super-cluster or a tagged cluster; None leaves it to the server."""
        if self.placement_cluster is None and not self.placement_tags:
            return None
        return Placement(cluster=self.placement_cluster, tags=list(self.placement_tags) or None)

    def stream_config(self, **fields: Any) -> StreamConfig:
        """A stream configuration with this topology's storage, replicas and placement."""
        return StreamConfig(
            storage=self.storage_type,
            num_replicas=self.replicas,
            placement=self.placement,
            **fields,
        )


#: JetStream keeps at most this many copies of a stream.
MAX_REPLICAS = 5


def reconcile(
    existing: StreamConfig, wanted: StreamConfig, settings: TopologySettings
) -> StreamConfig:
    """The configuration to update an existing stream to: ``wanted``, but keeping what is
    there where the settings leave it open (replicas above the wanted count, storage and
    placement when not asked for), so a stream an operator made R3 is never brought down.

    Raises:
        BusError: the stream differs in a way that cannot change in place (storage asked
            for explicitly, or retention), naming the stream and the difference.
    """
    name = existing.name
    has = existing.retention or RetentionPolicy.LIMITS  # the server's default
    needs = wanted.retention or RetentionPolicy.LIMITS
    if has != needs:
        raise BusError(
            f"stream {name} has retention {_value(has)}, fusebus needs {_value(needs)}: "
            "delete it or use another --prefix"
        )
    storage = existing.storage or StorageType.FILE
    if settings.storage is not None and storage != wanted.storage:
        raise BusError(
            f"stream {name} is stored in {_value(storage)}, the settings ask for "
            f"{_value(wanted.storage)}; JetStream cannot change a stream's storage: keep "
            f"--storage {_value(storage)}, or move the stream's data and recreate it"
        )
    return dataclasses.replace(
        wanted,
        storage=storage,
        num_replicas=max(existing.num_replicas or 1, wanted.num_replicas or 1),
        placement=wanted.placement if wanted.placement is not None else existing.placement,
    )


def changes(existing: StreamConfig, wanted: StreamConfig) -> bool:
    """Whether updating ``existing`` to ``wanted`` would change anything; a field that
    ``wanted`` leaves unset is the server's to fill and does not count (nor does a
    duplicate window of 0, which the server reads as its default)."""
    for field in dataclasses.fields(wanted):
        value = getattr(wanted, field.name)
        if value is None or (field.name == "duplicate_window" and not value):
            continue
        if getattr(existing, field.name) != value:
            return True
    return False


async def wait_for_leader(js: JetStreamContext, stream: str, *, timeout_s: float) -> None:
    """Return once ``stream`` has a leader (at once on a single server). On a cluster a
    stream or bucket just made elects one first, and until then requests to it go
    unanswered and publishes find no stream: components starting together would fail.

    Raises:
        BusError: no leader within ``timeout_s``.
    """
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            info = await js.stream_info(stream)
            if info.cluster is None or info.cluster.leader:
                return
        except (NotFoundError, TimeoutError):  # not known to our node yet, or no answer
            pass
        if asyncio.get_running_loop().time() > deadline:
            raise BusError(f"stream {stream} has no leader after {timeout_s}s")
        await asyncio.sleep(0.05)


async def keep_replicas_up(js: JetStreamContext, stream: str, settings: TopologySettings) -> None:
    """Raise an existing stream made by someone else's config (a KV bucket's) to the
    settings' replica count; more replicas than asked are kept, and nothing else changes."""
    config = (await js.stream_info(stream)).config
    if (config.num_replicas or 1) < settings.replicas:
        try:
            await js.update_stream(dataclasses.replace(config, num_replicas=settings.replicas))
        except JetStreamError as exc:
            raise BusError(f"cannot raise {stream} to {settings.replicas} replicas: {exc}") from exc


def _value(setting: object) -> str:
    return str(getattr(setting, "value", setting))


def stream_configs(subjects: Subjects, settings: TopologySettings) -> list[StreamConfig]:
    """The configuration of every fusebus stream."""
    return [
        settings.stream_config(
            name=subjects.tasks_stream,
            subjects=[subjects.all_tasks()],
            retention=RetentionPolicy.WORK_QUEUE,
            max_age=settings.task_max_age_s,
            duplicate_window=settings.dedup_window_s,
        ),
        settings.stream_config(
            name=subjects.results_stream,
            subjects=[subjects.all_results(), subjects.all_statuses()],
            retention=RetentionPolicy.LIMITS,
            max_age=settings.results_max_age_s,
            duplicate_window=settings.dedup_window_s,
        ),
        settings.stream_config(
            name=subjects.decisions_stream,
            subjects=[subjects.all_decisions(), subjects.all_sensor_statuses()],
            retention=RetentionPolicy.LIMITS,
            max_age=settings.decisions_max_age_s,
            max_msgs=settings.decisions_max_msgs,
            discard=DiscardPolicy.OLD,
            duplicate_window=settings.dedup_window_s,
        ),
        settings.stream_config(
            name=subjects.dlq_stream,
            subjects=[subjects.all_dlq()],
            retention=RetentionPolicy.LIMITS,
            max_age=settings.dlq_max_age_s,
            max_bytes=settings.dlq_max_bytes,
            max_msgs=settings.dlq_max_msgs,
            discard=DiscardPolicy.OLD,
        ),
        *(
            [
                settings.stream_config(
                    name=subjects.sensors_stream,
                    subjects=[subjects.all_recorded()],
                    retention=RetentionPolicy.LIMITS,
                    max_age=settings.sensors_max_age_s,
                )
            ]
            if settings.record_sensors
            else []
        ),
    ]


def intake_config(subjects: Subjects, settings: TopologySettings) -> StreamConfig:
    """The intake stream: sensor chunks and frames kept until the coordinator acks them."""
    return settings.stream_config(
        name=subjects.intake_stream,
        subjects=[subjects.all_sensors(), subjects.all_frames()],
        retention=RetentionPolicy.WORK_QUEUE,
        max_age=settings.intake_max_age_s,
        max_bytes=settings.intake_max_bytes,
        discard=DiscardPolicy.OLD,
        duplicate_window=settings.dedup_window_s,
    )


async def ensure_streams(
    js: JetStreamContext, subjects: Subjects, settings: TopologySettings, *, intake: bool = False
) -> None:
    """Create every stream (with ``intake``, the intake stream too), or bring an existing
    one to the current configuration.

    With ``settings.manage`` off (a role allowed only to read stream info), wait for the
    streams to exist instead; raises :class:`BusError` when they do not appear in time.
    """
    if not settings.manage:
        await _wait_for_streams(js, subjects, settings, intake=intake)
        return
    configs = stream_configs(subjects, settings)
    wanted = [*configs, *([intake_config(subjects, settings)] if intake else [])]
    for config in partitioned(wanted, subjects, settings):
        assert config.name is not None
        await ensure_stream(js, config, settings)


async def ensure_stream(
    js: JetStreamContext, config: StreamConfig, settings: TopologySettings
) -> None:
    """Create one stream, or bring an existing one to ``config`` as :func:`reconcile` allows
    (its partition count never changes: see :func:`check_partitions`).

    A JetStream API that does not answer yet (a cluster still placing its first R3 streams
    on a busy machine, electing a meta leader, or a stream another component created a
    moment ago electing its leader) is asked again, backing off, for up to
    ``settings.wait_for_streams_s``; each step is idempotent. It returns once the stream has
    a leader, so that what the component publishes next finds it.

    Raises:
        BusError: it cannot be created, or exists in a form that cannot be changed in place.
        ConfigError: it exists with another partition count.
    """

    async def once() -> None:
        await _ensure_stream_once(js, config, settings)
        await wait_for_leader(js, str(config.name), timeout_s=settings.wait_for_streams_s)

    await _until_answered(once, f"stream {config.name}", settings.wait_for_streams_s)


async def _until_answered(call: Callable[[], Awaitable[None]], what: str, wait_s: float) -> None:
    """Run ``call`` (idempotent) until the JetStream API answers it, backing off from 0.1 s
    to 2 s, for up to ``wait_s``.

    Raises:
        BusError: it did not answer within ``wait_s``.
    """
    loop = asyncio.get_running_loop()
    give_up = loop.time() + wait_s
    delay = 0.1
    while True:
        try:
            await call()
            return
        except (TimeoutError, NatsTimeoutError, NoRespondersError, ServiceUnavailableError) as exc:
            if loop.time() + delay > give_up:
                raise BusError(
                    f"the server did not answer for {what} within {wait_s:.0f} s: {exc!r}"
                ) from None
            log.info("topology.retry", what=what, error=repr(exc), in_s=delay)
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 2)


async def _ensure_stream_once(
    js: JetStreamContext, config: StreamConfig, settings: TopologySettings
) -> None:
    assert config.name is not None
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        try:
            await js.add_stream(config)
            return
        except BadRequestError as exc:
            # Another component created it between our look-up and our add.
            if "already in use" not in str(exc):
                raise BusError(f"cannot create stream {config.name}: {exc}") from exc
            info = await js.stream_info(config.name)
    check_partitions(info, config, settings)
    merged = reconcile(info.config, config, settings)
    if not changes(info.config, merged):
        # Nothing to change: no update either. On a cluster an update racing the create of
        # another component starting at the same moment leaves both requests unanswered.
        return
    try:
        await js.update_stream(merged)
    except ServiceUnavailableError:
        raise  # a cluster electing a leader: ensure_stream asks again
    except (BadRequestError, JetStreamError) as exc:
        raise BusError(f"stream {config.name} exists with an incompatible setup: {exc}") from exc


def partitioned(
    configs: list[StreamConfig], subjects: Subjects, settings: TopologySettings
) -> list[StreamConfig]:
    """``configs`` laid out for ``settings.partitions`` partitions (unchanged for one).

    The server decides each stream id's partition with a subject transform (NATS's
    ``partition()`` hash of the stream token), so producers publish as before and each
    partition's data is stored under ``P.<kind>.<p>.<stream>...``: the results stream gets
    one transform for results and statuses. A stream takes a single transform, so frames,
    whose subjects have one token fewer than sensor chunks, move from the intake stream to
    their own work queue ``<P>_FRAMES``.
    """
    if settings.partitions == 1:
        return configs
    count = settings.partitions
    laid_out = []
    for config in configs:
        if config.name == subjects.results_stream:
            src, dest = subjects.results_transform(count)
            config = dataclasses.replace(config, subject_transform=SubjectTransform(src, dest))
        elif config.name == subjects.intake_stream:
            frames_src, frames_dest = subjects.frame_transform(count)
            laid_out.append(
                dataclasses.replace(
                    config,
                    name=subjects.frames_stream,
                    subjects=[subjects.all_frames()],
                    subject_transform=SubjectTransform(frames_src, frames_dest),
                )
            )
            src, dest = subjects.sensor_transform(count)
            config = dataclasses.replace(
                config,
                subjects=[subjects.all_sensors()],
                subject_transform=SubjectTransform(src, dest),
            )
        laid_out.append(config)
    return laid_out


def partitions_of(info: StreamInfo) -> int:
    """How many partitions a stored stream is split into (1 without a partition transform)."""
    transform = info.config.subject_transform
    found = re.search(r"partition\((\d+),", transform.dest) if transform else None
    return int(found.group(1)) if found else 1


def check_partitions(info: StreamInfo, wanted: StreamConfig, settings: TopologySettings) -> None:
    """Refuse to change the partition count of an existing stream.

    The server would take the new transform, but what it stores already stays under the old
    partitions (or none), where no owner of the new ones reads it: data would be stranded
    and tasks decided by two owners. Raises :class:`ConfigError` with one line.
    """
    has = partitions_of(info)
    if has != settings.partitions and (wanted.subject_transform or has != 1):
        raise _partition_change(str(info.config.name), has, settings)


def _partition_change(stream: str, has: int, settings: TopologySettings) -> ConfigError:
    return ConfigError(
        f"stream {stream} is split into {has} partition(s), not "
        f"{settings.partitions} (--partitions / FUSEBUS_PARTITIONS): the partition count "
        "of a deployment cannot change while its streams exist; give every component the "
        "same count, or stop them all and delete the streams (or use another --prefix)"
    )


async def _wait_for_streams(
    js: JetStreamContext, subjects: Subjects, settings: TopologySettings, *, intake: bool
) -> None:
    names = [
        subjects.tasks_stream,
        subjects.results_stream,
        subjects.decisions_stream,
        subjects.dlq_stream,
        *([subjects.intake_stream] if intake else []),
        *([subjects.frames_stream] if intake and settings.partitions > 1 else []),
    ]
    deadline = asyncio.get_running_loop().time() + settings.wait_for_streams_s
    for name in names:
        while True:
            try:
                info = await js.stream_info(name)
                has = partitions_of(info)
                if name == subjects.results_stream and has != settings.partitions:
                    raise _partition_change(name, has, settings)
                await wait_for_leader(js, name, timeout_s=settings.wait_for_streams_s)
                break
            except (NotFoundError, TimeoutError):  # no answer yet: a leader being elected
                if asyncio.get_running_loop().time() > deadline:
                    raise BusError(
                        f"stream {name} does not exist; start a component that manages the topology"
                    ) from None
                await asyncio.sleep(0.5)


async def ensure_task_consumer(
    js: JetStreamContext, subjects: Subjects, type_name: str, settings: TopologySettings
) -> str:
    """Create (or update) the durable consumer every replica of ``type_name`` pulls from."""
    name = subjects.task_consumer(type_name)
    config = ConsumerConfig(
        durable_name=name,
        name=name,
        filter_subject=subjects.task(type_name),
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=settings.task_ack_wait_s,
        max_deliver=settings.task_max_deliver,
        max_ack_pending=settings.task_max_ack_pending,
        max_waiting=512,
    )
    await _add_or_update_consumer(
        js, subjects.tasks_stream, config, wait_s=settings.wait_for_streams_s
    )
    return name


async def ensure_reader_consumer(
    js: JetStreamContext,
    stream: str,
    name: str,
    filter_subjects: list[str],
    settings: TopologySettings,
) -> str:
    """Create (or update) a durable consumer for a reader such as the coordinator or fusion."""
    config = ConsumerConfig(
        durable_name=name,
        name=name,
        filter_subjects=filter_subjects,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=settings.reader_ack_wait_s,
        max_deliver=settings.reader_max_deliver,
        max_ack_pending=50_000,
        max_waiting=64,
    )
    await _add_or_update_consumer(js, stream, config, wait_s=settings.wait_for_streams_s)
    return name


async def resume_consumer(
    js: JetStreamContext,
    stream: str,
    name: str,
    filter_subjects: list[str],
    *,
    ack_wait_s: float,
    max_deliver: int,
    max_ack_pending: int,
    work_queue: bool = False,
) -> str:
    """Create a reader's durable consumer afresh, delivering at once what its previous
    incarnation had not acked.

    A consumer redelivers what a dead reader held only after the ack wait; a reader that
    restarts wants it now, in order. So the old consumer's ack floor is read, the consumer is
    deleted and created again from just after that floor (from the start of the stream if
    there was none). Messages past the floor that had been acked out of order come again
    too: readers treat a repeat as such. On a ``work_queue`` stream acked messages are gone,
    so the new consumer starts from the beginning (the server requires it) and only unacked
    ones come back.
    """
    start_seq = 0
    try:
        info = await js.consumer_info(stream, name)
        if not work_queue and info.ack_floor:
            start_seq = int(info.ack_floor.stream_seq) + 1
        await js.delete_consumer(stream, name)
    except NotFoundError:
        pass
    except JetStreamError as exc:
        raise BusError(f"cannot reset consumer {name} on {stream}: {exc}") from exc
    config = ConsumerConfig(
        durable_name=name,
        name=name,
        filter_subjects=filter_subjects,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE if start_seq > 1 else DeliverPolicy.ALL,
        opt_start_seq=start_seq if start_seq > 1 else None,
        ack_wait=ack_wait_s,
        max_deliver=max_deliver,
        max_ack_pending=max_ack_pending,
        max_waiting=64,
    )
    await _add_or_update_consumer(js, stream, config)
    return name


async def _add_or_update_consumer(
    js: JetStreamContext, stream: str, config: ConsumerConfig, *, wait_s: float = 30.0
) -> None:
    """Create or update a durable consumer, asking again (backing off, for up to
    ``wait_s``) while the API does not answer: on a cluster, replicas that start together
    create one consumer at once while its stream may still be electing a leader."""

    async def once() -> None:
        try:
            await js.add_consumer(stream, config)
        except BadRequestError as exc:
            raise BusError(f"cannot create consumer {config.name} on {stream}: {exc}") from exc

    await _until_answered(once, f"consumer {config.name} on {stream}", wait_s)


@dataclass(frozen=True)
class ReplicaView:
    """One follower of a stream or consumer, as its leader sees it."""

    server: str
    current: bool
    offline: bool
    lag: int


@dataclass(frozen=True)
class ConsumerView:
    """A durable consumer's replicas and backlog."""

    name: str
    durable: bool  # an ephemeral one (a reader following a stream) is R1 by design
    replicas: int  # its own count, or the stream's when it inherits (configured 0)
    leader: str | None
    followers: tuple[ReplicaView, ...]
    pending: int  # not yet delivered
    ack_pending: int  # delivered, not yet acked
    redelivered: int


@dataclass(frozen=True)
class StreamView:
    """What the server says about one fusebus stream (``exists`` False when it has none)."""

    name: str
    exists: bool
    storage: str = ""
    replicas: int = 0
    placement_tags: tuple[str, ...] = ()
    placement_cluster: str | None = None
    leader: str | None = None
    followers: tuple[ReplicaView, ...] = ()
    messages: int = 0
    bytes: int = 0
    consumers: tuple[ConsumerView, ...] = ()


def _followers(cluster: Any) -> tuple[ReplicaView, ...]:
    peers = (cluster.replicas if cluster is not None else None) or []
    return tuple(
        ReplicaView(p.name or "?", bool(p.current), bool(p.offline), int(p.lag or 0)) for p in peers
    )


def deployment_streams(subjects: Subjects) -> list[str]:
    """The streams (and the KV bucket's stream) a deployment under ``subjects`` may have;
    the sensors stream only exists when a coordinator records."""
    return [
        subjects.tasks_stream,
        subjects.results_stream,
        subjects.decisions_stream,
        subjects.dlq_stream,
        subjects.intake_stream,
        subjects.journal_stream,
        f"KV_{subjects.keys_bucket}",
        subjects.sensors_stream,
    ]


async def inspect_topology(js: JetStreamContext, subjects: Subjects) -> list[StreamView]:
    """Every stream of the deployment with its replicas, leader, followers' lag, size and
    consumers, in :func:`deployment_streams` order."""
    views = []
    for name in deployment_streams(subjects):
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            views.append(StreamView(name, exists=False))
            continue
        config = info.config
        replicas = config.num_replicas or 1
        consumers = []
        for consumer in await js.consumers_info(name):
            own = consumer.config.num_replicas or 0
            consumers.append(
                ConsumerView(
                    name=consumer.name,
                    durable=bool(consumer.config.durable_name),
                    replicas=own or replicas,
                    leader=consumer.cluster.leader if consumer.cluster else None,
                    followers=_followers(consumer.cluster),
                    pending=int(consumer.num_pending or 0),
                    ack_pending=int(consumer.num_ack_pending or 0),
                    redelivered=int(consumer.num_redelivered or 0),
                )
            )
        placement = config.placement
        views.append(
            StreamView(
                name=name,
                exists=True,
                storage=_value(config.storage or StorageType.FILE),
                replicas=replicas,
                placement_tags=tuple(placement.tags or ()) if placement else (),
                placement_cluster=placement.cluster if placement else None,
                leader=info.cluster.leader if info.cluster else None,
                followers=_followers(info.cluster),
                messages=int(info.state.messages or 0),
                bytes=int(info.state.bytes or 0),
                consumers=tuple(sorted(consumers, key=lambda c: c.name)),
            )
        )
    return views


def topology_problems(
    views: list[StreamView], settings: TopologySettings, *, required: set[str]
) -> list[str]:
    """Where the deployment does not match ``settings``: a ``required`` stream missing, or
    any stream or durable consumer with fewer replicas, another storage or other placement
    than asked. One sentence each; empty when all match."""
    problems = []
    for view in views:
        if not view.exists:
            if view.name in required:
                problems.append(f"stream {view.name} does not exist")
            continue
        if view.replicas < settings.replicas:
            problems.append(
                f"stream {view.name} has {view.replicas} replica(s), the settings ask for "
                f"{settings.replicas}"
            )
        if settings.storage is not None and view.storage != settings.storage:
            problems.append(
                f"stream {view.name} is stored in {view.storage}, the settings ask for "
                f"{settings.storage}"
            )
        if settings.placement_tags and not set(settings.placement_tags) <= set(view.placement_tags):
            problems.append(
                f"stream {view.name} is placed by tags {list(view.placement_tags)}, the settings "
                f"ask for {list(settings.placement_tags)}"
            )
        if settings.placement_cluster and view.placement_cluster != settings.placement_cluster:
            problems.append(
                f"stream {view.name} is placed in cluster {view.placement_cluster}, the settings "
                f"ask for {settings.placement_cluster}"
            )
        for consumer in view.consumers:
            if consumer.durable and consumer.replicas < settings.replicas:
                problems.append(
                    f"consumer {consumer.name} on {view.name} has {consumer.replicas} "
                    f"replica(s), the settings ask for {settings.replicas}"
                )
    return problems
