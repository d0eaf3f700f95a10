"""Test helpers: collecting messages from the bus and waiting on them without sleeping."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import NotFoundError

from agents import AgentRuntime, AgentSettings, ModelAgent
from agents.fusion import FusionAgent
from bus import (
    BusSettings,
    Subjects,
    TopologySettings,
    connect,
    discover_agents,
    discover_components,
    follow_stored,
)
from bus.discovery import ROLE
from coordinator import Coordinator, CoordinatorSettings, Plan, PlanBook, basicmotions_plan
from fusebus.paths import models_dir
from schemas import BATCH_OF, CODEC

M = TypeVar("M")


class Collector(Generic[M]):
    """Decodes every message on a subject into a list; ``wait_for`` waits for a count.

    A batch of the kind collected (a ``result_batch`` for :class:`Result`) adds each item.
    """

    def __init__(self, kind: type[M]) -> None:
        self.kind = kind
        self.items: list[M] = []
        self._changed = asyncio.Event()
        self._sub: Subscription | None = None

    async def start(self, nc: Client, subject: str) -> Collector[M]:
        async def on_msg(msg: Msg) -> None:
            self._add(msg.data)

        self._sub = await nc.subscribe(subject, cb=on_msg)
        await nc.flush()
        return self

    async def start_stream(
        self, nc: Client, subject: str, *, timeout_s: float = 5.0
    ) -> Collector[M]:
        """Read what JetStream *stored* on ``subject`` (an ordered consumer): a message the
        server dropped as a duplicate is not seen here, unlike with :meth:`start`."""

        async def on_msg(msg: Msg) -> None:
            self._add(msg.data)

        async def followed() -> bool:
            try:
                self._sub = await follow_stored(nc, subject, on_msg)
            except NotFoundError:  # no stream stores it until a component has created them
                return False
            return True

        await eventually(followed, what=f"a stream storing {subject}", timeout_s=timeout_s)
        return self

    def _add(self, data: bytes) -> None:
        if self.kind in BATCH_OF:
            self.items.extend(CODEC.decode_each(data, self.kind))
        else:
            self.items.append(CODEC.decode(data, self.kind))
        self._changed.set()

    async def wait_for(self, count: int, timeout_s: float = 30.0) -> list[M]:
        """Wait until at least ``count`` items are in; fails the test on timeout."""

        async def reached() -> None:
            while len(self.items) < count:
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(reached(), timeout_s)
        except TimeoutError:
            raise AssertionError(
                f"got {len(self.items)} of {count} {self.kind.__name__} in {timeout_s}s"
            ) from None
        return self.items

    async def wait_until(self, predicate: Callable[[M], bool], timeout_s: float = 30.0) -> M:
        """Wait for the first item (already in or yet to come) that satisfies ``predicate``."""

        async def found() -> M:
            checked = 0
            while True:
                for item in self.items[checked:]:
                    if predicate(item):
                        return item
                checked = len(self.items)
                self._changed.clear()
                await self._changed.wait()

        try:
            return await asyncio.wait_for(found(), timeout_s)
        except TimeoutError:
            raise AssertionError(
                f"no matching {self.kind.__name__} among {len(self.items)} in {timeout_s}s"
            ) from None

    async def settle(self, quiet_s: float = 0.3) -> list[M]:
        """Wait until no new item has arrived for ``quiet_s`` (to catch unwanted extras)."""
        while True:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), quiet_s)
            except TimeoutError:
                return self.items


@dataclass
class Pipeline:
    """The components of an in-process pipeline started by the ``pipeline`` fixture."""

    subjects: Subjects
    nc: Client
    coordinator: Coordinator | None = None
    fusion: FusionAgent | None = None
    agents: list[AgentRuntime] = field(default_factory=list)

    def components(self) -> list[Any]:
        return [c for c in (self.coordinator, *self.agents, self.fusion) if c is not None]


class FrameFeeder:
    """Publishes BasicMotions TEST cases as frames, one every ``every_s``, until stopped."""

    def __init__(
        self, nc: Client, subjects: Subjects, dataset: Any, *, every_s: float, stream: str = "bm"
    ) -> None:
        from bus import Producer

        self.producer = Producer(nc, subjects)
        self.dataset = dataset
        self.every_s = every_s
        self.stream = stream
        self.sent = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> FrameFeeder:
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        from schemas import SensorFrame

        x = self.dataset.x_test
        while True:
            case = x[self.sent % len(x)]
            sensors = {name: self.dataset.sensor_view(case, name) for name in self.dataset.sensors}
            frame = SensorFrame(
                stream=self.stream,
                t_ns=(self.sent + 1) * 10**10,
                period_ns=self.dataset.period_ns,
                sensors=sensors,
            )
            await self.producer.frame(frame)
            self.sent += 1
            await asyncio.sleep(self.every_s)  # the pace of live sensors: what is under test

    async def stop(self) -> int:
        """Stop sending; returns how many frames were sent."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.producer.nc.flush()
        return self.sent


async def eventually(
    ready: Callable[[], bool | Awaitable[bool]],
    *,
    what: str,
    timeout_s: float = 10.0,
    state: Callable[[], object] | None = None,
    every_s: float = 0.02,
) -> None:
    """Wait until ``ready()`` holds, checking every ``every_s``; fails the test after
    ``timeout_s`` with ``what`` it was waiting for and, if given, the ``state()`` it last saw.

    ``ready`` may be a coroutine function, for conditions only a request can check (what
    discovery finds, a consumer's state). For conditions no event announces (a counter of
    another component); where an event exists, wait on the event.
    """
    limit = asyncio.timeout(timeout_s)
    try:
        async with limit:
            while True:
                answer = ready()
                if await answer if inspect.isawaitable(answer) else answer:
                    return
                await asyncio.sleep(every_s)  # there is no event to wait on
    except TimeoutError:
        if not limit.expired():
            raise  # a timeout of ready()'s own (a request), not of the wait
        seen = f"; last seen: {state()!r}" if state is not None else ""
        raise AssertionError(f"not true within {timeout_s}s: {what}{seen}") from None


async def wait_for_agents(
    nc: Client, prefix: str, counts: dict[str, int], *, timeout_s: float = 30.0
) -> None:
    """Wait until discovery shows exactly ``counts`` replicas of each type named there."""
    seen: Counter[str] = Counter()

    async def as_expected() -> bool:
        nonlocal seen
        found = await discover_agents(nc, prefix=prefix, timeout_s=0.2)
        seen = Counter(info.type for info, _ in found)
        return all(seen[t] == n for t, n in counts.items())

    await eventually(
        as_expected,
        what=f"agent replicas {counts} registered",
        timeout_s=timeout_s,
        state=lambda: dict(seen),
    )


async def wait_for_role(nc: Client, prefix: str, role: str, *, timeout_s: float = 30.0) -> None:
    """Wait until a component of ``role`` (``coordinator``, ``fusion``...) has registered."""

    async def registered() -> bool:
        replies = await discover_components(nc, prefix=prefix, timeout_s=0.2)
        return any((r.get("metadata") or {}).get(ROLE) == role for r in replies)

    await eventually(registered, what=f"a {role} registered", timeout_s=timeout_s)


async def stream_names(nc: Client) -> set[str]:
    """The names of every JetStream stream on the server (the listing comes in pages)."""
    names: set[str] = set()
    while page := await nc.jetstream().streams_info(offset=len(names)):
        names.update(info.config.name for info in page if info.config.name is not None)
    return names


def bus_connector(
    url: str, subjects: Subjects
) -> tuple[Callable[[str], Awaitable[Client]], Callable[[], Awaitable[None]]]:
    """Open named connections to the server(s) at ``url`` under ``subjects``' prefix, and a
    cleanup that closes them and deletes the streams created since the first connection:
    each reserves its ``max_bytes`` of the server's storage, and a session's worth would
    exhaust it."""
    opened: list[Client] = []
    before: set[str] | None = None

    async def open_one(name: str) -> Client:
        nonlocal before
        if before is None:
            admin = await connect(BusSettings(url=url), name="test-streams")
            before = await stream_names(admin)
            await admin.close()
        nc = await connect(BusSettings(url=url, prefix=subjects.prefix), name=name)
        opened.append(nc)
        return nc

    async def cleanup() -> None:
        for nc in opened:
            with contextlib.suppress(Exception):
                await nc.close()
        if before is None:
            return
        admin = await connect(BusSettings(url=url), name="test-streams")
        for name in await stream_names(admin) - before:
            with contextlib.suppress(Exception):
                await admin.jetstream().delete_stream(name)
        await admin.close()

    return open_one, cleanup


async def start_pipeline(
    connect_bus: Callable[[str], Awaitable[Client]],
    subjects: Subjects,
    *,
    agents: tuple[str, ...] = ("accel", "gyro"),
    plan: Plan | None = None,
    agent_settings: AgentSettings | None = None,
    coordinator_settings: CoordinatorSettings | None = None,
    topology: TopologySettings | None = None,
    started: list[Pipeline] | None = None,
) -> Pipeline:
    """A coordinator, model agents and a fusion agent in this process, each on its own
    connection (from ``connect_bus``); the caller stops them. The pipeline is added to
    ``started`` before its first component starts, so a start that fails midway still
    leaves the caller what to stop."""
    parts = Pipeline(subjects=subjects, nc=await connect_bus("test-client"))
    if started is not None:
        started.append(parts)
    parts.fusion = await FusionAgent(
        await connect_bus("fusion"), subjects=subjects, topology=topology
    ).start()
    for type_name in agents:
        agent = ModelAgent(models_dir() / f"{type_name}.tflite")
        runtime = AgentRuntime(
            agent,
            await connect_bus(f"agent-{type_name}"),
            subjects=subjects,
            settings=agent_settings,
            topology=topology,
        )
        parts.agents.append(await runtime.start())
    parts.coordinator = await Coordinator(
        await connect_bus("coordinator"),
        plans=PlanBook(default=plan or basicmotions_plan()),
        subjects=subjects,
        settings=coordinator_settings,
        topology=topology,
    ).start()
    return parts
