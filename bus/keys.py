"""The deployment's ticket key (see :mod:`schemas.tickets`), kept in a JetStream KV bucket.

The first coordinator or fusion agent that starts creates a random key; every later one
reads it, so all coordinators and fusion agents of a deployment seal and check tickets
alike. Agents never need it, and ``compose/nats.conf`` lets only the coordinator and fusion
roles read the bucket: whoever may only publish results cannot forge a ticket.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError

from bus.subjects import Subjects
from bus.topology import TopologySettings, keep_replicas_up, wait_for_leader
from schemas import BusError
from schemas.tickets import KEY_BYTES

_KEY = "tickets"


async def ticket_key(js: JetStreamContext, subjects: Subjects, topology: TopologySettings) -> bytes:
    """The deployment's ticket key; created (with its bucket, in the topology's storage) if
    there is none yet and the topology is managed, else waited for as long as streams are.

    Raises:
        BusError: there is no key in time (without ``topology.manage``).
    """
    deadline = asyncio.get_running_loop().time() + topology.wait_for_streams_s
    while True:
        try:
            key = await _read_or_make(js, subjects, topology)
        except TimeoutError:  # no answer: on a cluster, the bucket's leader is being elected
            key = None
        if key is not None:
            return key
        if asyncio.get_running_loop().time() > deadline:
            raise BusError(
                f"no ticket key in bucket {subjects.keys_bucket}; start a coordinator that "
                "manages the topology"
            )
        await asyncio.sleep(0.5)


async def _read_or_make(
    js: JetStreamContext, subjects: Subjects, topology: TopologySettings
) -> bytes | None:
    """The key if the bucket holds one; with ``topology.manage`` the bucket and the key
    are made first if missing (another component being first, theirs is read)."""
    manage = topology.manage
    try:
        kv = await js.key_value(subjects.keys_bucket)
        if manage:
            await keep_replicas_up(js, f"KV_{subjects.keys_bucket}", topology)
    except BucketNotFoundError:
        if not manage:
            return None
        kv = await js.create_key_value(
            KeyValueConfig(
                bucket=subjects.keys_bucket,
                history=1,
                storage=topology.storage_type,
                replicas=topology.replicas,
                placement=topology.placement,
            )
        )
    await wait_for_leader(js, f"KV_{subjects.keys_bucket}", timeout_s=topology.wait_for_streams_s)
    for _ in range(2):
        try:
            entry = await kv.get(_KEY)
            if entry.value and len(entry.value) == KEY_BYTES:
                return bytes(entry.value)
            return None
        except KeyNotFoundError:
            if not manage:
                return None
            # Another component may be first: then read theirs.
            with contextlib.suppress(KeyWrongLastSequenceError):
                await kv.create(_KEY, secrets.token_bytes(KEY_BYTES))
    return None
