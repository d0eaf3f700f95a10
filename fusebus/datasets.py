"""Labelled sensor datasets as arrays split by sensor: the ones shipped in ``data/``, and a
user's own ``.npz`` file described by a small TOML spec.

A user's dataset is an ``.npz`` holding ``X`` (cases, samples, channels) and ``y`` (one label
per case, class indexes or strings), optionally ``X_train``/``y_train`` as a second split. The
spec (``--spec``, or the ``.toml`` file beside the ``.npz`` with the same stem) names the
sample rate, which channels of ``X`` each sensor owns and, for integer ``y``, the labels::

    rate_hz = 50
    labels = ["idle", "stir", "chop"]
    [sensors]
    accel = [0, 1, 2]
    mic = [3]
"""

from __future__ import annotations

import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bus import check_token
from fusebus.paths import data_dir
from schemas import ConfigError, SubjectError


@dataclass(frozen=True)
class SensorDataset:
    """A labelled multivariate dataset whose channels belong to named sensors.

    ``x_*`` arrays are ``(cases, samples, channels)``; ``sensors`` maps each sensor to the
    channel indexes it owns.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    labels: tuple[str, ...]
    sensors: dict[str, tuple[int, ...]]
    sample_rate_hz: float

    @property
    def period_ns(self) -> int:
        """Nanoseconds between two samples."""
        return round(1e9 / self.sample_rate_hz)

    @property
    def case_ns(self) -> int:
        """Event time one case spans (its samples back to back)."""
        return int(self.x_test.shape[1]) * self.period_ns

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The cases and class indexes of split ``name`` (``train`` or ``test``).

        Raises:
            ConfigError: an unknown split, or one this dataset does not have.
        """
        if name not in ("train", "test"):
            raise ConfigError(f"split must be 'train' or 'test', got {name!r}")
        x, y = (self.x_test, self.y_test) if name == "test" else (self.x_train, self.y_train)
        if not len(x):
            raise ConfigError(f"dataset {self.name!r} has no {name} split")
        return x, y

    def sensor_view(self, x: np.ndarray, sensor: str) -> np.ndarray:
        """The channels of ``sensor`` from an ``x`` array (one case or many)."""
        return x[..., list(self.sensors[sensor])]


def load_basicmotions(path: Path | None = None) -> SensorDataset:
    """Load BasicMotions (UEA archive): a smartwatch's accelerometer and gyroscope at 10 Hz."""
    source = path or data_dir() / "basicmotions.npz"
    if not source.exists():
        raise ConfigError(f"dataset file {source} does not exist")
    with np.load(source) as npz:
        return SensorDataset(
            name="basicmotions",
            x_train=npz["x_train"],
            y_train=npz["y_train"],
            x_test=npz["x_test"],
            y_test=npz["y_test"],
            labels=tuple(str(label) for label in npz["label_names"]),
            sensors={"accel": (0, 1, 2), "gyro": (3, 4, 5)},
            sample_rate_hz=float(npz["sample_rate_hz"]),
        )


DATASETS = {"basicmotions": load_basicmotions}


def is_dataset_file(source: str) -> bool:
    """Whether ``source`` names a user's dataset file (``.npz``) rather than a shipped name."""
    return source.lower().endswith(".npz")


def load_dataset(source: str, *, spec: Path | None = None) -> SensorDataset:
    """A shipped dataset by name, or a user's ``.npz`` file with its spec.

    Raises:
        ConfigError: an unknown name, or a file or spec that cannot be used (the message
            names the file and what is wrong with it).
    """
    if is_dataset_file(source):
        return load_npz_dataset(Path(source), spec=spec)
    if spec is not None:
        raise ConfigError(f"--spec describes a .npz file; {source!r} is a shipped dataset")
    loader = DATASETS.get(source)
    if loader is None:
        raise ConfigError(
            f"unknown dataset {source!r}; known: {', '.join(sorted(DATASETS))}, or a .npz file"
        )
    return loader()


#: A sample period must be at least a microsecond: event times are integer nanoseconds.
MAX_RATE_HZ = 1e6
#: The arrays of a dataset file that are read; anything else in it is left unread.
DATASET_ARRAYS = ("X", "y", "X_train", "y_train")


@dataclass(frozen=True)
class DatasetSpec:
    """What a user's spec file says about the arrays of its ``.npz``."""

    name: str
    rate_hz: float
    sensors: dict[str, tuple[int, ...]]
    labels: tuple[str, ...] | None


def read_spec(path: Path, *, default_name: str) -> DatasetSpec:
    """Parse and check a dataset spec (TOML); raises :class:`ConfigError` naming the problem."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"dataset spec {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"dataset spec {path}: {exc}") from None
    return parse_spec(raw, where=str(path), default_name=default_name)


def parse_spec(raw: dict[str, Any], *, where: str, default_name: str) -> DatasetSpec:
    """Check a spec's keys and values; ``where`` names it in error messages."""
    unknown = set(raw) - {"name", "rate_hz", "sensors", "labels"}
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
            "expected name, rate_hz, labels and a [sensors] table"
        )
    name = raw.get("name", default_name)
    try:
        check_token(str(name), "dataset name (the default stream id)")
    except SubjectError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    rate = raw.get("rate_hz")
    if isinstance(rate, bool) or not isinstance(rate, int | float):
        raise ConfigError(f"{where}: rate_hz (samples per second) must be a number")
    if not (0 < rate <= MAX_RATE_HZ):
        raise ConfigError(f"{where}: rate_hz must be > 0 and at most {MAX_RATE_HZ:.0e}, got {rate}")
    sensors = raw.get("sensors")
    if not isinstance(sensors, dict) or not sensors:
        raise ConfigError(
            f"{where}: a [sensors] table must name each sensor's channels of X, e.g. accel = [0, 1, 2]"
        )
    channels: dict[str, tuple[int, ...]] = {}
    owner: dict[int, str] = {}
    for sensor, indexes in sensors.items():
        try:
            check_token(sensor, "sensor")
        except SubjectError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if (
            not isinstance(indexes, list)
            or not indexes
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indexes)
        ):
            raise ConfigError(
                f"{where}: sensors.{sensor} must be a non-empty list of channel indexes >= 0"
            )
        for index in indexes:
            if index in owner:
                raise ConfigError(
                    f"{where}: channel {index} belongs to both {owner[index]!r} and {sensor!r}"
                )
            owner[index] = sensor
        channels[sensor] = tuple(indexes)
    labels = raw.get("labels")
    if labels is not None and (
        not isinstance(labels, list)
        or not labels
        or not all(isinstance(label, str) and label for label in labels)
        or len(set(labels)) != len(labels)
    ):
        raise ConfigError(f"{where}: labels must be a list of distinct, non-empty strings")
    return DatasetSpec(str(name), float(rate), channels, tuple(labels) if labels else None)


def load_npz_dataset(path: Path, *, spec: Path | None = None) -> SensorDataset:
    """A user's dataset: ``X``/``y`` (and optionally ``X_train``/``y_train``) from ``path``,
    described by ``spec`` (default: the ``.toml`` beside it).

    Raises:
        ConfigError: the file, its arrays or the spec cannot be used; the message says which.
    """
    spec_path = spec or path.with_suffix(".toml")
    if not path.exists():
        raise ConfigError(f"dataset file {path} does not exist")
    if spec is None and not spec_path.exists():
        raise ConfigError(
            f"{path} needs a spec: write {spec_path} (rate_hz and a [sensors] table) or pass --spec"
        )
    described = read_spec(spec_path, default_name=path.stem)
    try:
        with np.load(path, allow_pickle=False) as npz:
            present = list(npz.files)
            arrays = {key: npz[key] for key in DATASET_ARRAYS if key in present}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        # allow_pickle=False: object arrays (and anything else needing pickle) are refused
        raise ConfigError(f"{path} is not a readable .npz of plain arrays: {exc}") from None
    except MemoryError:  # a header declaring a shape far larger than the file, say
        raise ConfigError(f"{path}: an array is too large to load into memory") from None
    for key in ("X", "y"):
        if key not in arrays:
            raise ConfigError(
                f"{path} has no {key!r} array (it has: {', '.join(sorted(present)) or 'none'})"
            )
    x_test, y_test, labels = _split(arrays, "X", "y", path, described, labels=described.labels)
    if "X_train" in arrays or "y_train" in arrays:
        x_train, y_train, _ = _split(arrays, "X_train", "y_train", path, described, labels=labels)
    else:
        x_train = np.zeros((0, *x_test.shape[1:]), dtype=np.float32)
        y_train = np.zeros(0, dtype=np.int64)
    return SensorDataset(
        name=described.name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        labels=labels,
        sensors=described.sensors,
        sample_rate_hz=described.rate_hz,
    )


def _split(
    arrays: dict[str, np.ndarray],
    x_key: str,
    y_key: str,
    path: Path,
    spec: DatasetSpec,
    *,
    labels: tuple[str, ...] | None,
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """One split's cases as float32 and its labels as class indexes, checked against the spec."""
    if x_key not in arrays or y_key not in arrays:
        raise ConfigError(f"{path}: {x_key} and {y_key} come together; one is missing")
    x, y = arrays[x_key], arrays[y_key]
    if x.ndim != 3 or 0 in x.shape:
        raise ConfigError(
            f"{path}: {x_key} must be (cases, samples, channels) with none of them 0, "
            f"got shape {x.shape}"
        )
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ConfigError(f"{path}: {x_key} must hold real numbers, got dtype {x.dtype}")
    with np.errstate(over="ignore"):  # an overflow becomes inf, reported just below
        x = x.astype(np.float32)  # checked after the cast: 1e300 becomes inf in float32
    if not np.isfinite(x).all():
        raise ConfigError(
            f"{path}: {x_key} holds {int(np.size(x) - np.isfinite(x).sum())} NaN or infinite "
            "values (as float32)"
        )
    if y.ndim != 1 or len(y) != len(x):
        raise ConfigError(
            f"{path}: {y_key} must hold one label per case of {x_key} ({len(x)}), got shape {y.shape}"
        )
    widest = max(max(indexes) for indexes in spec.sensors.values())
    if widest >= x.shape[2]:
        raise ConfigError(
            f"{path}: the spec names channel {widest}, but {x_key} has {x.shape[2]} channels"
        )
    if np.issubdtype(y.dtype, np.str_):
        names = labels or tuple(sorted({str(v) for v in y}))
        index = {label: i for i, label in enumerate(names)}
        unknown = sorted({str(v) for v in y} - set(index))
        if unknown:
            raise ConfigError(f"{path}: {y_key} has labels not in the spec's labels: {unknown[:5]}")
        return x.astype(np.float32), np.array([index[str(v)] for v in y], np.int64), names
    if not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(
            f"{path}: {y_key} must hold class indexes (integers) or label strings, got {y.dtype}"
        )
    if labels is None:
        raise ConfigError(f"{path}: {y_key} holds class indexes, so the spec needs labels = [...]")
    if y.min() < 0 or y.max() >= len(labels):
        raise ConfigError(
            f"{path}: {y_key} holds class indexes {int(y.min())}..{int(y.max())}, "
            f"but the spec names {len(labels)} labels"
        )
    return x.astype(np.float32), y.astype(np.int64), labels
