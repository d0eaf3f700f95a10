"""The one error tree of fusebus.

Every error the project raises derives from :class:`FusebusError`. Where a caller would
naturally catch a standard-library type, the class inherits that too: a bad message is a
:class:`ValueError`, a bus failure a :class:`ConnectionError`.
"""

from __future__ import annotations


class FusebusError(Exception):
    """Root of every error fusebus raises on purpose.

    ``reason`` is a short stable code; a message whose handling raised the error is
    dead-lettered under it (the full list is in ``docs/protocol.md``).
    """

    reason: str = "error"


class SchemaError(FusebusError, ValueError):
    """Bytes or values that are not a valid fusebus message.

    ``reason`` is a short stable code (``not_msgpack``, ``missing_field``, ...) used as the
    dead-letter reason; the message text says what was wrong and where.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ConfigError(FusebusError, ValueError):
    """A setting, plan or command-line value that cannot be used; the text names it."""

    reason = "bad_config"


class BusError(FusebusError, ConnectionError):
    """The NATS bus could not be reached, started or set up."""

    reason = "bus_error"


class TooLargeError(FusebusError, ValueError):
    """An outgoing message would exceed the server's maximum payload."""

    reason = "too_large"


class ModelError(FusebusError, RuntimeError):
    """A model could not be loaded or did not produce a usable output."""

    reason = "model_error"


class SubjectError(FusebusError, ValueError):
    """A subject token (stream, sensor, type, component name) that NATS cannot carry."""

    reason = "bad_name"


class UnservedError(FusebusError, LookupError):
    """Sensor data no running agent type can read (an ``auto`` plan with nothing to feed)."""

    reason = "unserved"


class UnknownTaskError(FusebusError, LookupError):
    """A result or status for a task the coordinator did not open (its ticket does not match)."""

    reason = "unknown_task"
