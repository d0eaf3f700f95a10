"""Which sensors have gone silent: pure bookkeeping of when each was last heard."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Change:
    """A sensor went ``down`` (silent too long) or came back ``up``."""

    stream: str
    sensor: str
    state: str
    last_heard: float  # the clock of ``heard``/``check`` (monotonic seconds in the service)
    silent_s: float


class SensorLiveness:
    """Tracks the last time each sensor of each stream was heard.

    A sensor is ``down`` once silent for longer than its allowance, and ``up`` again at its
    next chunk. A stream none of whose sensors was heard for ``forget_after_s`` is idle and
    forgotten.
    """

    def __init__(self, *, forget_after_s: float = 300.0) -> None:
        self.forget_after_s = forget_after_s
        self._last: dict[str, dict[str, float]] = {}
        self._allowance: dict[str, dict[str, float]] = {}
        self._down: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._last)

    def watch(self, stream: str, allowances_s: dict[str, float], now: float) -> None:
        """Start watching a stream's sensors (each with its allowed silence) from ``now``."""
        if stream not in self._last:
            self._last[stream] = dict.fromkeys(allowances_s, now)
            self._allowance[stream] = dict(allowances_s)
            self._down[stream] = set()

    def heard(self, stream: str, sensor: str, now: float) -> Change | None:
        """A chunk arrived; returns an ``up`` change if the sensor was down."""
        last = self._last.get(stream)
        if last is None or sensor not in last:
            return None
        silent = now - last[sensor]
        last[sensor] = now
        if sensor in self._down[stream]:
            self._down[stream].discard(sensor)
            return Change(stream, sensor, "up", now, silent)
        return None

    def is_down(self, stream: str, sensor: str) -> bool:
        """Whether the sensor is currently down."""
        return sensor in self._down.get(stream, ())

    def check(self, now: float) -> list[Change]:
        """Sensors that have just gone silent for longer than allowed."""
        changes = []
        for stream, last in self._last.items():
            for sensor, heard_at in last.items():
                silent = now - heard_at
                if silent > self._allowance[stream][sensor] and sensor not in self._down[stream]:
                    self._down[stream].add(sensor)
                    changes.append(Change(stream, sensor, "down", heard_at, silent))
        return changes

    def idle(self, now: float) -> list[str]:
        """Streams nothing was heard from for ``forget_after_s``; they are forgotten."""
        gone = [
            s for s, last in self._last.items() if now - max(last.values()) > self.forget_after_s
        ]
        for stream in gone:
            del self._last[stream], self._allowance[stream], self._down[stream]
        return gone

    def forget(self, stream: str) -> None:
        """Stop watching ``stream`` (another coordinator now reads it)."""
        for table in (self._last, self._allowance, self._down):
            table.pop(stream, None)
