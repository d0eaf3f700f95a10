"""The one error tree of fusebus.

Every error the project raises derives from :class:`FusebusError`. Where a caller would
naturally catch a standard-library type, the class inherits that too: a bad message is a
:class:`ValueError`, a bus failure a :class:`ConnectionError`.
"""

from __future__ import annotations


class FusebusError(Exception):
    """Root of every error fusebus raises on purpose."""


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


class BusError(FusebusError, ConnectionError):
    """The NATS bus could not be reached, started or set up."""


class ModelError(FusebusError, RuntimeError):
    """A model could not be loaded or did not produce a usable output."""


class SubjectError(FusebusError, ValueError):
    """A subject token (stream, sensor, type, component name) that NATS cannot carry."""
