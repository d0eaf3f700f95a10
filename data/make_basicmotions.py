"""Convert the BasicMotions dataset from its UEA ``.ts`` files into ``data/basicmotions.npz``.

Run once, by hand; fusebus itself only ever reads the ``.npz`` it writes::

    pip download --no-deps aeon -d /tmp/aeon          # or: pip install aeon / sktime
    python data/make_basicmotions.py --source /tmp/aeon/aeon-*.whl

``--source`` may be a folder holding ``BasicMotions_TRAIN.ts`` and ``BasicMotions_TEST.ts``,
or a wheel of aeon or sktime (they ship the files under their datasets folder). Without
``--source`` the installed aeon or sktime package is searched.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

CHANNELS = ("accel_x", "accel_y", "accel_z", "gyro_x", "gyro_y", "gyro_z")
SPLITS = ("TRAIN", "TEST")
OUT = Path(__file__).with_name("basicmotions.npz")


def parse_ts(text: str) -> tuple[np.ndarray, list[str]]:
    """Parse a UEA multivariate ``.ts`` file into ``(cases, time, channels)`` and labels."""
    cases: list[np.ndarray] = []
    labels: list[str] = []
    in_data = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            in_data = line.lower() == "@data"
            continue
        *dims, label = line.split(":")
        series = [np.array([float(v) for v in dim.split(",")]) for dim in dims]
        cases.append(np.stack(series, axis=-1))
        labels.append(label.strip().lower())
    return np.stack(cases).astype(np.float32), labels


def read_split(source: Path | None, split: str) -> str:
    """Return the text of ``BasicMotions_<split>.ts`` from a folder, a wheel or an install."""
    name = f"BasicMotions_{split}.ts"
    if source is not None and source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            member = next(m for m in wheel.namelist() if m.endswith("/" + name))
            return io.TextIOWrapper(wheel.open(member), encoding="utf-8").read()
    roots = [source] if source is not None else _installed_roots()
    for root in roots:
        for path in root.rglob(name):
            return path.read_text(encoding="utf-8")
    raise SystemExit(f"error: {name} not found in {', '.join(map(str, roots)) or 'any package'}")


def _installed_roots() -> list[Path]:
    roots = []
    for package in ("aeon", "sktime"):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin is not None:
            roots.append(Path(spec.origin).parent / "datasets")
    return roots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="folder or aeon/sktime wheel")
    args = parser.parse_args(argv)

    arrays: dict[str, np.ndarray] = {}
    label_names: list[str] = []
    for split in SPLITS:
        x, labels = parse_ts(read_split(args.source, split))
        label_names = sorted(set(label_names) | set(labels))
        arrays[f"x_{split.lower()}"] = x
        arrays[f"labels_{split.lower()}"] = np.array(labels)
    names = np.array(label_names)
    for split in SPLITS:
        labels = arrays.pop(f"labels_{split.lower()}")
        arrays[f"y_{split.lower()}"] = np.searchsorted(names, labels).astype(np.int64)
    np.savez_compressed(
        OUT, **arrays, label_names=names, channel_names=np.array(CHANNELS), sample_rate_hz=10.0
    )
    for split in SPLITS:
        x, y = arrays[f"x_{split.lower()}"], arrays[f"y_{split.lower()}"]
        print(f"{split}: x{x.shape} class counts {np.bincount(y).tolist()}", file=sys.stderr)
    print(f"wrote {OUT} labels={label_names}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
