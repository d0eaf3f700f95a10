"""The floor of the bus: a minimal hand-written pipeline over raw nats-py.

One process per agent and one fusion process, core NATS only, no framework, no durability.
Frames go to ``raw.frame`` (all sensors); each agent runs its LiteRT model on its sensor,
one frame per call or draining what is queued into batches of up to 64, and publishes to
``raw.result``; fusion waits for the three results of a frame and publishes ``raw.decision``.

    python -m bench.raw agent --type t0 --batch 64 --url nats://...
    python -m bench.raw fusion --url nats://...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import msgpack
import nats
import numpy as np

from bench.workload import CHANNELS, SAMPLES, SENSORS, TYPES, build_models


async def agent(url: str, type_name: str, batch: int) -> None:
    from agents.runtimes.litert import LiteRTModel

    model = LiteRTModel(
        build_models() / f"{type_name}.tflite", buckets=(1, batch) if batch > 1 else (1,)
    )
    model.warm_up()
    sensor = SENSORS[TYPES.index(type_name)]
    nc = await nats.connect(url)
    queue: list[tuple[int, int, bytes]] = []
    ready = asyncio.Event()

    async def on_frame(msg: nats.aio.msg.Msg) -> None:
        frame = msgpack.unpackb(msg.data)
        queue.append((frame["id"], frame["t"], frame[sensor]))
        ready.set()

    await nc.subscribe("raw.frame", cb=on_frame)
    await nc.publish(f"raw.ready.{type_name}", b"")
    while True:
        await ready.wait()
        ready.clear()
        while queue:
            taken, queue[:] = queue[:batch], queue[batch:]
            x = np.stack(
                [np.frombuffer(raw, np.float32).reshape(SAMPLES, CHANNELS) for _, _, raw in taken]
            )
            outputs = model.predict([x])
            for (frame_id, t, _), out in zip(taken, outputs, strict=True):
                await nc.publish(
                    "raw.result",
                    msgpack.packb({"id": frame_id, "t": t, "type": type_name, "p": out.tobytes()}),
                )
            await asyncio.sleep(0)  # let the client read more frames between batches


async def fusion(url: str) -> None:
    nc = await nats.connect(url)
    weights = {"t0": 0.5, "t1": 0.6, "t2": 0.7}
    pending: dict[int, list[tuple[str, np.ndarray]]] = {}

    async def on_result(msg: nats.aio.msg.Msg) -> None:
        result = msgpack.unpackb(msg.data)
        parts = pending.setdefault(result["id"], [])
        parts.append((result["type"], np.frombuffer(result["p"], np.float32)))
        if len(parts) == len(TYPES):
            del pending[result["id"]]
            fused = sum(weights[t] * p for t, p in parts) / sum(weights.values())
            await nc.publish(
                "raw.decision",
                msgpack.packb(
                    {"id": result["id"], "t": result["t"], "label": int(np.argmax(fused))}
                ),
            )

    await nc.subscribe("raw.result", cb=on_result)
    await nc.publish("raw.ready.fusion", b"")
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("agent", "fusion"))
    parser.add_argument("--url", required=True)
    parser.add_argument("--type", dest="type_name", default="t0")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            agent(args.url, args.type_name, args.batch)
            if args.role == "agent"
            else fusion(args.url)
        )


if __name__ == "__main__":
    main()
