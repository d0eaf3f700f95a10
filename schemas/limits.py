"""Limits on what the wire may carry, checked at decode before anything is built from it.

Identifiers (stream, sensor, type, agent and component names, task ids) become subject
tokens and header values, so each is checked once, where it enters: non-empty, at most
:data:`MAX_NAME_BYTES` (task ids :data:`MAX_TASK_ID_BYTES`) of UTF-8, and free of the
characters that would change what a subject matches or break a header line (``.``, ``*``,
``>``, white space, control characters).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from schemas.errors import SchemaError, SubjectError

#: Longest stream, sensor, type, agent or component name, in UTF-8 bytes.
MAX_NAME_BYTES = 128
#: Longest task id (``<stream>:<window start ns>`` fits with any stream name).
MAX_TASK_ID_BYTES = 160
#: Longest label, model name or version.
MAX_LABEL_BYTES = 256
#: Most dimensions of a wire array, and the largest extent of one.
MAX_ARRAY_DIMS = 8
MAX_ARRAY_EXTENT = 1 << 31
#: Most items of one msgpack list, and entries of one map, a message may hold.
MAX_LIST_ITEMS = 100_000
MAX_MAP_ENTRIES = 10_000

_BAD_NAME = re.compile(r"[.*>\s\x00-\x1f\x7f]")


def check_name(value: object, what: str = "name", *, max_bytes: int = MAX_NAME_BYTES) -> str:
    """Return ``value`` if it can stand as one subject token and one header value.

    Raises:
        SubjectError: it is not a non-empty string, is too long, or holds ``.``, ``*``,
            ``>``, white space or a control character.
    """
    if not isinstance(value, str) or not value:
        raise SubjectError(f"{what} must be a non-empty string, got {_preview(value)}")
    # A character is at most 4 bytes: short names skip the encode.
    if len(value) > max_bytes // 4 and len(value.encode()) > max_bytes:
        raise SubjectError(f"{what} is longer than {max_bytes} bytes: {_preview(value)}")
    if _BAD_NAME.search(value):
        raise SubjectError(
            f"{what} {_preview(value)} contains '.', '*', '>', white space or a control character"
        )
    return value


@dataclass(frozen=True)
class WireText:
    """How a string field is checked at decode: as a name (a subject token) or as free text,
    at most ``max_bytes`` long. Used as ``Annotated[str, WireText(...)]`` in messages."""

    max_bytes: int
    name: bool = True

    def check(self, value: str, where: str) -> str:
        """Return ``value``; raises :class:`SchemaError` (``bad_name`` / ``bad_field``)."""
        if self.name:
            try:
                return check_name(value, where, max_bytes=self.max_bytes)
            except SubjectError as exc:
                raise SchemaError("bad_name", str(exc)) from None
        if len(value) > self.max_bytes // 4 and len(value.encode()) > self.max_bytes:
            raise SchemaError("bad_field", f"{where} is longer than {self.max_bytes} bytes")
        return value

    def check_all(self, values: list[str] | tuple[str, ...], where: str) -> None:
        """Check many at once: one pattern search over all of them in the common case."""
        if not self.name:
            for value in values:
                self.check(value, where)
            return
        joined = "".join(values)
        if (
            all(values)
            and max(map(len, values), default=0) <= self.max_bytes // 4
            and not _BAD_NAME.search(joined)
        ):
            return
        for i, value in enumerate(values):
            self.check(value, f"{where}[{i}]")


NAME = WireText(MAX_NAME_BYTES)
TASK_ID = WireText(MAX_TASK_ID_BYTES)
LABEL = WireText(MAX_LABEL_BYTES, name=False)


def _preview(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"
