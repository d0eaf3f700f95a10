"""The limit: the same models and fusion called in one process, no bus.

    python -m bench.limit --runtime litert|tf --batch 1|64 [--frames 3000]

Prints one JSON line: frames/s, CPU-ms per frame, RSS MB, time to first decision.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import numpy as np

from bench.workload import SENSORS, TYPES, build_models, frames


def main() -> None:
    started = time.perf_counter()
    parser = argparse.ArgumentParser()
    parser.add_argument("--runtime", choices=("litert", "tf"), required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=3000)
    args = parser.parse_args()
    folder = build_models()
    if args.runtime == "litert":
        from agents.runtimes.litert import LiteRTModel

        models = [LiteRTModel(folder / f"{t}.tflite", buckets=(1, args.batch)) for t in TYPES]
        for m in models:
            m.warm_up()
        run = [m.predict for m in models]
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        from agents.runtimes.keras import KerasModel

        kmodels = [KerasModel(folder / f"{t}.keras", buckets=(1, args.batch)) for t in TYPES]
        for k in kmodels:
            k.warm_up()
        run = [k.predict for k in kmodels]
    weights = np.array([0.5, 0.6, 0.7])
    data = frames(args.frames)
    stacked = {s: np.stack([f[s] for f in data]) for s in SENSORS}
    first_decision = None
    cpu0 = time.process_time()
    began = time.perf_counter()
    labels = []
    for start in range(0, args.frames, args.batch):
        outputs = [
            predict([stacked[s][start : start + args.batch]])
            for predict, s in zip(run, SENSORS, strict=True)
        ]
        fused = np.tensordot(weights, np.stack(outputs), axes=1) / weights.sum()
        labels.extend(fused.argmax(axis=1).tolist())
        if first_decision is None:
            first_decision = time.perf_counter() - started
    elapsed = time.perf_counter() - began
    cpu = time.process_time() - cpu0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "frames_per_s": args.frames / elapsed,
                "cpu_ms_per_frame": cpu * 1e3 / args.frames,
                "rss_mb": rss_mb,
                "first_decision_s": first_decision,
                "decisions": len(labels),
            }
        )
    )


if __name__ == "__main__":
    main()
