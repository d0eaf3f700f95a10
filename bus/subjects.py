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

    # Wildcards -------------------------------------------------------------------------
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
