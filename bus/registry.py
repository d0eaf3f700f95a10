"""The model registry: model files in a JetStream object store, rollouts in a KV bucket.

Each stored version is one object, ``<name>/<version>``, whose description holds its card
and original file name; versions never change once stored. Which version serves is the
model's :class:`~schemas.ModelRollout`, kept under its name in the rollouts bucket; every
replica following the model watches that key. Both buckets, and the stream that keeps
shadow outputs, have the deployment's replicas, storage and placement.

``compose/nats.conf`` lets only the ``models`` role write them; agents may only read.
The transitions (promote, rollback, canary, shadow) are pure functions of a rollout, so
that they are tested without a server and applied with compare-and-set.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import re
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    ObjectMeta,
    ObjectStoreConfig,
    RetentionPolicy,
)
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
    ObjectNotFoundError,
)
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from bus.subjects import Subjects
from bus.topology import TopologySettings, ensure_stream, keep_replicas_up, wait_for_leader
from schemas import CODEC, BusError, ConfigError, ModelRollout, SchemaError
from schemas.messages import ROLLOUT_HISTORY

log = structlog.get_logger("fusebus.registry")

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_VERSION = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")
#: How long shadow outputs are kept for ``fusebus models compare``, and how many bytes.
SHADOW_MAX_AGE_S = 24 * 3600.0
SHADOW_MAX_BYTES = 256 * 1024 * 1024
#: Largest model file the registry stores.
MAX_MODEL_BYTES = 512 * 1024 * 1024


def check_model_name(name: str) -> str:
    """``name`` if it can name a registry model (a subject token and a KV key).

    Raises:
        ConfigError: it is not 1-64 of letters, digits, ``_`` and ``-``.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"model name {name!r} must be 1-64 letters, digits, '_' or '-'")
    return name


def check_version(version: str) -> str:
    """``version`` if it can name a stored version.

    Raises:
        ConfigError: it is not 1-64 of letters, digits, ``_``, ``-`` and ``.`` (not first).
    """
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise ConfigError(
            f"model version {version!r} must be 1-64 letters, digits, '_', '-' or '.' "
            "(not starting with '.')"
        )
    return version


@dataclass(frozen=True)
class StoredModel:
    """One stored version of a registry model, as :meth:`ModelRegistry.catalog` shows it."""

    name: str
    version: str
    file_name: str  # the file it was put from: its suffix says which runtime loads it
    size: int
    digest: str  # the object store's, ``SHA-256=<base64>``
    stored: str  # when it was put (the server's time, RFC 3339)
    card: dict[str, Any]

    @property
    def type(self) -> str:
        """The subtask type its card serves."""
        return str(self.card.get("type", ""))


# Rollout transitions: pure, so that every rule is tested without a server ----------------
def first_rollout(name: str, type_name: str, version: str) -> ModelRollout:
    """The rollout of a model's first stored version: it is current."""
    return ModelRollout(name=name, type=type_name, current=version, updated_ns=time.time_ns())


def promoted(rollout: ModelRollout, version: str) -> ModelRollout:
    """``version`` becomes current; the old current is remembered for rollback, and a
    canary or shadow of ``version`` ends (it now answers everything)."""
    if version == rollout.current:
        return rollout
    canary = rollout.canary != version
    return dataclasses.replace(
        rollout,
        current=version,
        previous=(*rollout.previous, rollout.current)[-ROLLOUT_HISTORY:],
        canary=rollout.canary if canary else "",
        canary_share=rollout.canary_share if canary else 0.0,
        shadow="" if rollout.shadow == version else rollout.shadow,
        updated_ns=time.time_ns(),
    )


def rolled_back(rollout: ModelRollout) -> ModelRollout:
    """The version current before this one is current again; a canary ends with it, and a
    shadow of that version (it answers again).

    Raises:
        ConfigError: no version was current before.
    """
    if not rollout.previous:
        raise ConfigError(f"model {rollout.name!r} has no earlier version to roll back to")
    back = rollout.previous[-1]
    return dataclasses.replace(
        rollout,
        current=back,
        previous=rollout.previous[:-1],
        canary="",
        canary_share=0.0,
        shadow="" if rollout.shadow == back else rollout.shadow,
        updated_ns=time.time_ns(),
    )


def with_canary(rollout: ModelRollout, version: str, share: float) -> ModelRollout:
    """``version`` answers ``share`` of the subtasks (0 ends the canary).

    Raises:
        ConfigError: the share is not in [0, 1), or ``version`` is already current.
    """
    if not 0.0 <= share < 1.0:
        raise ConfigError(f"canary share must be in [0, 1) (promote for all), got {share!r}")
    if share and version == rollout.current:
        raise ConfigError(f"version {version!r} of {rollout.name!r} is already current")
    return dataclasses.replace(
        rollout,
        canary=version if share else "",
        canary_share=share,
        updated_ns=time.time_ns(),
    )


def with_shadow(rollout: ModelRollout, version: str) -> ModelRollout:
    """``version`` runs in shadow beside the current one ("" ends the shadow).

    Raises:
        ConfigError: ``version`` is already current.
    """
    if version and version == rollout.current:
        raise ConfigError(f"version {version!r} of {rollout.name!r} is already current")
    return dataclasses.replace(rollout, shadow=version, updated_ns=time.time_ns())


def serving_versions(rollout: ModelRollout | None) -> set[str]:
    """The versions a rollout has replicas load (current, canary, shadow)."""
    return set(rollout.versions) if rollout is not None else set()


# The registry on the bus -------------------------------------------------------------------
class ModelRegistry:
    """The deployment's model registry; :meth:`open` it, then put, list, read and roll out.

    Every call raises :class:`~schemas.ConfigError` for what the user asked wrongly (an
    unknown model or version, an existing version) and :class:`~schemas.BusError` when the
    bus does not answer.
    """

    def __init__(
        self, js: JetStreamContext, subjects: Subjects, store: ObjectStore, rollouts: KeyValue
    ) -> None:
        self.js = js
        self.subjects = subjects
        self.store = store
        self.rollouts = rollouts

    @classmethod
    async def open(
        cls,
        js: JetStreamContext,
        subjects: Subjects,
        topology: TopologySettings,
        *,
        create: bool = False,
    ) -> ModelRegistry:
        """The registry's buckets; with ``create`` (the ``models`` role), made first if
        missing, with the shadow stream.

        Raises:
            BusError: the buckets do not exist (without ``create``), or the bus does not answer.
        """
        try:
            store, rollouts = await cls._buckets(js, subjects, topology, create=create)
        except (BucketNotFoundError, NotFoundError):
            raise BusError(
                f"no model registry under prefix {subjects.prefix!r} (buckets "
                f"{subjects.models_bucket} and {subjects.rollouts_bucket}); "
                "store a model first with `fusebus models put`"
            ) from None
        except TimeoutError:
            raise BusError("the model registry's buckets did not answer in time") from None
        return cls(js, subjects, store, rollouts)

    @staticmethod
    async def _buckets(
        js: JetStreamContext, subjects: Subjects, topology: TopologySettings, *, create: bool
    ) -> tuple[ObjectStore, KeyValue]:
        shared: dict[str, Any] = {
            "storage": topology.storage_type,
            "replicas": topology.replicas,
            "placement": topology.placement,
        }
        try:
            store = await js.object_store(subjects.models_bucket)
        except (BucketNotFoundError, NotFoundError):
            if not create:
                raise
            store = await js.create_object_store(
                subjects.models_bucket,
                ObjectStoreConfig(description="fusebus model registry", max_bytes=-1, **shared),
            )
        try:
            rollouts = await js.key_value(subjects.rollouts_bucket)
        except (BucketNotFoundError, NotFoundError):
            if not create:
                raise
            rollouts = await js.create_key_value(
                KeyValueConfig(bucket=subjects.rollouts_bucket, history=8, **shared)
            )
        if create:
            await keep_replicas_up(js, f"OBJ_{subjects.models_bucket}", topology)
            await keep_replicas_up(js, f"KV_{subjects.rollouts_bucket}", topology)
            await ensure_stream(
                js,
                topology.stream_config(
                    name=subjects.shadow_stream,
                    subjects=[subjects.all_shadows()],
                    retention=RetentionPolicy.LIMITS,
                    max_age=SHADOW_MAX_AGE_S,
                    max_bytes=SHADOW_MAX_BYTES,
                    discard=DiscardPolicy.OLD,
                ),
                topology,
            )
        for stream in (f"OBJ_{subjects.models_bucket}", f"KV_{subjects.rollouts_bucket}"):
            await wait_for_leader(js, stream, timeout_s=topology.wait_for_streams_s)
        return store, rollouts

    # Versions ----------------------------------------------------------------------------
    async def put(
        self, name: str, version: str, data: bytes, *, file_name: str, card: dict[str, Any]
    ) -> StoredModel:
        """Store ``data`` (a model file) as ``version`` of ``name``, with its card. The
        first version of a model becomes current; later ones wait for ``promote``.

        Raises:
            ConfigError: the name or version is not valid, the version is already stored,
                the file is too large, or the card's type differs from the model's.
        """
        check_model_name(name)
        check_version(version)
        if len(data) > MAX_MODEL_BYTES:
            raise ConfigError(
                f"model file is {len(data)} bytes; the registry takes at most {MAX_MODEL_BYTES}"
            )
        if await self.info(name, version) is not None:
            raise ConfigError(
                f"{name} version {version} is already stored (versions never change: "
                "put it under a new version, or rm it first)"
            )
        type_name = str(card.get("type", ""))
        rollout = await self.rollout(name)
        if rollout is not None and rollout.type != type_name:
            raise ConfigError(
                f"{name} serves type {rollout.type!r}; this card is for type {type_name!r}"
            )
        description = json.dumps({"file": file_name, "card": card}, separators=(",", ":"))
        with _answered(f"storing {name} version {version}"):
            await self.store.put(
                _object(name, version),
                data,
                meta=ObjectMeta(name=_object(name, version), description=description),
            )
        if rollout is None:  # unless another put made the first one meanwhile
            await self.update(name, lambda r: r or first_rollout(name, type_name, version))
        stored = await self.info(name, version)
        assert stored is not None  # just put
        log.info("model.stored", model=name, version=version, size=len(data), type=type_name)
        return stored

    async def get(self, name: str, version: str) -> tuple[StoredModel, bytes]:
        """A stored version and its file's bytes (checked against its digest).

        Raises:
            ConfigError: no such version is stored, or it is larger than the registry takes.
        """
        stored = await self.info(name, version)
        if stored is None:
            raise ConfigError(f"{name} has no stored version {version!r}")
        buffer = io.BytesIO()
        await self._read(stored, buffer)
        return stored, buffer.getvalue()

    async def download(self, stored: StoredModel, path: Path) -> None:
        """Write a stored version's file to ``path`` as it arrives.

        Raises:
            ConfigError: the version is larger than the registry takes, or was removed.
        """
        out = await asyncio.to_thread(path.open, "wb")
        try:
            await self._read(stored, out)
        finally:
            await asyncio.to_thread(out.close)

    async def _read(self, stored: StoredModel, out: io.BufferedIOBase) -> None:
        """Write a stored version's chunks into ``out`` one by one as they arrive (not
        joined in memory first; the object store checks the digest)."""
        if stored.size > MAX_MODEL_BYTES:
            raise ConfigError(
                f"{stored.name} version {stored.version} is {stored.size} bytes; the registry "
                f"takes at most {MAX_MODEL_BYTES}"
            )
        try:
            with _answered(f"reading {stored.name} version {stored.version}"):
                await self.store.get(_object(stored.name, stored.version), writeinto=out)
        except ObjectNotFoundError:
            raise ConfigError(f"{stored.name} version {stored.version} was removed") from None

    async def catalog(self) -> list[StoredModel]:
        """Every stored version, by name then in the order stored."""
        try:
            with _answered("listing the stored versions"):
                infos = await self.store.list()
        except NotFoundError:  # an empty bucket
            return []
        found = [_stored(info) for info in infos if not info.deleted]
        models = [model for model in found if model is not None]
        return sorted(models, key=lambda m: (m.name, m.stored, m.version))

    async def remove(self, name: str, version: str | None = None) -> list[str]:
        """Remove one stored version, or (``version`` None) the model: every version and
        its rollout. Returns the versions removed.

        Raises:
            ConfigError: the version serves (current, canary or shadow), or nothing matches.
        """
        check_model_name(name)
        versions = [m.version for m in await self.catalog() if m.name == name]
        rollout = await self.rollout(name)
        if version is not None:
            if version not in versions:
                raise ConfigError(f"{name} has no stored version {version!r}")
            if version in serving_versions(rollout):
                raise ConfigError(
                    f"{name} version {version} is serving; promote, roll back or end its "
                    "canary or shadow first (or rm the whole model)"
                )
            versions = [version]
        elif not versions and rollout is None:
            raise ConfigError(f"no model {name!r} in the registry")
        for each in versions:
            with (
                contextlib.suppress(ObjectNotFoundError, NotFoundError),
                _answered(f"removing {name} version {each}"),
            ):
                await self.store.delete(_object(name, each))
        if version is None:
            with contextlib.suppress(KeyNotFoundError), _answered(f"removing {name}'s rollout"):
                await self.rollouts.purge(name)
        elif rollout is not None and version in rollout.previous:
            await self.update(name, lambda r: _forgetting(_known(r, name), version))
        log.info("model.removed", model=name, versions=versions)
        return versions

    async def info(self, name: str, version: str) -> StoredModel | None:
        """A stored version, or None when there is no such version."""
        try:
            with _answered(f"looking up {name} version {version}"):
                info = await self.store.get_info(_object(name, version))
        except (ObjectNotFoundError, NotFoundError):
            return None
        return None if info.deleted else _stored(info)

    # Rollouts ----------------------------------------------------------------------------
    async def rollout(self, name: str) -> ModelRollout | None:
        """The model's rollout, or None when it has none."""
        check_model_name(name)
        try:
            with _answered(f"reading {name}'s rollout"):
                entry = await self.rollouts.get(name)
        except KeyNotFoundError:
            return None
        return _decode_rollout(entry.value, name)

    async def update(
        self, name: str, change: Callable[[ModelRollout | None], ModelRollout]
    ) -> ModelRollout:
        """Apply ``change`` to the model's rollout with compare-and-set: a concurrent
        change makes it read again and retry, so no change is lost. ``change`` is given
        None when the model has no rollout, or one that does not decode (which it then
        replaces)."""
        check_model_name(name)
        while True:
            try:
                with _answered(f"reading {name}'s rollout"):
                    entry = await self.rollouts.get(name)
                revision = entry.revision
                current = _decode_rollout(entry.value, name)
            except KeyNotFoundError:
                current, revision = None, None
            except ConfigError as exc:
                log.warning("model.bad_rollout", model=name, error=str(exc), outcome="replaced")
                current = None
            wanted = change(current)
            if wanted == current:
                return wanted
            try:
                with _answered(f"writing {name}'s rollout"):
                    if revision is None:
                        await self.rollouts.create(name, CODEC.encode(wanted))
                    else:
                        await self.rollouts.update(name, CODEC.encode(wanted), last=revision)
            except KeyWrongLastSequenceError:
                continue  # someone else changed it meanwhile
            log.info(
                "model.rollout",
                model=name,
                current=wanted.current,
                canary=wanted.canary,
                canary_share=wanted.canary_share,
                shadow=wanted.shadow,
            )
            return wanted

    async def promote(self, name: str, version: str) -> ModelRollout:
        """``version`` becomes current (see :func:`promoted`).

        Raises:
            ConfigError: the version is not stored.
        """
        stored = await self._stored(name, version)
        # With no readable rollout (a value another writer spoiled), promoting starts anew.
        return await self.update(
            name, lambda r: promoted(r, version) if r else first_rollout(name, stored.type, version)
        )

    async def rollback(self, name: str) -> ModelRollout:
        """The version current before is current again (see :func:`rolled_back`)."""
        return await self.update(name, lambda r: rolled_back(_known(r, name)))

    async def canary(self, name: str, version: str, share: float) -> ModelRollout:
        """``version`` answers ``share`` of the subtasks (see :func:`with_canary`)."""
        if share:
            await self._stored(name, version)
        return await self.update(name, lambda r: with_canary(_known(r, name), version, share))

    async def shadow(self, name: str, version: str) -> ModelRollout:
        """``version`` runs in shadow ("" ends it; see :func:`with_shadow`)."""
        if version:
            await self._stored(name, version)
        return await self.update(name, lambda r: with_shadow(_known(r, name), version))

    async def _stored(self, name: str, version: str) -> StoredModel:
        check_version(version)
        stored = await self.info(name, version)
        if stored is None:
            raise ConfigError(f"{name} has no stored version {version!r}")
        return stored

    async def watch(
        self, name: str, *, poll_s: float = 5.0
    ) -> AsyncGenerator[ModelRollout | None, None]:
        """The model's rollout now, then each change as it is made (None: it was removed).

        A value that does not decode is logged and skipped; a watch the server drops is
        made again, starting with the value at that moment, so no change is missed.
        """
        check_model_name(name)
        while True:
            try:
                watcher = await self.rollouts.watch(name)
            except (TimeoutError, NotFoundError, BucketNotFoundError) as exc:
                log.warning("model.watch_failed", model=name, error=str(exc) or type(exc).__name__)
                await asyncio.sleep(poll_s)
                continue
            try:
                async for entry in watcher:
                    if entry is None:  # the initial values are all delivered
                        continue
                    if entry.operation in ("DEL", "PURGE"):
                        yield None
                        continue
                    try:
                        yield _decode_rollout(entry.value, name)
                    except ConfigError as exc:
                        log.warning("model.bad_rollout", model=name, error=str(exc))
            finally:  # a watch that ended (stopped under it) is made again by the loop
                with contextlib.suppress(Exception):
                    await watcher.stop()  # type: ignore[no-untyped-call]


@contextlib.contextmanager
def _answered(doing: str) -> Iterator[None]:
    """Raise the bus failing a registry request (no answer in time, an error from the
    client) as a :class:`BusError` saying what the registry was ``doing``. A user without
    the right to a subject gets no answer: the server refuses the publish, and the request
    times out."""
    try:
        yield
    except (TimeoutError, nats.errors.Error) as exc:
        if isinstance(exc, (NotFoundError, KeyWrongLastSequenceError)):
            raise  # answers (no such key, object or bucket; a lost race): callers handle them
        error = str(exc) or type(exc).__name__
        raise BusError(f"the model registry failed {doing}: {error}") from exc


def _forgetting(rollout: ModelRollout, version: str) -> ModelRollout:
    """``rollout`` without ``version`` among the versions to roll back to."""
    return dataclasses.replace(rollout, previous=tuple(v for v in rollout.previous if v != version))


def _object(name: str, version: str) -> str:
    return f"{name}/{version}"


def _known(rollout: ModelRollout | None, name: str) -> ModelRollout:
    if rollout is None:
        raise ConfigError(
            f"model {name!r} has no readable rollout; put a version first (or promote one to "
            "start its rollout again)"
        )
    return rollout


def _decode_rollout(value: bytes | None, name: str) -> ModelRollout:
    try:
        rollout = CODEC.decode(value or b"", ModelRollout)
    except SchemaError as exc:
        raise ConfigError(f"the rollout of {name!r} is unreadable: {exc}") from None
    if rollout.name != name:
        raise ConfigError(f"the rollout under {name!r} names model {rollout.name!r}")
    named = [
        rollout.current,
        *rollout.previous,
        *(v for v in (rollout.canary, rollout.shadow) if v),
    ]
    for version in named:  # they name objects and the folders replicas keep them in
        if not _VERSION.fullmatch(version):
            raise ConfigError(f"the rollout of {name!r} names version {version!r}, not a version")
    return rollout


def _stored(info: Any) -> StoredModel | None:
    """A stored version from its object info; None for an object fusebus did not put."""
    name, _, version = str(info.name).partition("/")
    try:
        described = json.loads(info.description or "")
        card = described["card"]
        file_name = str(described["file"])
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(card, dict) or not _NAME.fullmatch(name) or not _VERSION.fullmatch(version):
        return None
    return StoredModel(
        name=name,
        version=version,
        file_name=file_name,
        size=int(info.size or 0),
        digest=str(info.digest or ""),
        stored=str(info.mtime or ""),
        card=card,
    )
