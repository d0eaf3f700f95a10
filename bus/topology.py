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
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
    SubjectTransform,
)
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.errors import Error as JetStreamError

from bus.subjects import Subjects
from schemas import BusError, ConfigError


@dataclass(frozen=True)
class TopologySettings:
    """Limits and timings of the streams and consumers."""

    storage: str = "file"  # "file" survives a server restart; "memory" is faster
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
        if self.storage not in ("file", "memory"):
            raise ConfigError(f"storage must be 'file' or 'memory', got {self.storage!r}")
        for name in ("dedup_window_s", "task_ack_wait_s", "reader_ack_wait_s", "intake_ack_wait_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0")
        for name in ("task_max_deliver", "reader_max_deliver", "intake_max_deliver"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")

    @property
    def storage_type(self) -> StorageType:
        """The JetStream storage type."""
        return StorageType.FILE if self.storage == "file" else StorageType.MEMORY


def stream_configs(subjects: Subjects, settings: TopologySettings) -> list[StreamConfig]:
    """The configuration of every fusebus stream."""
    storage = settings.storage_type
    return [
        StreamConfig(
            name=subjects.tasks_stream,
            subjects=[subjects.all_tasks()],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=storage,
            max_age=settings.task_max_age_s,
            duplicate_window=settings.dedup_window_s,
        ),
        StreamConfig(
            name=subjects.results_stream,
            subjects=[subjects.all_results(), subjects.all_statuses()],
            retention=RetentionPolicy.LIMITS,
            storage=storage,
            max_age=settings.results_max_age_s,
            duplicate_window=settings.dedup_window_s,
        ),
        StreamConfig(
            name=subjects.decisions_stream,
            subjects=[subjects.all_decisions(), subjects.all_sensor_statuses()],
            retention=RetentionPolicy.LIMITS,
            storage=storage,
            max_age=settings.decisions_max_age_s,
            max_msgs=settings.decisions_max_msgs,
            discard=DiscardPolicy.OLD,
            duplicate_window=settings.dedup_window_s,
        ),
        StreamConfig(
            name=subjects.dlq_stream,
            subjects=[subjects.all_dlq()],
            retention=RetentionPolicy.LIMITS,
            storage=storage,
            max_age=settings.dlq_max_age_s,
            max_bytes=settings.dlq_max_bytes,
            max_msgs=settings.dlq_max_msgs,
            discard=DiscardPolicy.OLD,
        ),
        *(
            [
                StreamConfig(
                    name=subjects.sensors_stream,
                    subjects=[subjects.all_recorded()],
                    retention=RetentionPolicy.LIMITS,
                    storage=storage,
                    max_age=settings.sensors_max_age_s,
                )
            ]
            if settings.record_sensors
            else []
        ),
    ]


def intake_config(subjects: Subjects, settings: TopologySettings) -> StreamConfig:
    """The intake stream: sensor chunks and frames kept until the coordinator acks them."""
    return StreamConfig(
        name=subjects.intake_stream,
        subjects=[subjects.all_sensors(), subjects.all_frames()],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=settings.storage_type,
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
        try:
            check_partitions(await js.stream_info(config.name), config, settings)
        except NotFoundError:
            try:
                await js.add_stream(config)
            except BadRequestError as exc:
                # Another component created it between our look-up and our add.
                if "already in use" not in str(exc):
                    raise BusError(f"cannot create stream {config.name}: {exc}") from exc
            continue
        try:
            await js.update_stream(config)
        except BadRequestError as exc:
            raise BusError(
                f"stream {config.name} exists with an incompatible setup: {exc}"
            ) from exc


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
                break
            except NotFoundError:
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
    await _add_or_update_consumer(js, subjects.tasks_stream, config)
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
    await _add_or_update_consumer(js, stream, config)
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
    js: JetStreamContext, stream: str, config: ConsumerConfig
) -> None:
    try:
        await js.add_consumer(stream, config)
    except BadRequestError as exc:
        raise BusError(f"cannot create consumer {config.name} on {stream}: {exc}") from exc
