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

from schemas.messages import Task

#: Bytes of a ticket (128 bits of the HMAC).
TICKET_BYTES = 16
#: Bytes of a deployment key.
KEY_BYTES = 32


def seal(key: bytes, task: Task) -> bytes:
    """The ticket of ``task`` under ``key``."""
    window = task.window
    text = "\x1f".join(
        (task.task_id, task.stream, str(window.t_start_ns), str(window.t_end_ns),
         ",".join(task.expected), str(task.deadline_ns), str(task.ingest_ns))
    )  # fmt: skip
    return hmac.digest(key, text.encode(), "sha256")[:TICKET_BYTES]


def is_sealed(key: bytes, ticket: bytes, task: Task) -> bool:
    """Whether ``ticket`` is the ticket of ``task`` under ``key`` (in constant time)."""
    return len(ticket) == TICKET_BYTES and hmac.compare_digest(seal(key, task), ticket)
