"""Sensor intake: frames and per-sensor chunks in, windows out, sensor liveness on the side.

Owns each stream's :class:`~coordinator.windows.StreamWindower` and the
:class:`~coordinator.liveness.SensorLiveness` of its sensors; hands every window it cuts to
the coordinator, and announces sensors that go silent or come back.

It also knows when a delivery is *consumed*: a chunk once every window its samples fall in
has been cut (until then it waits, unacked, in the intake stream), a late or repeated chunk
at once. Consumed deliveries go to ``on_consumed``; the coordinator acks them once what they
opened is durable. Per stream it keeps a *cursor*, the start of the first window not yet
cut, which the journal stores so that a restarted coordinator never cuts a window twice.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import assert_never

import structlog

from bus import Delivery, Producer, Subjects
from coordinator.admission import check_chunk, check_frame
from coordinator.directory import KnownType
from coordinator.liveness import Change, SensorLiveness
from coordinator.plan import Plan, PlanBook
from coordinator.windows import CutWindow, StreamWindower, shape_from_plan
from schemas import SchemaError, SensorChunk, SensorFrame, SensorStatus, Window

log = structlog.get_logger("fusebus.coordinator")

LATE_WARNING_EVERY_S = 10.0  # per stream: dropped late chunks are told at most this often

OnWindow = Callable[[CutWindow, Delivery | None, Plan], Awaitable[None]]
OnConsumed = Callable[[list[Delivery]], None]


class SensorIntake:
    """Turns a deployment's frames and chunks into windows.

    Args:
        plans: the plan of each stream.
        subjects: subject names.
        producer: publishes sensor status events.
        on_window: called with every window (and the frame's delivery, to answer it).
        on_consumed: called with deliveries whose data no window still to cut needs.
        forget_after_s: a stream silent this long is forgotten (its last windows closed).
        readers: the running agent types, whose cards say what shape of data they read.
    """

    def __init__(
        self,
        *,
        plans: PlanBook,
        subjects: Subjects,
        producer: Producer,
        on_window: OnWindow,
        on_consumed: OnConsumed,
        forget_after_s: float,
        readers: Mapping[str, KnownType] | None = None,
    ) -> None:
        self.plans = plans
        self.subjects = subjects
        self.producer = producer
        self._on_window = on_window
        self._on_consumed = on_consumed
        self.liveness = SensorLiveness(forget_after_s=forget_after_s)
        self.readers: Mapping[str, KnownType] = readers if readers is not None else {}
        self._forget_after_s = forget_after_s
        self._windowers: dict[str, StreamWindower] = {}
        # Per frame stream: its last frame's window and when it came (monotonic).
        self._frame_streams: dict[str, tuple[Window, float]] = {}
        self._watched: set[str] = set()
        # Per stream, chunk deliveries still needed, by the end of their data.
        self._waiting: dict[str, list[tuple[int, int, Delivery]]] = {}
        self._order = itertools.count()
        self._resume_at: dict[str, int] = {}  # cursors from the journal, for new windowers
        self._cursors_changed: set[str] = set()
        self._forgotten: set[str] = set()
        self._late_warned: dict[str, float] = {}  # stream -> when its late chunks were last told
        self.counts: dict[str, int] = dict.fromkeys(
            ("frames", "chunks", "sensors_down", "streams_forgotten"), 0
        )

    def __repr__(self) -> str:
        return f"SensorIntake(streams={len(self._windowers)} {self.counts})"

    def stats(self) -> dict[str, int]:
        """Counters, with the live stream count and the late chunks of live streams."""
        return {
            **self.counts,
            "streams": len(self._windowers.keys() | self._frame_streams.keys()),
            "late_chunks": sum(w.counts["late_chunks"] for w in self._windowers.values()),
            "chunks_waiting": sum(len(q) for q in self._waiting.values()),
        }

    def buffered_samples(self) -> dict[str, int]:
        """Samples held per stream (to check memory stays bounded)."""
        return {stream: w.buffered_samples for stream, w in self._windowers.items()}

    # Cursors ----------------------------------------------------------------------------
    def resume(self, cursors: dict[str, int]) -> None:
        """Windows before ``cursors[stream]`` were cut by a previous run: never cut them again."""
        self._resume_at.update(cursors)
        for stream, start in cursors.items():
            windower = self._windowers.get(stream)
            if windower is not None:
                windower.resume(start)

    def take_cursors(self) -> tuple[dict[str, int], tuple[str, ...]]:
        """The cursors that moved since the last call, and the streams forgotten since."""
        moved = {}
        for stream in self._cursors_changed:
            windower = self._windowers.get(stream)
            if windower is not None and windower.next_start_ns is not None:
                moved[stream] = windower.next_start_ns
        forgotten = tuple(sorted(self._forgotten))
        self._cursors_changed, self._forgotten = set(), set()
        return moved, forgotten

    def give_back_cursors(self, moved: dict[str, int], forgotten: tuple[str, ...]) -> None:
        """Cursors taken for a journal write that failed: take them again next time."""
        self._cursors_changed.update(moved)
        self._forgotten.update(forgotten)

    def hand_over(self, streams: set[str]) -> None:
        """Forget ``streams`` without flushing or consuming anything: another coordinator
        took their partition over, and what was not acked here is delivered to it again."""
        for stream in streams:
            self._windowers.pop(stream, None)
            self._frame_streams.pop(stream, None)
            self._waiting.pop(stream, None)
            self._resume_at.pop(stream, None)
            self._cursors_changed.discard(stream)
            self._forgotten.discard(stream)
            self._watched.discard(stream)
            self.liveness.forget(stream)

    # Deliveries -------------------------------------------------------------------------
    async def take(self, message: SensorChunk | SensorFrame, delivery: Delivery) -> None:
        """Take one decoded frame or chunk.

        Raises:
            SchemaError: it cannot be used (no plan, wrong subject, undeclared sensor...).
        """
        match message:
            case SensorFrame():
                await self._take_frame(message, delivery)
            case SensorChunk():
                await self._take_chunk(message, delivery)
            case _:
                assert_never(message)

    async def keep_alive(self, older_than_s: float) -> int:
        """Tell the server that chunks waiting longer than ``older_than_s`` for their window
        are still being worked on (so it does not redeliver them); returns how many."""
        cutoff = time.monotonic() - older_than_s
        told = 0
        for queue in self._waiting.values():
            for _, _, delivery in queue:
                if delivery.received < cutoff:
                    await delivery.in_progress()
                    delivery.received = time.monotonic()
                    told += 1
        return told

    async def _take_frame(self, frame: SensorFrame, delivery: Delivery) -> None:
        """Take a pre-aligned frame as one window, once it is checked.

        Raises:
            SchemaError: see :func:`~coordinator.admission.check_frame`; or the frame's window
                overlaps the stream's previous frame without being the same window.
        """
        self.counts["frames"] += 1
        plan = self._plan_for(frame.stream, self.subjects.as_published(delivery.subject))
        absent = check_frame(frame, plan, self.readers, time.time_ns())
        samples = next(iter(frame.sensors.values())).shape[0]
        window = Window(frame.t_ns, frame.t_ns + samples * frame.period_ns)
        previous = self._frame_streams.get(frame.stream)
        if previous is not None and _overlap(previous[0], window):
            raise SchemaError(
                "overlapping_window",
                f"frame window [{window.t_start_ns}, {window.t_end_ns}) of stream "
                f"{frame.stream!r} overlaps the previous one [{previous[0].t_start_ns}, "
                f"{previous[0].t_end_ns}): is t_ns in nanoseconds?",
            )
        self._frame_streams[frame.stream] = (window, time.monotonic())
        cut = CutWindow(frame.stream, window, frame.sensors, absent)
        await self._on_window(cut, delivery, plan)

    async def _take_chunk(self, chunk: SensorChunk, delivery: Delivery) -> None:
        """Buffer a chunk and pass on every window it completes."""
        self.counts["chunks"] += 1
        # Stored under its partition with partitions > 1: check it as the producer sent it.
        subject = self.subjects.as_published(delivery.subject)
        plan = self._plan_for(chunk.stream, subject)
        if subject != self.subjects.sensor(chunk.stream, chunk.sensor):
            raise SchemaError("stream_mismatch", f"chunk of {chunk.sensor!r} on {subject}")
        check_chunk(chunk, plan, self.readers, time.time_ns())
        windower = self._windower(chunk.stream, plan)
        late_before = windower.counts["late_chunks"]
        if windower.add(chunk):
            end = chunk.t0_ns + chunk.samples.shape[0] * chunk.period_ns
            queue = self._waiting.setdefault(chunk.stream, [])
            heapq.heappush(queue, (end, next(self._order), delivery))
        else:
            if windower.counts["late_chunks"] > late_before:
                self._warn_late(windower, chunk)
            log.debug("chunk.dropped", stream=chunk.stream, sensor=chunk.sensor, t0_ns=chunk.t0_ns)
            self._on_consumed([delivery])  # late or a repeat: nothing will need it
        await self.heard(chunk.stream, chunk.sensor)
        await self._cut(windower, windower.ready(), plan)

    def _warn_late(self, windower: StreamWindower, chunk: SensorChunk) -> None:
        """Say, at most every ``LATE_WARNING_EVERY_S`` per stream, that a stream's chunks
        are dropped as late: silently losing a whole replay (sent again onto a stream id whose
        windows are already closed) is the mistake this catches."""
        now = time.monotonic()
        if now - self._late_warned.get(chunk.stream, -LATE_WARNING_EVERY_S) < LATE_WARNING_EVERY_S:
            return
        self._late_warned[chunk.stream] = now
        end = chunk.t0_ns + chunk.samples.shape[0] * chunk.period_ns
        log.warning(
            "chunk.late",
            stream=chunk.stream,
            sensor=chunk.sensor,
            behind_s=round(((windower.next_start_ns or end) - end) / 1e9, 3),
            late_chunks=windower.counts["late_chunks"],
            hint="its windows are already closed; data sent again for a stream id "
            "(a second replay) must start after where the stream has reached",
        )

    async def _cut(self, windower: StreamWindower, cuts: list[CutWindow], plan: Plan) -> None:
        """Pass on the windows just cut, then release the chunks no window needs any more."""
        for cut in cuts:
            await self._on_window(cut, None, plan)
        if cuts:
            self._cursors_changed.add(windower.stream)
        self._release(windower.stream, windower.needed_from_ns)

    def _release(self, stream: str, needed_from_ns: int | None) -> None:
        queue = self._waiting.get(stream)
        if not queue or needed_from_ns is None:
            return
        done = []
        while queue and queue[0][0] < needed_from_ns:
            done.append(heapq.heappop(queue)[2])
        if not queue:
            del self._waiting[stream]
        if done:
            self._on_consumed(done)

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
                    "no_window",
                    f"the plan of {stream!r} has no [window], so it takes frames only: per-sensor "
                    "chunks need size_ms, hop_ms and rate_hz in a [default.window] or "
                    "[streams.<stream>.window] table of the plans file (an auto plan too)",
                )
            w = plan.window
            sensors = tuple(s.name for s in plan.sensors) or tuple(
                dict.fromkeys(name for spec in plan.subtasks for name in spec.sensors)
            )
            shape = shape_from_plan(w.size_ms, w.hop_ms, w.lateness_ms, w.rate_hz, w.max_gap_ms)
            windower = self._windowers[stream] = StreamWindower(stream, shape, sensors)
            if stream in self._resume_at:
                windower.resume(self._resume_at.pop(stream))
        return windower

    # Liveness ---------------------------------------------------------------------------
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
        idle_frames = [
            stream
            for stream, (_, heard) in self._frame_streams.items()
            if now - heard > self._forget_after_s
        ]
        for stream in idle_frames:
            del self._frame_streams[stream]
        for change in self.liveness.check(now):
            self.counts["sensors_down"] += 1
            windower = self._windowers.get(change.stream)
            if windower is not None:
                windower.down.add(change.sensor)
            await self._announce(change)
            plan = self.plans.for_stream(change.stream)
            if windower is not None and plan is not None:
                # Windows no longer waiting for the silent sensor.
                await self._cut(windower, windower.ready(), plan)
        for stream in self.liveness.idle(now):
            self.counts["streams_forgotten"] += 1
            self._watched.discard(stream)
            windower = self._windowers.pop(stream, None)
            plan = self.plans.for_stream(stream)
            if windower is not None and plan is not None:
                for cut in windower.flush():
                    await self._on_window(cut, None, plan)
            rest = self._waiting.pop(stream, [])
            if rest:
                self._on_consumed([delivery for _, _, delivery in rest])
            self._cursors_changed.discard(stream)
            self._forgotten.add(stream)
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


def _overlap(a: Window, b: Window) -> bool:
    """Two windows share time and are not the same window (that is a repeat, not an overlap)."""
    same = a.t_start_ns == b.t_start_ns
    return not same and a.t_start_ns < b.t_end_ns and b.t_start_ns < a.t_end_ns
