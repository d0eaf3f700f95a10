"""Agents that follow the model registry: load what a rollout names, switch, free the old.

A replica started with ``--model store:NAME`` loads the current version of ``NAME`` (with
its canary and shadow, if any) from the registry, then watches the model's rollout. On a
change it loads the new versions beside the ones serving, warms them up and checks them,
then has the runtime switch between two batches (:meth:`AgentRuntime.switch`) and drops
the versions no longer named. A version that fails to load, warm up or answer is not
switched to: the replica keeps serving what it has and logs ``model.refused``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from agents.base import Agent
from agents.model_check import check_model_file
from agents.serving import Choice, Lineup, incompatibility, model_label
from bus import Subjects, TopologySettings, keep_running
from bus.registry import ModelRegistry, StoredModel, check_model_name
from bus.types import Connection
from schemas import BusError, ConfigError, FusebusError, ModelRollout

if TYPE_CHECKING:
    from agents.runtime import AgentRuntime, AgentSettings

log = structlog.get_logger("fusebus.agent")

#: How long a replica waits before it watches a model again after the registry did not
#: answer (a version it was loading is then tried again).
RETRY_S = 2.0

#: Where a replica keeps the files of the versions it serves: a folder of its own in the
#: temporary folder, named after its process id.
CACHE_PREFIX = "fusebus-models-"

#: The prefix of a ``--model`` that names a registry model rather than a file.
STORE_PREFIX = "store:"


def store_name(spec: str) -> str | None:
    """The registry model a ``--model`` names (``store:NAME``), or None for a file.

    Raises:
        ConfigError: the name after ``store:`` is not a valid model name.
    """
    if not spec.startswith(STORE_PREFIX):
        return None
    return check_model_name(spec[len(STORE_PREFIX) :])


class RegistryFollower:
    """Keeps one replica's registry models on what their rollouts say.

    Args:
        registry: the deployment's registry (read access is enough).
        names: the registry models the replica serves.
        type_name: the subtask type to serve (default: the models' cards').
    """

    def __init__(
        self,
        registry: ModelRegistry,
        names: Sequence[str],
        *,
        type_name: str | None = None,
    ) -> None:
        self.registry = registry
        self.names = tuple(dict.fromkeys(names))
        self.type_name = type_name
        _sweep_caches()
        self._cache = Path(tempfile.mkdtemp(prefix=f"{CACHE_PREFIX}{os.getpid()}-"))
        self._loaded: dict[str, dict[str, Agent]] = {name: {} for name in self.names}
        self._serving: dict[str, tuple[str, str, str]] = {}  # name -> (current, canary, shadow)
        self._tasks: list[asyncio.Task[None]] = []
        self._runtime: AgentRuntime | None = None
        self.refused: dict[str, str] = {}  # "name@version" -> why
        # The digest of each refused version: a version removed and stored again with
        # other bytes is tried again.
        self._refused_digests: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"RegistryFollower({', '.join(self.names)}, serving={self._serving})"

    async def initial(self) -> list[Choice]:
        """A choice for each model, from its rollout now. A current version that cannot
        serve is refused (and said so) and the versions current before it are tried, newest
        first: a replica starting beside running ones serves what they still serve.

        Raises:
            ConfigError: a model has no rollout, or none of its versions can serve.
        """
        choices = []
        for name in self.names:
            rollout = await self.registry.rollout(name)
            if rollout is None:
                raise ConfigError(
                    f"no model {name!r} in the registry; store one with `fusebus models put`"
                )
            choice = await self._choice(name, rollout, serving=None)
            for earlier in reversed(rollout.previous):
                if choice is not None:
                    break
                log.warning("model.fallback", model=name, current=rollout.current, trying=earlier)
                fallback = dataclasses.replace(rollout, current=earlier)
                choice = await self._choice(name, fallback, serving=None)
            if choice is None:
                raise ConfigError(
                    f"{name}: its current version {rollout.current} cannot serve: "
                    f"{self.refused.get(f'{name}@{rollout.current}', 'it did not load')}"
                    + (" (nor any version before it)" if rollout.previous else "")
                )
            choices.append(choice)
        return choices

    def follow(self, runtime: AgentRuntime) -> RegistryFollower:
        """Watch every model's rollout and switch ``runtime`` as they change, until stopped."""
        self._runtime = runtime
        runtime.refused.update(self.refused)  # what was refused at start, for the status
        for name in self.names:
            # A watch that fails for any reason is logged and made again (from the rollout
            # at that moment): the replica never stops following.
            watch = keep_running(
                partial(self._watch, name), name=f"follow-{name}", backoff_s=RETRY_S
            )
            self._tasks.append(asyncio.create_task(watch, name=f"follow-{name}"))
        return self

    async def stop(self) -> None:
        """Stop watching and remove the downloaded files."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        shutil.rmtree(self._cache, ignore_errors=True)

    async def _watch(self, name: str) -> None:
        async for rollout in self.registry.watch(name):
            if rollout is None:
                log.warning("model.unlisted", model=name, outcome="keeps_serving")
                continue
            try:
                await self._follow(name, rollout)
            except BusError:
                raise  # the registry did not answer: watched again (and retried) shortly
            except FusebusError as exc:  # the registry or a file: keep serving, say why
                log.error(
                    "model.follow_failed", model=name, error=str(exc), outcome="keeps_serving"
                )

    async def _follow(self, name: str, rollout: ModelRollout) -> None:
        runtime = self._runtime
        assert runtime is not None
        named = {f"{name}@{v}" for v in rollout.versions}
        for label in [k for k in runtime.refused if k.partition("@")[0] == name]:
            if label not in named:  # no longer asked for: no longer worth a status line
                del runtime.refused[label]
        wanted = (rollout.current, rollout.canary, rollout.shadow)
        if self._serving.get(name) == wanted:
            return
        serving = next(c for c in runtime.lineup.choices if c.name == name)
        choice = await self._choice(name, rollout, serving=serving)
        if choice is None or choice == serving:  # nothing new loaded: keep serving as is
            return
        started = time.perf_counter()
        try:
            await runtime.switch(choice)
        except ConfigError as exc:
            runtime.refused[name] = str(exc)
            log.error("model.refused", model=name, error=str(exc), outcome="keeps_serving")
            return
        keep = {a.model.version for a in choice.agents}
        for version in list(self._loaded[name]):
            if version not in keep:
                del self._loaded[name][version]  # the runtime no longer holds it either
                shutil.rmtree(self._cache / name / version, ignore_errors=True)
        log.info(
            "model.serving",
            model=name,
            serving=choice.describe(),  # its own "model" key is the current version's label
            switch_wait_ms=round((time.perf_counter() - started) * 1e3, 1),
        )

    async def _choice(
        self, name: str, rollout: ModelRollout, *, serving: Choice | None
    ) -> Choice | None:
        """The choice ``rollout`` asks for, with each version that loads; a current
        version that does not load leaves the serving one in place (None at start)."""
        current = await self._load(
            name, rollout.current, against=serving.current if serving else None
        )
        if current is None:
            if serving is None:
                return None
            current = serving.current
        canary = await self._load(name, rollout.canary, against=current) if rollout.canary else None
        shadow = await self._load(name, rollout.shadow, against=current) if rollout.shadow else None
        self._serving[name] = (
            current.model.version,
            rollout.canary if canary else "",
            rollout.shadow if shadow else "",
        )
        return Choice(
            name,
            current,
            canary=canary,
            canary_share=rollout.canary_share if canary else 0.0,
            shadow=shadow,
        )

    async def _load(self, name: str, version: str, *, against: Agent | None) -> Agent | None:
        """``version`` of ``name``, loaded, warmed up and checked against the version it
        would stand beside; None (said once per version) if it cannot serve. A registry
        that does not answer is tried again with the next change."""
        if version in self._loaded[name]:
            return self._loaded[name][version]
        label = f"{name}@{version}"
        started = time.perf_counter()
        folder = self._cache / name / version
        stored: StoredModel | None = None
        try:
            stored = await self.registry.info(name, version)
            if stored is None:
                raise ConfigError(f"{name} has no stored version {version!r}")
            if self._refused_digests.get(label) == stored.digest:
                return None  # refused already; the same bytes would be again
            path = await self._fetch(stored, folder)
            agent = await asyncio.to_thread(check_model_file, path, type_name=self.type_name)
            problem = incompatibility(against, agent) if against is not None else ""
            if problem:
                raise ConfigError(problem)
        except BusError:
            shutil.rmtree(folder, ignore_errors=True)
            raise  # the registry did not answer: the watch is made again, and retries
        except FusebusError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            if stored is not None:
                self._refused_digests[label] = stored.digest
            self.refused[label] = str(exc)
            if self._runtime is not None:  # its counters say so too (fusebus status)
                self._runtime.refused[label] = str(exc)
            log.error(
                "model.refused",
                model=name,
                version=version,
                error=str(exc),
                outcome="keeps_serving",
            )
            return None
        self._loaded[name][version] = agent
        log.info(
            "model.loaded",
            model=name,
            version=version,
            card=model_label(agent),
            load_ms=round((time.perf_counter() - started) * 1e3, 1),
        )
        return agent

    async def _fetch(self, stored: StoredModel, folder: Path) -> Path:
        """Put a stored version's file and card in ``folder``, where a model runtime loads
        them from; returns the model file's path."""
        suffix = Path(stored.file_name).suffix
        if suffix not in (".tflite", ".keras"):
            raise ConfigError(
                f"{stored.name}@{stored.version}: no runtime loads {stored.file_name!r}"
            )
        path = folder / f"model{suffix}"
        # Results name the registry's model and version, which is what rollouts speak of
        # (a card's own name and version may differ: `models put --name/--version`).
        card = {**stored.card, "name": stored.name, "version": stored.version}
        await asyncio.to_thread(_write_card, folder, path.with_suffix(".json"), card)
        await self.registry.download(stored, path)
        return path


async def start_agent(
    nc: Connection,
    *,
    subjects: Subjects,
    files: Sequence[Choice] = (),
    stored: Sequence[str] = (),
    type_name: str | None = None,
    settings: AgentSettings | None = None,
    topology: TopologySettings | None = None,
) -> AgentRuntime:
    """Start a replica serving ``files`` (models loaded here) and the registry models
    ``stored``, which it follows as they are rolled out; with several, the most accurate
    answers when time allows.

    Raises:
        ConfigError: no model is given, or one cannot serve.
        BusError: a registry model is named and the deployment has no registry.
    """
    from agents.runtime import AgentRuntime

    topology = topology or TopologySettings()
    choices = list(files)
    follower = None
    if stored:
        registry = await ModelRegistry.open(nc.jetstream(), subjects, topology)
        follower = RegistryFollower(registry, stored, type_name=type_name)
    try:
        if follower is not None:
            choices += await follower.initial()
        runtime = AgentRuntime(
            Lineup.ranked(choices), nc, subjects=subjects, settings=settings, topology=topology
        )
        await runtime.start()
    except BaseException:
        if follower is not None:
            await follower.stop()  # removes what it downloaded
        raise
    if follower is not None:
        runtime.adopt(follower.follow(runtime))
    return runtime


def _write_card(folder: Path, path: Path, card: dict[str, object]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(card), encoding="utf-8")


def _sweep_caches() -> None:
    """Remove the model folders of replicas that are gone (killed before they could clean
    up): a folder named after a process id that no longer runs here."""
    for folder in Path(tempfile.gettempdir()).glob(f"{CACHE_PREFIX}*-*"):
        pid = folder.name[len(CACHE_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            continue  # another user's process: alive
