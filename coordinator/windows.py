"""Event-time windows from per-sensor chunks: pure, no asyncio, no bus.

Each stream has a :class:`StreamWindower`. Sensors publish chunks of samples at their own
rate, in any order, with jitter and gaps. Windows are aligned to the epoch (window ``k``
covers ``[k * hop, k * hop + size)``), so the same recording always gives the same windows.

A window closes when every live sensor's watermark (the end of its data received without a
hole) has passed the window's end, or when the stream's newest data is ``lateness`` past it. Its data is
each sensor resampled by timestamp onto the window's sample grid (``rate_hz``); a sensor
whose samples leave a gap wider than ``max_gap_ms`` in the window is missing from it.
Chunks that only touch closed windows are late: counted and dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from schemas import SchemaError, SensorChunk, Window


@dataclass(frozen=True)
class WindowShape:
    """Sizes of a stream's windows, in nanoseconds, and their sample grid."""

    size_ns: int
    hop_ns: int
    lateness_ns: int
    rate_hz: float
    max_gap_ns: int
    max_buffered_s: float = 120.0  # per sensor; older samples are dropped beyond it
    # Data further than this past a stream's newest is refused: a clock gone wrong would
    # otherwise make the stream cut every window in between.
    max_jump_ns: int = 3600 * 10**9

    @property
    def samples(self) -> int:
        """Samples per sensor in one window."""
        return round(self.size_ns * self.rate_hz / 1e9)

    def grid(self) -> np.ndarray:
        """The sample times of a window, in nanoseconds from its start."""
        return np.arange(self.samples, dtype=np.float64) * (1e9 / self.rate_hz)


@dataclass(frozen=True)
class CutWindow:
    """A closed window: its interval, the data of each sensor present, and who is missing."""

    stream: str
    window: Window
    sensors: dict[str, np.ndarray]  # name -> [samples, channels] float32
    missing: tuple[str, ...]  # declared sensors with no usable data in this window


@dataclass
class _SensorBuffer:
    chunks: dict[int, tuple[int, np.ndarray]] = field(
        default_factory=dict
    )  # t0 -> (period, samples)
    watermark_ns: int = 0  # end of the latest data seen
    channels: int = 0

    def end_of(self, t0: int) -> int:
        period, samples = self.chunks[t0]
        return t0 + len(samples) * period

    def contiguous_until(self, tolerance_ns: int) -> int:
        """The end of the data that arrived without a hole, from the oldest chunk held: a
        chunk missing in the middle (lost, or still on its way) stops it."""
        cursor: int | None = None
        for t0 in sorted(self.chunks):
            if cursor is not None and t0 > cursor + tolerance_ns:
                break
            end = self.end_of(t0)
            cursor = end if cursor is None else max(cursor, end)
        return cursor if cursor is not None else 0


class StreamWindower:
    """Buffers one stream's sensors and cuts its windows.

    Args:
        stream: the stream id.
        shape: window sizes and grid.
        sensors: every declared sensor name (the window data is cut for these).
    """

    def __init__(self, stream: str, shape: WindowShape, sensors: tuple[str, ...]) -> None:
        self.stream = stream
        self.shape = shape
        self.sensors = sensors
        self._buffers: dict[str, _SensorBuffer] = {name: _SensorBuffer() for name in sensors}
        self._next_start: int | None = None  # start of the earliest window not yet closed
        self.down: set[str] = set()  # sensors not to wait for (silent too long)
        self.counts: dict[str, int] = dict.fromkeys(
            (
                "chunks",
                "samples",
                "late_chunks",
                "late_samples",
                "duplicate_chunks",
                "windows",
                "dropped_samples",
            ),
            0,
        )

    def __repr__(self) -> str:
        return f"StreamWindower({self.stream}, next={self._next_start}, {self.counts})"

    @property
    def next_start_ns(self) -> int | None:
        """The start of the first window not yet closed (``None`` before any data)."""
        return self._next_start

    @property
    def needed_from_ns(self) -> int | None:
        """Data ending before this time is in no window still to close (``None``: all data
        may still be needed)."""
        return None if self._next_start is None else self._next_start - self.shape.max_gap_ns

    def resume(self, next_start_ns: int) -> None:
        """Carry on after a restart: windows before ``next_start_ns`` were already closed, so
        data given again for them is late, not the start of new windows."""
        if self._next_start is None or next_start_ns > self._next_start:
            self._next_start = next_start_ns

    @property
    def buffered_samples(self) -> int:
        """Samples held, over all sensors."""
        return sum(len(s) for b in self._buffers.values() for _, s in b.chunks.values())

    def add(self, chunk: SensorChunk) -> bool:
        """Buffer a chunk; returns False when it was late (every sample in a closed window)
        or a repeat. Raises :class:`SchemaError` for an undeclared sensor or a bad shape."""
        buffer = self._buffers.get(chunk.sensor)
        if buffer is None:
            raise SchemaError(
                "unknown_sensor", f"stream {self.stream!r} declares no sensor {chunk.sensor!r}"
            )
        samples = chunk.samples
        if samples.ndim != 2 or samples.shape[0] == 0 or chunk.period_ns <= 0:
            raise SchemaError(
                "bad_chunk",
                f"chunk needs [samples, channels] and period_ns > 0, got {samples.shape}",
            )
        if buffer.channels and samples.shape[1] != buffer.channels:
            raise SchemaError(
                "bad_chunk",
                f"sensor {chunk.sensor!r} sent {samples.shape[1]} channels, before {buffer.channels}",
            )
        newest = self.watermark_ns()
        span_ns = samples.shape[0] * chunk.period_ns
        if span_ns > self.shape.max_jump_ns:
            raise SchemaError(
                "time_jump", f"chunk of {chunk.sensor!r} spans {span_ns / 1e9:.0f} s of event time"
            )
        if newest and chunk.t0_ns > newest + self.shape.max_jump_ns:
            raise SchemaError(
                "time_jump",
                f"chunk of {chunk.sensor!r} starts {(chunk.t0_ns - newest) / 1e9:.0f} s after the "
                f"stream's newest data; at most {self.shape.max_jump_ns / 1e9:.0f} s is taken",
            )
        self.counts["chunks"] += 1
        end = chunk.t0_ns + samples.shape[0] * chunk.period_ns
        if self._next_start is None:
            self._next_start = self._first_window_start(chunk.t0_ns)
        if end <= self._next_start:
            self.counts["late_chunks"] += 1
            self.counts["late_samples"] += samples.shape[0]
            return False
        if chunk.t0_ns in buffer.chunks:
            self.counts["duplicate_chunks"] += 1
            return False
        buffer.channels = samples.shape[1]
        buffer.chunks[chunk.t0_ns] = (chunk.period_ns, np.asarray(samples, dtype=np.float32))
        buffer.watermark_ns = max(buffer.watermark_ns, end)
        self.counts["samples"] += samples.shape[0]
        self._bound(buffer)
        return True

    def _first_window_start(self, t_ns: int) -> int:
        # The first window that can contain t_ns: the earliest hop-aligned start within size.
        last_start = (t_ns // self.shape.hop_ns) * self.shape.hop_ns
        return last_start - ((self.shape.size_ns - 1) // self.shape.hop_ns) * self.shape.hop_ns

    def _bound(self, buffer: _SensorBuffer) -> None:
        limit = int(self.shape.max_buffered_s * self.shape.rate_hz) + self.shape.samples
        while sum(len(s) for _, s in buffer.chunks.values()) > limit:
            oldest = min(buffer.chunks)
            self.counts["dropped_samples"] += len(buffer.chunks.pop(oldest)[1])

    def watermark_ns(self) -> int:
        """The newest data of any sensor."""
        return max((b.watermark_ns for b in self._buffers.values()), default=0)

    def ready(self) -> list[CutWindow]:
        """Close every window that can close now, oldest first."""
        if self._next_start is None:
            return []
        cut = []
        newest = self.watermark_ns()
        tolerance = self.shape.max_gap_ns
        # Every declared sensor not known to be down is waited for, including one that has
        # sent nothing yet: until the lateness runs out or it is declared down.
        waited = [
            b.contiguous_until(tolerance)
            for name, b in self._buffers.items()
            if name not in self.down
        ]
        while True:
            start = self._next_start
            end = start + self.shape.size_ns
            all_in = bool(waited) and min(waited) >= end
            if not all_in and newest < end + self.shape.lateness_ns:
                break
            cut.append(self._cut(start, end))
            self._next_start = start + self.shape.hop_ns
            self._trim()
        return cut

    def flush(self) -> list[CutWindow]:
        """Close every window that has any data (the stream is going away)."""
        cut = []
        newest = self.watermark_ns()
        while self._next_start is not None and self._next_start < newest:
            start = self._next_start
            cut.append(self._cut(start, start + self.shape.size_ns))
            self._next_start = start + self.shape.hop_ns
            self._trim()
        return cut

    def _cut(self, start: int, end: int) -> CutWindow:
        self.counts["windows"] += 1
        grid = self.shape.grid()
        data, missing = {}, []
        for name in self.sensors:
            values = self._resample(self._buffers[name], grid, start, end)
            if values is None:
                missing.append(name)
            else:
                data[name] = values
        return CutWindow(self.stream, Window(start, end), data, tuple(missing))

    def _resample(
        self, buffer: _SensorBuffer, grid: np.ndarray, start: int, end: int
    ) -> np.ndarray | None:
        """Linear interpolation of the sensor's samples at the grid times, or None when its
        data leaves a gap wider than the tolerance inside the window.

        Times are taken relative to the window start before becoming floats: nanoseconds
        since the epoch do not fit a float64 exactly.
        """
        gap = self.shape.max_gap_ns
        size = end - start
        times, values, last_end = [], [], start
        for t0 in sorted(buffer.chunks):
            period, samples = buffer.chunks[t0]
            chunk_end = t0 + len(samples) * period
            if chunk_end < start - gap or t0 > end + gap:
                continue
            times.append(
                ((t0 - start) + np.arange(len(samples), dtype=np.int64) * period).astype(np.float64)
            )
            values.append(samples)
            last_end = max(last_end, chunk_end)
        if not times:
            return None
        t = np.concatenate(times)
        v = np.concatenate(values)
        order = np.argsort(t, kind="stable")
        t, v = t[order], v[order]
        # Gaps before the first sample, between two samples, and after the data's end.
        if (
            t[0] > gap
            or size - (last_end - start) > gap
            or (len(t) > 1 and float(np.max(np.diff(t))) > gap)
        ):
            return None
        out = np.empty((len(grid), v.shape[1]), dtype=np.float32)
        for channel in range(v.shape[1]):
            out[:, channel] = np.interp(grid, t, v[:, channel])
        return out

    def _trim(self) -> None:
        """Drop chunks that end before the next window (and its gap margin) starts."""
        if self._next_start is None:
            return
        keep_from = self._next_start - self.shape.max_gap_ns
        for buffer in self._buffers.values():
            for t0 in [t0 for t0 in buffer.chunks if buffer.end_of(t0) < keep_from]:
                del buffer.chunks[t0]


def shape_from_plan(
    size_ms: float, hop_ms: float, lateness_ms: float, rate_hz: float, max_gap_ms: float
) -> WindowShape:
    """A :class:`WindowShape` from a plan's millisecond settings."""
    if not rate_hz > 0:
        raise SchemaError("bad_plan", f"window rate_hz must be > 0, got {rate_hz}")
    return WindowShape(
        size_ns=round(size_ms * 1e6),
        hop_ns=round(hop_ms * 1e6),
        lateness_ns=round(lateness_ms * 1e6),
        rate_hz=rate_hz,
        max_gap_ns=round(max_gap_ms * 1e6) if max_gap_ms > 0 else math.ceil(3e9 / rate_hz),
    )
