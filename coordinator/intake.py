"""Sensor intake: frames and per-sensor chunks in, windows out, sensor liveness on the side.

Owns each stream's :class:`~coordinator.windows.StreamWindower` and the
:class:`~coordinator.liveness.SensorLiveness` of its sensors; hands every window it cuts to
the coordinator, and announces sensors that go silent or come back.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import structlog

from bus import Producer, Subjects
from bus.types import Message
from coordinator.liveness import Change, SensorLiveness
from coordinator.plan import Plan, PlanBook
from coordinator.windows import CutWindow, StreamWindower, shape_from_plan
from schemas import CODEC, SchemaError, SensorChunk, SensorFrame, SensorStatus, Window

log = structlog.get_logger("fusebus.coordinator")

OnWindow = Callable[[CutWindow, Message | None, Plan], Awaitable[None]]
OnBadMessage = Callable[[Message, str, str], Awaitable[None]]


class SensorIntake:
    """Turns a deployment's frames and chunks into windows.

    Args:
        plans: the plan of each stream.
        subjects: subject names.
        producer: publishes sensor status events.
        on_window: called with every window (and the frame's message, to answer it).
        on_bad_message: called with a message that cannot be used, its reason and error.
        forget_after_s: a stream silent this long is forgotten (its last windows closed).
    """

    def __init__(
        self,
        *,
        plans: PlanBook,
        subjects: Subjects,
        producer: Producer,
        on_window: OnWindow,
        on_bad_message: OnBadMessage,
        forget_after_s: float,
    ) -> None:
        self.plans = plans
        self.subjects = subjects
        self.producer = producer
        self._on_window = on_window
        self._dead_letter = on_bad_message
        self.liveness = SensorLiveness(forget_after_s=forget_after_s)
        self._windowers: dict[str, StreamWindower] = {}
        self._watched: set[str] = set()
        self.counts: dict[str, int] = dict.fromkeys(
            ("frames", "chunks", "sensors_down", "streams_forgotten"), 0
        )

    def __repr__(self) -> str:
        return f"SensorIntake(streams={len(self._windowers)} {self.counts})"

    def stats(self) -> dict[str, int]:
        """Counters, with the live stream count and the late chunks of live streams."""
        return {
            **self.counts,
            "streams": len(self._windowers),
            "late_chunks": sum(w.counts["late_chunks"] for w in self._windowers.values()),
        }

    def buffered_samples(self) -> dict[str, int]:
        """Samples held per stream (to check memory stays bounded)."""
        return {stream: w.buffered_samples for stream, w in self._windowers.items()}

    async def on_frame(self, msg: Message) -> None:
        """Take a pre-aligned frame as one window."""
        self.counts["frames"] += 1
        try:
            frame = CODEC.decode(msg.data, SensorFrame)
            plan = self._plan_for(frame.stream, msg.subject)
            if not frame.sensors:
                raise SchemaError("bad_field", "frame carries no sensor")
        except SchemaError as exc:
            await self._dead_letter(msg, exc.reason, str(exc))
            return
        samples = next(iter(frame.sensors.values())).shape[0]
        window = Window(frame.t_ns, frame.t_ns + samples * frame.period_ns)
        absent = tuple(s.name for s in plan.sensors if s.name not in frame.sensors)
        await self._on_window(CutWindow(frame.stream, window, frame.sensors, absent), msg, plan)

    async def on_chunk(self, msg: Message) -> None:
        """Buffer a chunk and pass on every window it completes."""
        self.counts["chunks"] += 1
        try:
            chunk = CODEC.decode(msg.data, SensorChunk)
            plan = self._plan_for(chunk.stream, msg.subject)
            if msg.subject != self.subjects.sensor(chunk.stream, chunk.sensor):
                raise SchemaError("stream_mismatch", f"chunk of {chunk.sensor!r} on {msg.subject}")
            windower = self._windower(chunk.stream, plan)
            accepted = windower.add(chunk)
        except SchemaError as exc:
            await self._dead_letter(msg, exc.reason, str(exc))
            return
        if not accepted:
            log.debug("chunk.dropped", stream=chunk.stream, sensor=chunk.sensor, t0_ns=chunk.t0_ns)
        await self.heard(chunk.stream, chunk.sensor)
        for cut in windower.ready():
            await self._on_window(cut, None, plan)

    def _plan_for(self, stream: str, subject: str) -> Plan:
        if stream != self.subjects.stream_of(subject):
            raise SchemaError("stream_mismatch", f"data for {stream!r} on {subject}")
        plan = self.plans.for_stream(stream)
        if plan is None:
            raise SchemaError("no_plan", f"no plan covers stream {stream!r}")
        return plan

    def _windower(self, stream: str, plan: Plan) -> StreamWindower:
        windower = self._windowers.get(stream)
        if windower is None:
            if plan.window is None:
                raise SchemaError(
                    "no_window", f"the plan of {stream!r} has no [window] for per-sensor data"
                )
            w = plan.window
            sensors = tuple(s.name for s in plan.sensors) or tuple(
                dict.fromkeys(name for spec in plan.subtasks for name in spec.sensors)
            )
            shape = shape_from_plan(w.size_ms, w.hop_ms, w.lateness_ms, w.rate_hz, w.max_gap_ms)
            windower = self._windowers[stream] = StreamWindower(stream, shape, sensors)
        return windower

    async def heard(self, stream: str, sensor: str) -> None:
        """Note that a sensor spoke; announce it if it had been down."""
        plan = self.plans.for_stream(stream)
        now = time.monotonic()
        if stream not in self._watched:
            allowances = {s.name: s.max_silence_ms / 1e3 for s in plan.sensors} if plan else {}
            windower = self._windowers.get(stream)
            for name in windower.sensors if windower else ():
                allowances.setdefault(name, 5.0)
            self.liveness.watch(stream, allowances, now)
            self._watched.add(stream)
        change = self.liveness.heard(stream, sensor, now)
        if change is not None:
            windower = self._windowers.get(stream)
            if windower is not None:
                windower.down.discard(sensor)
            await self._announce(change)

    async def check_liveness(self) -> None:
        """Announce sensors gone silent, close what no longer waits for them, forget idle streams."""
        now = time.monotonic()
        for change in self.liveness.check(now):
            self.counts["sensors_down"] += 1
            windower = self._windowers.get(change.stream)
            if windower is not None:
                windower.down.add(change.sensor)
            await self._announce(change)
            plan = self.plans.for_stream(change.stream)
            if windower is not None and plan is not None:
                for cut in windower.ready():  # windows no longer waiting for the silent sensor
                    await self._on_window(cut, None, plan)
        for stream in self.liveness.idle(now):
            self.counts["streams_forgotten"] += 1
            self._watched.discard(stream)
            windower = self._windowers.pop(stream, None)
            plan = self.plans.for_stream(stream)
            if windower is not None and plan is not None:
                for cut in windower.flush():
                    await self._on_window(cut, None, plan)
            log.info("stream.forgotten", stream=stream)

    async def _announce(self, change: Change) -> None:
        wall_now = time.time_ns()
        last_seen_ns = wall_now - int((time.monotonic() - change.last_heard) * 1e9)
        await self.producer.sensor_status(
            SensorStatus(
                stream=change.stream,
                sensor=change.sensor,
                state=change.state,
                last_seen_ns=last_seen_ns,
                silent_ms=round(change.silent_s * 1e3, 1),
            )
        )
        level = log.warning if change.state == "down" else log.info
        level(
            f"sensor.{change.state}",
            stream=change.stream,
            sensor=change.sensor,
            silent_ms=round(change.silent_s * 1e3),
        )
