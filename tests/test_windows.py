"""Event-time windowing and sensor liveness, as pure code."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.liveness import SensorLiveness
from coordinator.windows import CutWindow, StreamWindower, shape_from_plan
from fusebus.datasets import SensorDataset
from fusebus.replay import Imperfections, chunk_schedule
from schemas import SchemaError, SensorChunk

START = 1_800_000_000 * 10**9  # on the 10 s grid
SEED = 20261122


def windower() -> StreamWindower:
    return StreamWindower("s", shape_from_plan(10_000, 10_000, 2_000, 10, 0), ("accel", "gyro"))


def feed(w: StreamWindower, chunks: list[SensorChunk]) -> list[CutWindow]:
    cut = []
    for chunk in chunks:
        w.add(chunk)
        cut += w.ready()
    return cut


def schedule(dataset: SensorDataset, **imperfect: object) -> list[SensorChunk]:
    items, _ = chunk_schedule(
        dataset,
        streams=["s"],
        speed=1.0,
        chunk_ms=1000,
        start_ns=START,
        limit=6,
        imperfections=Imperfections(seed=SEED, **imperfect),  # type: ignore[arg-type]
    )
    return [item.chunk for item in items]


def test_in_order_chunks_give_the_recorded_cases_exactly(basicmotions: SensorDataset) -> None:
    """Windows aligned on the 10 s grid hold each case's samples unchanged."""
    cut = feed(windower(), schedule(basicmotions))
    assert [c.window.t_start_ns - START for c in cut] == [i * 10**10 for i in range(6)]
    for i, window in enumerate(cut):
        assert window.missing == ()
        np.testing.assert_array_equal(
            window.sensors["gyro"], basicmotions.sensor_view(basicmotions.x_test[i], "gyro")
        )


def test_shuffled_within_lateness_gives_the_same_windows(basicmotions: SensorDataset) -> None:
    """Chunks reordered in pairs and interleaved arrive out of order, yet cut the same windows."""
    print(f"seed {SEED}")
    ordered = feed(windower(), schedule(basicmotions))
    shuffled_chunks = schedule(basicmotions, reorder=2)
    assert [c.t0_ns for c in shuffled_chunks] != sorted(c.t0_ns for c in shuffled_chunks)
    shuffled = feed(windower(), shuffled_chunks)
    assert [c.window for c in shuffled] == [c.window for c in ordered]
    for a, b in zip(ordered, shuffled, strict=True):
        assert a.missing == b.missing == ()
        for sensor in ("accel", "gyro"):
            np.testing.assert_array_equal(a.sensors[sensor], b.sensors[sensor])


def test_late_chunks_are_counted_and_change_no_closed_window(basicmotions: SensorDataset) -> None:
    """A chunk for a closed window is refused and counted; what was cut stays as it was."""
    w = windower()
    cut = feed(w, schedule(basicmotions))
    before = cut[0].sensors["accel"].copy()
    late = SensorChunk(
        stream="s",
        sensor="accel",
        t0_ns=START,
        period_ns=10**8,
        samples=np.full((10, 3), 99, np.float32),
    )
    assert w.add(late) is False
    assert w.counts["late_chunks"] == 1 and w.counts["late_samples"] == 10
    assert w.ready() == []
    np.testing.assert_array_equal(cut[0].sensors["accel"], before)


def test_a_sensor_at_half_rate_is_resampled_onto_the_window_grid(
    basicmotions: SensorDataset,
) -> None:
    """A gyroscope sending every other sample (5 Hz) is interpolated to the 10 Hz grid."""
    w = windower()
    chunks = []
    for chunk in schedule(basicmotions):
        if chunk.sensor == "gyro":
            chunk = SensorChunk(
                stream="s",
                sensor="gyro",
                t0_ns=chunk.t0_ns,
                period_ns=2 * 10**8,
                samples=chunk.samples[::2],
            )
        chunks.append(chunk)
    cut = feed(w, chunks)
    assert len(cut) == 6
    for i, window in enumerate(cut):
        original = basicmotions.sensor_view(basicmotions.x_test[i], "gyro")
        assert window.sensors["gyro"].shape == (100, 3) and window.missing == ()
        np.testing.assert_allclose(window.sensors["gyro"][:-1:2], original[:-1:2], atol=1e-6)


def test_a_gap_wider_than_the_tolerance_makes_the_sensor_missing(
    basicmotions: SensorDataset,
) -> None:
    """Lost chunks leave a hole; the window closes at the lateness without that sensor."""
    chunks = [
        c
        for c in schedule(basicmotions)
        if not (c.sensor == "gyro" and 12 * 10**9 <= c.t0_ns - START < 15 * 10**9)
    ]
    cut = feed(windower(), chunks)
    assert [c.missing for c in cut] == [(), ("gyro",), (), (), (), ()]
    assert "gyro" not in cut[1].sensors and cut[1].sensors["accel"].shape == (100, 3)


def test_repeats_undeclared_sensors_and_bad_shapes(basicmotions: SensorDataset) -> None:
    """A chunk sent twice counts once; unknown sensors and malformed chunks are errors."""
    w = windower()
    chunk = schedule(basicmotions)[0]
    assert w.add(chunk) and not w.add(chunk)
    assert w.counts["duplicate_chunks"] == 1
    with pytest.raises(SchemaError, match="no sensor 'baro'"):
        w.add(
            SensorChunk(
                stream="s",
                sensor="baro",
                t0_ns=START,
                period_ns=1,
                samples=np.zeros((1, 1), np.float32),
            )
        )
    with pytest.raises(SchemaError, match="the period > 0"):  # refused as it is decoded
        SensorChunk(
            stream="s",
            sensor="accel",
            t0_ns=START,
            period_ns=0,
            samples=np.zeros((1, 3), np.float32),
        )
    with pytest.raises(SchemaError, match="bad_chunk"):
        w.add(
            SensorChunk(
                stream="s",
                sensor="accel",
                t0_ns=START,
                period_ns=1,
                samples=np.zeros((1, 2), np.float32),  # 2 channels after 3
            )
        )


def test_buffers_stay_bounded_when_windows_cannot_close(basicmotions: SensorDataset) -> None:
    """A sensor racing ahead of a silent required one cannot grow the buffer without bound."""
    shape = shape_from_plan(10_000, 10_000, 10**9, 10, 0)  # lateness so long nothing closes
    w = StreamWindower("s", shape, ("accel", "gyro"))
    for i in range(2000):
        w.add(
            SensorChunk(
                stream="s",
                sensor="accel",
                t0_ns=START + i * 10**9,
                period_ns=10**8,
                samples=np.ones((10, 3), np.float32),
            )
        )
    limit = int(shape.max_buffered_s * shape.rate_hz) + shape.samples
    assert w.buffered_samples <= limit and w.counts["dropped_samples"] > 0


def test_liveness_reports_down_once_and_up_on_return() -> None:
    """Silent past its allowance a sensor goes down once; its next chunk brings it up; idle
    streams are forgotten."""
    live = SensorLiveness(forget_after_s=10.0)
    live.watch("s", {"accel": 1.0, "gyro": 1.0}, now=0.0)
    live.heard("s", "accel", 0.5)
    assert [(c.sensor, c.state) for c in live.check(1.2)] == [("gyro", "down")]
    assert live.is_down("s", "gyro") and not live.is_down("s", "accel")
    assert all(c.sensor != "gyro" for c in live.check(1.3))
    back = live.heard("s", "gyro", 2.0)
    assert back is not None and back.state == "up" and back.silent_s == pytest.approx(2.0)
    assert live.idle(5.0) == [] and live.idle(20.0) == ["s"] and len(live) == 0


def test_a_chunk_far_past_the_newest_data_is_refused(basicmotions: SensorDataset) -> None:
    """A chunk an hour and more past the stream's newest data (a clock gone wrong) is refused
    instead of making the stream cut every window in between."""
    w = windower()
    first = schedule(basicmotions)[0]
    assert w.add(first)
    far = SensorChunk(
        stream="s",
        sensor=first.sensor,
        t0_ns=first.t0_ns + 2 * 3600 * 10**9,
        period_ns=first.period_ns,
        samples=first.samples,
    )
    with pytest.raises(SchemaError, match="time_jump"):
        w.add(far)
    assert w.ready() == [] and w.counts["chunks"] == 1
