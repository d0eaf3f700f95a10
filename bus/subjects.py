"""Every NATS subject, stream and consumer name fusebus uses, built in one place.

No other module assembles a subject by hand. Tokens are checked: a ``.``, ``*``, ``>``,
white space or a control character inside a stream, sensor, type or component name would
silently change which messages a subject matches, so it is refused, and so is a token
longer than 128 bytes.
"""

from __future__ import annotations

import re

from schemas import SubjectError
from schemas.limits import check_name

_NAME_SAFE = re.compile(r"[^A-Za-z0-9_-]")


def check_token(token: str, what: str = "token") -> str:
    """Return ``token`` if it can stand as one subject token; raise :class:`SubjectError`
    (the rule is :func:`schemas.limits.check_name`)."""
    return check_name(token, what)


class Subjects:
    """Subjects, JetStream stream names and consumer names under one prefix.

    The prefix (default ``fb``) lets several fusebus deployments, or tests, share one server
    without seeing each other's messages.
    """

    def __init__(self, prefix: str = "fb") -> None:
        self.prefix = check_token(prefix, "prefix")
        stem = _NAME_SAFE.sub("_", prefix).upper()
        self.tasks_stream = f"{stem}_TASKS"
        self.results_stream = f"{stem}_RESULTS"
        self.decisions_stream = f"{stem}_DECISIONS"
        self.dlq_stream = f"{stem}_DLQ"
        self.sensors_stream = f"{stem}_SENSORS"
        self.journal_stream = f"{stem}_OPEN_TASKS"
        self.intake_stream = f"{stem}_INTAKE"
        self.keys_bucket = f"{stem}_KEYS"
        self.frames_stream = f"{stem}_FRAMES"  # frames' own intake, with partitions > 1
        self.leases_bucket = f"{stem}_LEASES"
        self.models_bucket = f"{stem}_MODELS"  # object store: the model registry's files
        self.rollouts_bucket = f"{stem}_ROLLOUTS"  # KV: which stored version serves, by model
        self.shadow_stream = f"{stem}_SHADOW"

    def __repr__(self) -> str:
        return f"Subjects(prefix={self.prefix!r})"

    # One message kind each -------------------------------------------------------------
    def sensor(self, stream: str, sensor: str) -> str:
        """Per-sensor sample chunks of one stream."""
        return (
            f"{self.prefix}.sensor.{check_token(stream, 'stream')}.{check_token(sensor, 'sensor')}"
        )

    def frame(self, stream: str) -> str:
        """Pre-aligned frames of one stream."""
        return f"{self.prefix}.frame.{check_token(stream, 'stream')}"

    def task(self, type_name: str) -> str:
        """Subtasks of one agent type."""
        return f"{self.prefix}.task.{check_token(type_name, 'type')}"

    def result(self, stream: str) -> str:
        """Agents' results for one stream."""
        return f"{self.prefix}.result.{check_token(stream, 'stream')}"

    def status(self, stream: str) -> str:
        """The coordinator's task statuses for one stream."""
        return f"{self.prefix}.status.{check_token(stream, 'stream')}"

    def sensor_status(self, stream: str) -> str:
        """Sensor liveness events (down / back up) of one stream."""
        return f"{self.prefix}.sensor_status.{check_token(stream, 'stream')}"

    def all_sensor_statuses(self) -> str:
        """Sensor liveness events of every stream."""
        return f"{self.prefix}.sensor_status.*"

    def decision(self, stream: str) -> str:
        """Fused decisions for one stream."""
        return f"{self.prefix}.decision.{check_token(stream, 'stream')}"

    def dlq(self, component: str) -> str:
        """Dead letters of one component (``coordinator``, ``fusion``, ``agent-accel``...)."""
        return f"{self.prefix}.dlq.{check_token(component, 'component')}"

    def journal(self, coordinator: str) -> str:
        """The pages of one coordinator's open-task journal."""
        return f"{self.prefix}.open.{check_token(coordinator, 'coordinator name')}"

    def all_journals(self) -> str:
        """Every coordinator's journal (the journal stream's subjects)."""
        return f"{self.prefix}.open.*"

    def control(self, component: str, instance_id: str) -> str:
        """The status endpoint of one running component (``agent-accel``, ``coordinator``...)."""
        return (
            f"{self.prefix}.ctl.{check_token(component, 'component')}"
            f".{check_token(instance_id, 'instance id')}"
        )

    def shadow(self, model: str) -> str:
        """A registry model's shadow outputs (see :class:`~schemas.ShadowBatch`)."""
        return f"{self.prefix}.shadow.{check_token(model, 'model name')}"

    # Wildcards -------------------------------------------------------------------------
    def all_shadows(self) -> str:
        """Every shadow output of every registry model."""
        return f"{self.prefix}.shadow.*"

    def all_sensors(self) -> str:
        """Every sensor chunk of every stream."""
        return f"{self.prefix}.sensor.*.*"

    def recorded(self, subject: str) -> str:
        """Where a recording keeps a copy of a sensor subject of this prefix (``fb.sensor.s.a``
        -> ``fb.rec.sensor.s.a``)."""
        if not subject.startswith(f"{self.prefix}.sensor.") and not subject.startswith(
            f"{self.prefix}.frame."
        ):
            raise SubjectError(f"{subject!r} is not a sensor or frame subject of {self.prefix!r}")
        return f"{self.prefix}.rec.{subject[len(self.prefix) + 1 :]}"

    def all_recorded(self) -> str:
        """Every recorded sensor chunk and frame."""
        return f"{self.prefix}.rec.>"

    def all_frames(self) -> str:
        """Every frame of every stream."""
        return f"{self.prefix}.frame.*"

    def all_tasks(self) -> str:
        """Every subtask of every type."""
        return f"{self.prefix}.task.*"

    def all_results(self) -> str:
        """Every result of every stream."""
        return f"{self.prefix}.result.*"

    def all_statuses(self) -> str:
        """Every task status of every stream."""
        return f"{self.prefix}.status.*"

    def all_decisions(self) -> str:
        """Every decision of every stream."""
        return f"{self.prefix}.decision.*"

    def all_dlq(self) -> str:
        """Every dead letter."""
        return f"{self.prefix}.dlq.*"

    # Consumers -------------------------------------------------------------------------
    def task_consumer(self, type_name: str) -> str:
        """The durable consumer shared by every replica of an agent type."""
        return f"agent-{check_token(type_name, 'type')}"

    #: Durable consumer of the coordinator on the results stream.
    coordinator_consumer = "coordinator"

    def intake_consumer(self, coordinator: str) -> str:
        """The durable consumer through which a coordinator takes sensor data."""
        return f"intake-{check_token(coordinator, 'coordinator name')}"

    def stream_of(self, subject: str) -> str:
        """The stream token of a per-stream subject (``fb.frame.<stream>`` -> ``<stream>``)."""
        parts = subject.split(".")
        if len(parts) < 3 or parts[0] != self.prefix:
            raise SubjectError(f"subject {subject!r} is not under prefix {self.prefix!r}")
        return parts[2]

    # Partitions (a deployment with partitions > 1) ---------------------------------------
    # The server decides a stream id's partition: stream subject transforms store
    # ``P.sensor.<stream>.<sensor>`` as ``P.sensor.<p>.<stream>.<sensor>`` (likewise frames,
    # results and statuses), with ``p`` = NATS's ``partition()`` hash of the stream id.
    # Producers publish to the subjects above; only readers of the streams see these.
    def sensor_transform(self, partitions: int) -> tuple[str, str]:
        """The intake stream's subject transform (source, destination) for sensor chunks."""
        return (
            self.all_sensors(),
            f"{self.prefix}.sensor.{{{{partition({partitions},1)}}}}"
            ".{{wildcard(1)}}.{{wildcard(2)}}",
        )

    def frame_transform(self, partitions: int) -> tuple[str, str]:
        """The frames stream's subject transform (source, destination)."""
        return (
            self.all_frames(),
            f"{self.prefix}.frame.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}",
        )

    def results_transform(self, partitions: int) -> tuple[str, str]:
        """The results stream's one transform, for results and statuses alike (both are
        ``P.<kind>.<stream>``; a stream allows a single transform)."""
        return (
            f"{self.prefix}.*.*",
            f"{self.prefix}.{{{{wildcard(1)}}}}.{{{{partition({partitions},2)}}}}"
            ".{{wildcard(2)}}",
        )

    def sensors_in(self, partition: int) -> str:
        """Stored sensor chunks of one partition."""
        return f"{self.prefix}.sensor.{_partition(partition)}.*.*"

    def frames_in(self, partition: int) -> str:
        """Stored frames of one partition."""
        return f"{self.prefix}.frame.{_partition(partition)}.*"

    def results_in(self, partition: int) -> str:
        """Stored results of one partition."""
        return f"{self.prefix}.result.{_partition(partition)}.*"

    def statuses_in(self, partition: int) -> str:
        """Stored task statuses of one partition."""
        return f"{self.prefix}.status.{_partition(partition)}.*"

    def partition_of(self, subject: str) -> int | None:
        """The partition token of a stored (transformed) subject; ``None`` for a subject as
        producers publish it."""
        parts = subject.split(".")
        kind_tokens = {"sensor": 5, "frame": 4, "result": 4, "status": 4}
        if len(parts) < 4 or parts[0] != self.prefix:
            return None
        if kind_tokens.get(parts[1]) != len(parts) or not parts[2].isdigit():
            return None
        return int(parts[2])

    def as_published(self, subject: str) -> str:
        """``subject`` as its producer published it (a stored subject without its partition
        token; any other subject unchanged)."""
        if self.partition_of(subject) is None:
            return subject
        parts = subject.split(".")
        return ".".join(parts[:2] + parts[3:])

    def partition_journal(self, partition: int) -> str:
        """The open-task journal of one partition, written by whichever coordinator owns it."""
        return f"{self.prefix}.open.partition-{_partition(partition)}"

    def intake_partition_consumer(self, partition: int) -> str:
        """The durable consumer of one partition's sensor chunks (its owner pulls from it)."""
        return f"intake-partition-{_partition(partition)}"

    def frames_partition_consumer(self, partition: int) -> str:
        """The durable consumer of one partition's frames."""
        return f"frames-partition-{_partition(partition)}"

    def coordinator_partition_consumer(self, partition: int) -> str:
        """The coordinators' durable consumer on one partition's results."""
        return f"coordinator-partition-{_partition(partition)}"

    def fusion_partition_consumer(self, fusion: str, partition: int) -> str:
        """A fusion name's durable consumer on one partition's results and statuses."""
        return f"{check_token(fusion, 'fusion name')}-partition-{_partition(partition)}"

    def lease_key(self, group: str, partition: int) -> str:
        """The lease key of one partition in a lease group (``coordinator``, ``fusion-<name>``)."""
        return f"lease.{check_token(group, 'lease group')}.{_partition(partition)}"

    def member_key(self, group: str, member: str) -> str:
        """The registry key of one live member of a lease group."""
        return f"member.{check_token(group, 'lease group')}.{check_token(member, 'member id')}"


def _partition(partition: int) -> int:
    if partition < 0:
        raise SubjectError(f"partition must be >= 0, got {partition}")
    return partition
