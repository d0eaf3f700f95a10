"""Tickets: the coordinator's seal on each task it opens, so fusion decides only those.

A ticket is a truncated HMAC-SHA256, under a deployment key that only the coordinator and
the fusion agent can read, over the task fields fusion relies on (id, stream, window,
expected types, deadline, ingest time). The coordinator puts it on every subtask and
status; agents copy it into their results like the window and the expected types. A result
or status whose ticket does not match was not made from a task the coordinator opened (or
its fields were changed on the way) and is dead-lettered as ``unknown_task``. Checking one
costs about a microsecond, and it needs no extra message per task.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

#: Bytes of a ticket (128 bits of the HMAC).
TICKET_BYTES = 16
#: Bytes of a deployment key.
KEY_BYTES = 32


def seal(
    key: bytes,
    *,
    task_id: str,
    stream: str,
    window: tuple[int, int],
    expected: Sequence[str],
    deadline_ns: int,
    ingest_ns: int,
) -> bytes:
    """The ticket of a task under ``key``."""
    text = "\x1f".join(
        (task_id, stream, str(window[0]), str(window[1]), ",".join(expected),
         str(deadline_ns), str(ingest_ns))
    )  # fmt: skip
    return hmac.digest(key, text.encode(), "sha256")[:TICKET_BYTES]


def is_sealed(
    key: bytes,
    ticket: bytes,
    *,
    task_id: str,
    stream: str,
    window: tuple[int, int],
    expected: Sequence[str],
    deadline_ns: int,
    ingest_ns: int,
) -> bool:
    """Whether ``ticket`` is the ticket of this task under ``key`` (in constant time)."""
    if len(ticket) != TICKET_BYTES:
        return False
    want = seal(
        key,
        task_id=task_id,
        stream=stream,
        window=window,
        expected=expected,
        deadline_ns=deadline_ns,
        ingest_ns=ingest_ns,
    )
    return hmac.compare_digest(want, ticket)
