"""A fixed-bucket histogram for latencies and sizes: cheap to observe, easy to export."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

#: Latency buckets in seconds, from 1 ms to 30 s.
LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class Histogram:
    """Counts of observations at or below each bucket's upper bound (plus ``+Inf``)."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS_S) -> None:
        self.bounds = tuple(sorted(buckets))
        self._counts = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def __repr__(self) -> str:
        return f"Histogram(count={self.count}, sum={self.sum:.3f})"

    def observe(self, value: float) -> None:
        """Record one value."""
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        """``(upper bound, observations at or below it)``, ending with ``+Inf``."""
        out, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self._counts, strict=True):
            running += count
            out.append((bound, running))
        return out
