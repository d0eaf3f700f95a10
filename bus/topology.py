"""The JetStream streams and consumers fusebus needs, created idempotently at start.

| stream | subjects | retention |
|---|---|---|
| ``<P>_TASKS`` | ``fb.task.*`` | work queue: a subtask is removed once an agent acks it |
| ``<P>_RESULTS`` | ``fb.result.*``, ``fb.status.*`` | limits, short max age |
| ``<P>_DECISIONS`` | ``fb.decision.*`` | limits, so readers can consume durably |
| ``<P>_DLQ`` | ``fb.dlq.*`` | limits, long max age |
| ``<P>_SENSORS`` | ``fb.sensor.*.*``, ``fb.frame.*`` | limits; only with ``record_sensors`` |

Every component calls :func:`ensure_streams` when it starts, so start order does not matter.
"""

from __future__ import annotations

import asyncio
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
)
from nats.js.errors import BadRequestError, NotFoundError

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
    task_ack_wait_s: float = 10.0  # an unacked subtask is redelivered after this
    task_max_deliver: int = 5
    task_max_ack_pending: int = 20_000
    reader_ack_wait_s: float = 30.0  # coordinator's and fusion's consumers on results
    manage: bool = True  # create/update streams; off: only wait for them (least-privilege roles)
    wait_for_streams_s: float = 60.0  # without ``manage``, how long to wait for them to appear
    record_sensors: bool = False  # also keep sensor chunks and frames in <P>_SENSORS
    sensors_max_age_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.storage not in ("file", "memory"):
            raise ConfigError(f"storage must be 'file' or 'memory', got {self.storage!r}")
        for name in ("dedup_window_s", "task_ack_wait_s", "reader_ack_wait_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0")
        if self.task_max_deliver < 1:
            raise ConfigError("task_max_deliver must be >= 1")

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
        ),
        *(
            [
                StreamConfig(
                    name=subjects.sensors_stream,
                    subjects=[subjects.all_sensors(), subjects.all_frames()],
                    retention=RetentionPolicy.LIMITS,
                    storage=storage,
                    max_age=settings.sensors_max_age_s,
                )
            ]
            if settings.record_sensors
            else []
        ),
    ]


async def ensure_streams(
    js: JetStreamContext, subjects: Subjects, settings: TopologySettings
) -> None:
    """Create every stream, or bring an existing one to the current configuration.

    With ``settings.manage`` off (a role allowed only to read stream info), wait for the
    streams to exist instead; raises :class:`BusError` when they do not appear in time.
    """
    if not settings.manage:
        await _wait_for_streams(js, subjects, settings)
        return
    for config in stream_configs(subjects, settings):
        assert config.name is not None
        try:
            await js.stream_info(config.name)
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


async def _wait_for_streams(
    js: JetStreamContext, subjects: Subjects, settings: TopologySettings
) -> None:
    names = [
        subjects.tasks_stream,
        subjects.results_stream,
        subjects.decisions_stream,
        subjects.dlq_stream,
    ]
    deadline = asyncio.get_running_loop().time() + settings.wait_for_streams_s
    for name in names:
        while True:
            try:
                await js.stream_info(name)
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
        max_ack_pending=50_000,
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
