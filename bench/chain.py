"""The benchmark models as a two-stage chain: what a second stage costs.

Each benchmark model (Conv1D, Conv1D, pooling, Dense; see :mod:`bench.workload`) is cut in
two at its pooled features: an *encoder* ``e<i>`` answering 32 features of its sensor, and a
*head* ``h<i>`` (the Dense layer) reading them and answering the 6 class scores. The same
weights, the same arithmetic per frame: what the chain adds over the one-stage system is the
bus hop between the stages (a result to the coordinator, a subtask to the head) and the
coordinator's holding of the features. Measured by :mod:`bench.compare` beside the one-stage
system (``--only fusebus1,chain``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from agents.model_card import ModelCard
from bench.workload import LABELS, SAMPLES, SENSORS, TYPES, build_models, cache_dir
from schemas import InputSpec

#: Per-row features an encoder answers: the models' pooled Conv1D channels.
FEATURES = 32
ENCODERS = tuple(f"e{i}" for i in range(len(TYPES)))
HEADS = tuple(f"h{i}" for i in range(len(TYPES)))


def build_chain_models(out: Path | None = None) -> Path:
    """Split each benchmark model into its encoder and head (cached); returns their folder."""
    source = build_models()
    out = out or cache_dir() / "chain"
    names = (*ENCODERS, *HEADS)
    if all((out / f"{n}.tflite").exists() for n in names):
        return out
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from agents.training import export_tflite

    out.mkdir(parents=True, exist_ok=True)
    for t, e, h, sensor in zip(TYPES, ENCODERS, HEADS, SENSORS, strict=True):
        model = keras.models.load_model(source / f"{t}.keras")
        pooled = model.layers[-2].output  # GlobalAveragePooling1D
        encoder = keras.Model(model.inputs, pooled)
        features = keras.Input((FEATURES,), name=e)
        head = keras.Model(features, model.layers[-1](features))
        export_tflite(encoder, out / f"{e}.tflite")
        export_tflite(head, out / f"{h}.tflite")
        cards = (
            ModelCard(
                type=e,
                name=f"bench-{e}",
                version="1.0.0",
                labels=(),
                inputs=(InputSpec(sensor, SAMPLES, 3),),
                output="features",
                output_shape=(FEATURES,),
                notes=f"the convolutions of bench-{t}: its pooled features",
            ),
            ModelCard(
                type=h,
                name=f"bench-{h}",
                version="1.0.0",
                labels=LABELS,
                inputs=(InputSpec(e, stage=True, shape=(FEATURES,)),),
                notes=f"the Dense layer of bench-{t}, reading {e}'s features",
            ),
        )
        for card in cards:
            (out / f"{card.type}.json").write_text(card.to_json(), encoding="utf-8")
    return out


def chain_plans_toml(deadline_ms: float = 5000, max_inflight: int = 100_000) -> str:
    """A plans file: each encoder reads its sensor, each head its encoder."""
    lines = ["[default]", f"deadline_ms = {deadline_ms}", f"max_inflight = {max_inflight}", ""]
    for e, h, sensor in zip(ENCODERS, HEADS, SENSORS, strict=True):
        lines += [f"[default.subtasks.{e}]", f'sensors = ["{sensor}"]', ""]
        lines += [f"[default.subtasks.{h}]", f'after = ["{e}"]', ""]
    return "\n".join(lines)


def chain_plans_file() -> Path:
    """:func:`chain_plans_toml` written to a fresh temporary file."""
    path = Path(tempfile.mkdtemp(prefix="fusebus-bench-chain-")) / "plans.toml"
    path.write_text(chain_plans_toml(), encoding="utf-8")
    return path
