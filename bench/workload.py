"""The benchmark workload: 3 sensors, windows of 128 samples x 3 axes (float32), 3 agent
types each a small Conv1D classifier with 6 classes and seeded random weights.

Models are built once with TensorFlow, converted to LiteRT, and cached in
``~/.cache/fusebus-bench`` (or ``FUSEBUS_BENCH_CACHE``), each with its card.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from agents.model_card import ModelCard
from schemas import InputSpec

TYPES = ("t0", "t1", "t2")
SENSORS = ("s0", "s1", "s2")
SAMPLES, CHANNELS, CLASSES = 128, 3, 6
LABELS = tuple(f"c{i}" for i in range(CLASSES))
SEED = 20261122


def cache_dir() -> Path:
    """Where the benchmark's models live."""
    return Path(os.environ.get("FUSEBUS_BENCH_CACHE", Path.home() / ".cache" / "fusebus-bench"))


def build_models(out: Path | None = None) -> Path:
    """Make (or reuse) the three models; returns their folder."""
    out = out or cache_dir()
    if all((out / f"{t}.tflite").exists() and (out / f"{t}.keras").exists() for t in TYPES):
        return out
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from agents.training import export_tflite

    out.mkdir(parents=True, exist_ok=True)
    for index, (type_name, sensor) in enumerate(zip(TYPES, SENSORS, strict=True)):
        keras.utils.set_random_seed(SEED + index)
        inputs = keras.Input((SAMPLES, CHANNELS))
        h = keras.layers.Conv1D(16, 5, padding="same", activation="relu")(inputs)
        h = keras.layers.Conv1D(32, 5, padding="same", activation="relu")(h)
        h = keras.layers.GlobalAveragePooling1D()(h)
        outputs = keras.layers.Dense(CLASSES, activation="softmax")(h)
        model = keras.Model(inputs, outputs)
        model.save(out / f"{type_name}.keras")
        export_tflite(model, out / f"{type_name}.tflite")
        card = ModelCard(
            type=type_name,
            name=f"bench-{type_name}",
            version="1.0.0",
            labels=LABELS,
            inputs=(InputSpec(sensor, SAMPLES, CHANNELS),),
            weight=0.5 + 0.1 * index,
            notes="seeded random weights, for speed measurements only",
        )
        (out / f"{type_name}.json").write_text(card.to_json(), encoding="utf-8")
    return out


def frames(count: int, *, seed: int = SEED) -> list[dict[str, np.ndarray]]:
    """``count`` frames of random sensor data (a few distinct ones, reused)."""
    rng = np.random.default_rng(seed)
    distinct = [
        {s: rng.standard_normal((SAMPLES, CHANNELS)).astype(np.float32) for s in SENSORS}
        for _ in range(32)
    ]
    return [distinct[i % len(distinct)] for i in range(count)]


def plans_toml(deadline_ms: float = 5000, max_inflight: int = 100_000) -> str:
    """A plans file for fusebus: each type reads its sensor."""
    lines = ["[default]", f"deadline_ms = {deadline_ms}", f"max_inflight = {max_inflight}", ""]
    for type_name, sensor in zip(TYPES, SENSORS, strict=True):
        lines += [f"[default.subtasks.{type_name}]", f'sensors = ["{sensor}"]', ""]
    return "\n".join(lines)
