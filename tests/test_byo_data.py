"""A user's own data: a ``.npz`` with its TOML spec, replayed and evaluated through the bus,
with one-line errors for files that cannot be used."""

from __future__ import annotations

import asyncio
import multiprocessing
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from nats.aio.client import Client

from bus import EmbeddedServer, Subjects
from fusebus.datasets import SensorDataset, load_dataset
from fusebus.evaluate import EvalSettings, build_agents, class_report, run_eval
from fusebus.replay import ReplayRequest, replay_start_ns, run_replay
from schemas import ConfigError, Decision
from tests.helpers import Collector, Pipeline, wait_for_agents, wait_for_role

ROOT = Path(__file__).resolve().parent.parent
StartPipeline = Callable[..., Awaitable[Pipeline]]
SPEC = "rate_hz = 20\n[sensors]\nimu = [0, 1, 2]\nmic = [3]\n"
LEVEL_AGENTS = ("tests.plugins:ImuLevelAgent", "tests.plugins:MicLevelAgent")


def level_dataset(folder: Path, *, cases: int = 24, flipped_mic: int = 6) -> Path:
    """``cases`` cases of 20 samples: ``high`` ones hover around +1, ``low`` ones around -1,
    on a three-channel ``imu`` and a one-channel ``mic``. The mic of the first
    ``flipped_mic`` cases has the opposite sign, so the mic alone gets exactly those wrong."""
    rng = np.random.default_rng(3)
    y = np.array(["high", "low"] * (cases // 2))
    sign = np.where(y == "high", 1.0, -1.0)
    x = sign[:, None, None] + rng.normal(0, 0.1, (cases, 20, 4))
    x[:flipped_mic, :, 3] *= -1
    path = folder / "levels.npz"
    np.savez(path, X=x, y=y)
    path.with_suffix(".toml").write_text(SPEC, encoding="utf-8")
    return path


def test_a_users_npz_loads_with_its_spec(tmp_path: Path) -> None:
    """String labels are indexed in sorted order; integer labels take the spec's names; a
    ``--spec`` elsewhere replaces the one beside the file; a train split is optional."""
    dataset = load_dataset(str(level_dataset(tmp_path)))
    assert dataset.name == "levels" and dataset.labels == ("high", "low")
    assert dataset.x_test.shape == (24, 20, 4) and dataset.x_test.dtype == np.float32
    assert dataset.sensors == {"imu": (0, 1, 2), "mic": (3,)}
    assert dataset.period_ns == 50_000_000 and dataset.case_ns == 10**9
    assert dataset.y_test[:4].tolist() == [0, 1, 0, 1]
    with pytest.raises(ConfigError, match="has no train split"):
        dataset.split("train")

    np.savez(
        tmp_path / "ints.npz",
        X=np.ones((3, 5, 1)),
        y=np.array([2, 0, 1]),
        X_train=np.ones((2, 5, 1)),
        y_train=np.array([0, 1]),
    )
    spec = tmp_path / "elsewhere.toml"
    spec.write_text('name = "ints"\nrate_hz = 5\nlabels = ["a", "b", "c"]\n[sensors]\nx = [0]\n')
    ints = load_dataset(str(tmp_path / "ints.npz"), spec=spec)
    assert ints.labels == ("a", "b", "c") and ints.y_test.tolist() == [2, 0, 1]
    assert ints.split("train")[0].shape == (2, 5, 1)


@pytest.mark.parametrize(
    ("arrays", "spec", "message"),
    [
        ({"y": np.zeros(2)}, SPEC, "has no 'X' array"),
        (
            {"X": np.ones((2, 20)), "y": np.zeros(2, int)},
            SPEC,
            r"must be \(cases, samples, channels\)",
        ),
        ({"X": np.ones((2, 20, 4)), "y": np.zeros(3, int)}, SPEC, "one label per case"),
        (
            {"X": np.full((2, 20, 4), np.nan), "y": np.array(["a", "b"])},
            SPEC,
            "160 NaN or infinite",
        ),
        (
            {"X": np.ones((2, 20, 3)), "y": np.array(["a", "b"])},
            SPEC,
            "names channel 3, but X has 3",
        ),
        ({"X": np.ones((2, 20, 4)), "y": np.array([0, 1])}, SPEC, "the spec needs labels"),
        ({"X": np.ones((2, 20, 4)), "y": np.array([0.5, 1])}, SPEC, "class indexes .integers."),
        (
            {"X": np.ones((2, 20, 4)), "y": np.array(["a", "b"])},
            "rate_hz = 0\n[sensors]\na=[0]\n",
            "rate_hz must be > 0",
        ),
        (
            {"X": np.ones((2, 20, 4)), "y": np.array(["a", "b"])},
            "rate_hz = 3e9\n[sensors]\na=[0]\n",
            "at most 1e.06",
        ),
        (
            {"X": np.full((2, 20, 4), 1e300), "y": np.array(["a", "b"])},
            SPEC,
            "160 NaN or infinite values .as float32.",
        ),
        (
            {"X": np.ones((2, 20, 4)), "y": np.array(["a", "b"])},
            "rate_hz = 5\n",
            r"a \[sensors\] table",
        ),
        (
            {"X": np.ones((2, 20, 4)), "y": np.array(["a", "b"])},
            "rate_hz = 5\n[sensors]\na=[0]\nb=[0]\n",
            "channel 0 belongs to both",
        ),
        (
            {"X": np.ones((2, 20, 4)), "y": np.array(["a", "b"])},
            "rate_hz = 5\n[sensors]\n'a.b'=[0]\n",
            "sensor",
        ),
        (
            {"X": np.ones((2, 20, 4)), "y": np.array(["a", "b"])},
            "rate_hz = 5\nrate = 3\n[sensors]\na=[0]\n",
            "unknown key.s. rate",
        ),
        ({"X": np.ones((2, 20, 4)), "y": np.array(["a", "b"])}, "rate_hz = [", "levels.toml"),
    ],
)
def test_a_dataset_that_cannot_be_used_is_one_clear_error(
    tmp_path: Path, arrays: dict[str, np.ndarray], spec: str, message: str
) -> None:
    """Each mistake in the arrays or the spec is a ConfigError naming it."""
    np.savez(tmp_path / "levels.npz", **arrays)  # type: ignore[arg-type]
    (tmp_path / "levels.toml").write_text(spec, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_dataset(str(tmp_path / "levels.npz"))


def test_a_missing_spec_or_pickled_arrays_are_refused(tmp_path: Path) -> None:
    """Without a spec the error says where to write one; object arrays (which would need
    pickle, and so could run code) are refused."""
    np.savez(tmp_path / "bare.npz", X=np.ones((2, 3, 1)), y=np.array(["a", "b"]))
    with pytest.raises(ConfigError, match=r"needs a spec: write .*bare\.toml"):
        load_dataset(str(tmp_path / "bare.npz"))
    np.savez(tmp_path / "obj.npz", X=np.array([[1], [2]], dtype=object), y=np.array(["a", "b"]))
    (tmp_path / "obj.toml").write_text(SPEC)
    with pytest.raises(ConfigError, match=r"not a readable \.npz of plain arrays"):
        load_dataset(str(tmp_path / "obj.npz"))


def test_cli_names_the_problem_with_a_dataset_in_one_line(tmp_path: Path) -> None:
    """`fusebus replay` and `fusebus eval` stop before connecting, with one line and exit 2."""
    np.savez(tmp_path / "levels.npz", X=np.ones((2, 20, 4)), y=np.array([0, 1]))
    (tmp_path / "levels.toml").write_text(SPEC)
    for args in (
        ("replay", str(tmp_path / "levels.npz"), "--nats-url", "nats://127.0.0.1:1"),
        ("eval", "--dataset", str(tmp_path / "levels.npz"), "--nats-url", "nats://127.0.0.1:1"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "fusebus", *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and "the spec needs labels" in done.stderr


def test_agents_the_dataset_cannot_feed_are_refused_before_running(tmp_path: Path) -> None:
    """A sensor the dataset lacks, another window length or channel count, or labels the
    dataset does not have: each stops eval before it starts anything."""
    dataset = load_dataset(str(level_dataset(tmp_path)))
    assert set(build_agents(dataset, LEVEL_AGENTS)) == {"imu", "mic"}
    with pytest.raises(ConfigError, match="reads sensor 'accel'"):
        build_agents(dataset, ("tests.plugins:ImuLevelAgent", "accel"))
    short = SensorDataset(**{**dataset.__dict__, "x_test": dataset.x_test[:, :10]})
    with pytest.raises(
        ConfigError, match="reads 20 samples of 'imu'; the cases of 'levels' are 10"
    ):
        build_agents(short, LEVEL_AGENTS)
    wide = SensorDataset(**{**dataset.__dict__, "sensors": {"imu": (0, 1), "mic": (3,)}})
    with pytest.raises(ConfigError, match="reads 3 channels of 'imu'; dataset 'levels' gives it 2"):
        build_agents(wide, LEVEL_AGENTS)
    renamed = SensorDataset(**{**dataset.__dict__, "labels": ("up", "down")})
    with pytest.raises(ConfigError, match="answers labels \\['high', 'low'\\]"):
        build_agents(renamed, LEVEL_AGENTS)


def test_class_report_matches_a_hand_computed_case() -> None:
    """Three labels: a has TP2 FP1 FN0, b TP1 FP1 FN1, c TP0 FP0 FN1 (support 2, 2, 1), so
    c's ratios divide by 0 and count 0: the numbers scikit-learn's classification_report
    gives for the same lists with zero_division=0."""
    truth = ["a", "a", "b", "b", "c"]
    predicted = ["a", "a", "a", "b", "b"]
    report = class_report(truth, predicted, ["a", "b", "c"])
    a, b, c = report.classes
    assert (a.precision, a.recall, a.f1, a.support) == pytest.approx((2 / 3, 1.0, 0.8, 2))
    assert (b.precision, b.recall, b.f1, b.support) == pytest.approx((0.5, 0.5, 0.5, 2))
    assert (c.precision, c.recall, c.f1, c.support) == (0.0, 0.0, 0.0, 1)
    assert report.accuracy == pytest.approx(3 / 5)
    assert report.macro.f1 == pytest.approx((0.8 + 0.5) / 3)
    assert report.weighted.precision == pytest.approx((2 * 2 / 3 + 2 * 0.5) / 5)
    assert report.weighted.recall == pytest.approx((2 * 1 + 2 * 0.5) / 5)
    assert report.total == 5


def _burn() -> None:
    while True:
        pass


@pytest.fixture
def cpu_burners() -> Iterator[int]:
    """Three processes spinning on a machine of two cores, for as long as the test runs."""
    burners = [
        multiprocessing.get_context("spawn").Process(target=_burn, daemon=True) for _ in range(3)
    ]
    for burner in burners:
        burner.start()
    yield len(burners)
    for burner in burners:
        burner.kill()
        burner.join()


async def test_eval_of_a_users_dataset_finishes_under_cpu_load(
    nats_server: EmbeddedServer,
    connect_bus: Callable[[str], Awaitable[Client]],
    tmp_path: Path,
    cpu_burners: int,
) -> None:
    """A user's .npz and two plug-in agents, evaluated while three processes hog the CPU:
    every run finishes, the mic alone is wrong on exactly the cases whose mic is flipped,
    and each strategy's per-class report is printed into report.md beside eval.md."""
    await connect_bus("cleanup")  # deletes the streams the runs create
    settings = EvalSettings(
        dataset=str(level_dataset(tmp_path, cases=24, flipped_mic=6)),
        agents=LEVEL_AGENTS,
        strategies=("weighted_mean", "majority_vote"),
        deadline_ms=400,
        rate_hz=100,
        out_dir=tmp_path / "out",
        nats_url=nats_server.url,
    )
    began = time.monotonic()
    report = await asyncio.wait_for(run_eval(settings), timeout=240)
    print(f"eval under {cpu_burners} CPU burners: {time.monotonic() - began:.1f} s")
    alone = {r.what: r for r in report.rows if r.what.endswith("alone")}
    assert alone["imu alone"].accuracy == 1.0
    assert alone["mic alone"].accuracy == pytest.approx(18 / 24)
    fused = [r for r in report.rows if r.what == "fusion"]
    assert {(r.strategy, r.missing) for r in fused} == {
        (s, m) for s in ("weighted_mean", "majority_vote") for m in ("none", "imu", "mic")
    }
    for row in fused:
        assert (row.complete, row.partial) == ((24, 0) if row.missing == "none" else (0, 24))
    weighted = report.class_reports["weighted_mean"]
    assert [c.label for c in weighted.classes] == ["high", "low"]
    assert [c.support for c in weighted.classes] == [12, 12]
    full = next(r for r in fused if r.strategy == "weighted_mean" and r.missing == "none")
    assert weighted.accuracy == pytest.approx(full.accuracy)
    written = report.class_report.read_text()
    assert report.class_report.parent == report.markdown.parent
    assert "## weighted_mean, all agents" in written and "## majority_vote, all agents" in written
    assert "| weighted avg |" in written and "| high |" in written
    assert "precision    recall  f1-score   support" in report.class_reports_text


def test_replay_start_never_runs_ahead_of_the_clock_or_back_into_a_stream() -> None:
    """Faster than real time the replay starts in the past by what it would gain; it never
    starts before what the bus already holds; it lands on the case grid."""
    second = 10**9
    start = replay_start_ns(
        now_ns=1000 * second, grid_ns=10 * second, span_ns=400 * second, send_s=4
    )
    assert start == 610 * second  # 1000 - (400 - 4) = 604, up to the grid
    assert start + 400 * second <= 1000 * second + 4 * second + 10 * second
    at_real_time = replay_start_ns(
        now_ns=1003 * second, grid_ns=10 * second, span_ns=40 * second, send_s=40
    )
    assert at_real_time == 1010 * second
    after = replay_start_ns(
        now_ns=1000 * second,
        grid_ns=10 * second,
        span_ns=400 * second,
        send_s=4,
        after_ns=1234 * second,
    )
    assert after == 1240 * second


async def test_replaying_a_dataset_twice_onto_one_stream_decides_both(
    pipeline: StartPipeline, basicmotions: SensorDataset
) -> None:
    """The second replay continues the stream after the first one's windows instead of
    sending windows that are already closed: all twelve windows are decided, none late."""
    parts = await pipeline()
    decided = await Collector(Decision).start_stream(parts.nc, parts.subjects.decision("twice"))
    request = ReplayRequest(source="basicmotions", stream="twice", speed=200, limit=6)
    first = await run_replay(parts.nc, parts.subjects, request)
    await decided.wait_for(6)
    second = await run_replay(parts.nc, parts.subjects, request)
    assert "already reached" not in first and "already reached" in second
    await decided.wait_for(12)
    windows = sorted(d.window.t_start_ns for d in decided.items)
    assert len(set(windows)) == 12 and windows[6] >= max(windows[:6]) + basicmotions.case_ns
    assert [d.label for d in sorted(decided.items, key=lambda d: d.window.t_start_ns)][:6] == [
        d.label for d in sorted(decided.items, key=lambda d: d.window.t_start_ns)
    ][6:]
    assert parts.coordinator is not None and parts.coordinator.stats()["late_chunks"] == 0


#: The plans file the README shows for a dataset of 1 s cases of ``imu`` and ``mic`` at 20 Hz.
LEVEL_PLANS = """
[default]
deadline_ms = 2000

[default.window]
size_ms = 1000
hop_ms = 1000
rate_hz = 20
lateness_ms = 500

[default.sensors.imu]
required = true

[default.sensors.mic]
required = false

[default.subtasks.imu]
sensors = ["imu"]

[default.subtasks.mic]
sensors = ["mic"]
"""


def fusebus_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fusebus", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )  # fmt: skip


async def test_a_users_dataset_from_training_to_live_decisions(
    nats_server: EmbeddedServer,
    subjects: Subjects,
    connect_bus: Callable[[str], Awaitable[Client]],
    spawn: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """The README's path for a new dataset, through the CLI alone: `fusebus train` fits one
    model per sensor on X_train, `fusebus eval` serves those model files, and a coordinator
    with the README's plans file, the two agents and fusion decide every case that
    `fusebus replay` sends as per-sensor chunks, which `fusebus decisions` then prints."""
    path = level_dataset(tmp_path, cases=24, flipped_mic=0)
    rng = np.random.default_rng(5)
    y_train = np.array(["high", "low"] * 8)
    x_train = np.where(y_train == "high", 1.0, -1.0)[:, None, None] + rng.normal(
        0, 0.1, (16, 20, 4)
    )
    with np.load(path) as npz:
        np.savez(path, X=npz["X"], y=npz["y"], X_train=x_train, y_train=y_train)
    models = tmp_path / "models"
    trained = await asyncio.to_thread(
        fusebus_cli, "train", "--dataset", str(path), "--out", str(models), "--epochs", "6"
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert {p.name for p in models.glob("*.tflite")} == {"imu.tflite", "mic.tflite"}
    evaluated = await asyncio.to_thread(
        fusebus_cli, "eval", "--dataset", str(path), "--agents",
        f"{models / 'imu.tflite'},{models / 'mic.tflite'}", "--strategies", "weighted_mean",
        "--nats-url", nats_server.url, "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    alone = re.search(r"\| imu alone \| - \| - \| ([\d.]+) \|", evaluated.stdout)
    assert alone is not None and float(alone[1]) >= 0.9, evaluated.stdout
    assert "| high |" in (tmp_path / "out" / "report.md").read_text()

    plans = tmp_path / "plans.toml"
    plans.write_text(LEVEL_PLANS, encoding="utf-8")
    bus_args = ("--nats-url", nats_server.url, "--prefix", subjects.prefix)
    nc = await connect_bus("test")
    spawn(sys.executable, "-m", "fusebus", "coordinator", "--config", str(plans), *bus_args)
    for sensor in ("imu", "mic"):
        spawn(
            sys.executable,
            "-m",
            "fusebus",
            "agent",
            "--model",
            str(models / f"{sensor}.tflite"),
            *bus_args,
        )
    spawn(sys.executable, "-m", "fusebus", "fusion", *bus_args)
    await wait_for_role(nc, subjects.prefix, "coordinator")
    await wait_for_role(nc, subjects.prefix, "fusion")
    await wait_for_agents(nc, subjects.prefix, {"imu": 1, "mic": 1})
    decided = await Collector(Decision).start_stream(nc, subjects.decision("levels"))
    replayed = await asyncio.to_thread(fusebus_cli, "replay", str(path), "--speed", "20", *bus_args)
    assert replayed.returncode == 0, replayed.stderr[-2000:]
    assert "(24 windows) of levels on 1 stream(s)" in replayed.stdout
    await decided.wait_for(24)
    assert {d.status for d in decided.items} == {"complete"}
    assert sum(d.label == ("high" if i % 2 == 0 else "low") for i, d in enumerate(
        sorted(decided.items, key=lambda d: d.window.t_start_ns))) >= 22  # fmt: skip
    shown = await asyncio.to_thread(
        fusebus_cli, "decisions", "--no-follow", "--stream", "levels", "--json", *bus_args
    )
    assert shown.returncode == 0 and len(shown.stdout.splitlines()) == 24, shown.stderr


def test_training_needs_enough_cases_of_each_label(tmp_path: Path) -> None:
    """Training holds cases out for validation; too few of a label is one line, exit 2."""
    path = level_dataset(tmp_path)
    with np.load(path) as npz:
        np.savez(path, X=npz["X"], y=npz["y"], X_train=npz["X"][:6], y_train=npz["y"][:6])
    done = subprocess.run(
        [sys.executable, "-m", "fusebus", "train", "--dataset", str(path), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "label 'high' has 3 train case(s)" in done.stderr
