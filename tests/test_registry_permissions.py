"""The model registry under compose/nats.conf: the ``models`` role writes it, agents only
read it (and publish shadow outputs), against a real nats-server.

The permissions hold for the default prefix ``fb`` only, so the tests of this module share
one registry; each uses a model name of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import StreamConfig

from agents import AgentRuntime, ModelAgent
from agents.follow import RegistryFollower
from agents.fusion import FusionAgent
from agents.serving import Choice, Lineup
from bus import EmbeddedServer, Producer, Subjects, TopologySettings, iter_stored
from bus.registry import ModelRegistry
from coordinator import Coordinator, PlanBook, basicmotions_plan
from fusebus.cli import build_parser
from fusebus.commands import COMMANDS
from fusebus.datasets import SensorDataset
from fusebus.paths import models_dir
from fusebus.replay import aligned_start_ns, chunk_schedule, send_schedule
from schemas import CODEC, BusError, Decision, ModelRollout, ShadowBatch
from tests.compose_env import TEST_PASSWORDS, connect_noting_errors
from tests.helpers import Collector, eventually

OpenAs = Callable[[str], Awaitable[Client]]
SUBJECTS = Subjects("fb")
MODEL = models_dir() / "accel.tflite"
#: How long a refused request waits for the answer that never comes.
REFUSED_TIMEOUT_S = 1.0


def accel_card() -> dict[str, Any]:
    """The shipped accel model's card."""
    card: dict[str, Any] = json.loads(MODEL.with_suffix(".json").read_text(encoding="utf-8"))
    return card


def model_version(folder: Path, version: str) -> Path:
    """A copy of the shipped accel model whose card says ``version``: what a retrained
    model put as a new version looks like."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "accel.tflite"
    shutil.copyfile(MODEL, path)
    card = {**accel_card(), "version": version}
    path.with_suffix(".json").write_text(json.dumps(card), encoding="utf-8")
    return path


async def fusebus_models(url: str, *argv: str) -> str:
    """Run ``fusebus models ARGV`` in this process as the ``models`` user; what it printed.

    Raises:
        AssertionError: it did not exit 0.
    """
    args = build_parser().parse_args(
        ["models", *argv, "--nats-url", url, "--user", "models",
         "--password", TEST_PASSWORDS["models"]]
    )  # fmt: skip
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = await COMMANDS[args.run](args)
    assert code == 0, out.getvalue()
    return out.getvalue()


async def writable_registry(as_role: OpenAs) -> ModelRegistry:
    """The registry as ``fusebus models put`` opens it: as the models role, made if missing."""
    nc = await as_role("models")
    return await ModelRegistry.open(nc.jetstream(), SUBJECTS, TopologySettings(), create=True)


async def read_only_registry(nc: Client, *, timeout_s: float = 5.0) -> ModelRegistry:
    """The registry as an agent started with ``--model store:NAME`` opens it."""
    js = nc.jetstream(timeout=timeout_s)
    return await ModelRegistry.open(js, SUBJECTS, TopologySettings(manage=False))


async def test_the_models_role_stores_lists_rolls_out_and_removes_versions(
    secured_server: EmbeddedServer, tmp_path: Path
) -> None:
    """`fusebus models put` as the models user makes the registry and stores a first version
    (current) and a second; promote, list, rollback and rm of a version that no longer
    serves all work with the role's rights."""
    url, name = secured_server.url, "accel-cli"
    first = model_version(tmp_path / "one", "1.0.0")
    second = model_version(tmp_path / "two", "2.0.0")

    put = await fusebus_models(url, "put", str(first), "--name", name)
    assert f"stored {name} version 1.0.0" in put and f"{name}: current 1.0.0" in put
    await fusebus_models(url, "put", str(second), "--name", name)
    promoted = await fusebus_models(url, "promote", name, "2.0.0")
    assert f"{name}: current 2.0.0, rollback to 1.0.0" in promoted

    listed = await fusebus_models(url, "list")
    rows = {line.split()[1]: line for line in listed.splitlines() if line.startswith(name)}
    assert "current" in rows["2.0.0"] and "previous" in rows["1.0.0"], listed
    assert f"{name}: current 1.0.0" in await fusebus_models(url, "rollback", name)
    assert f"removed {name} version 2.0.0" in await fusebus_models(url, "rm", name, "2.0.0")
    listed = await fusebus_models(url, "list")
    assert [line.split()[1] for line in listed.splitlines() if line.startswith(name)] == ["1.0.0"]


async def test_the_models_role_cannot_delete_the_registry_or_publish_elsewhere(
    secured_server: EmbeddedServer, as_role: OpenAs
) -> None:
    """The models user writes the registry's buckets and nothing else: deleting a bucket's
    stream or the shadow stream, or publishing a shadow output or a decision, is refused."""
    await writable_registry(as_role)  # the buckets and the shadow stream exist
    errors: list[str] = []
    nc = await connect_noting_errors(secured_server.url, "models", errors)
    try:
        js = nc.jetstream(timeout=REFUSED_TIMEOUT_S)
        outcomes = await asyncio.gather(
            *(js.delete_stream(s) for s in ("OBJ_FB_MODELS", "KV_FB_ROLLOUTS", "FB_SHADOW")),
            js.publish(SUBJECTS.shadow("accel-forged"), b"forged"),
            return_exceptions=True,
        )
        assert all(isinstance(o, NatsTimeoutError) for o in outcomes), outcomes
        await nc.publish(SUBJECTS.decision("forged"), b"forged")
        await nc.flush()
        refused = [
            '"$js.api.stream.delete.obj_fb_models"',
            '"$js.api.stream.delete.kv_fb_rollouts"',
            '"$js.api.stream.delete.fb_shadow"',
            '"fb.shadow.accel-forged"',
            '"fb.decision.forged"',
        ]
        await eventually(
            lambda: all(any(s in e for e in errors) for s in refused),
            what="a permissions violation for each",
            state=lambda: errors,
        )
        for stream in ("OBJ_FB_MODELS", "KV_FB_ROLLOUTS", "FB_SHADOW"):
            assert (await (await as_role("models")).jetstream().stream_info(stream)).config
    finally:
        await nc.close()


async def test_an_agent_reads_the_registry_and_sees_a_promote(as_role: OpenAs) -> None:
    """The agent user opens the registry read-only, reads a model's rollout and a stored
    version's bytes, and its watch of the rollout sees a promote the models user makes."""
    name = "accel-read"
    writer = await writable_registry(as_role)
    data, card = MODEL.read_bytes(), accel_card()
    await writer.put(name, "1.0.0", data, file_name="accel.tflite", card=card)
    await writer.put(name, "2.0.0", data, file_name="accel.tflite", card=card)

    reader = await read_only_registry(await as_role("agent"))
    rollout = await reader.rollout(name)
    assert rollout is not None and rollout.current == "1.0.0"
    stored, got = await reader.get(name, "2.0.0")
    assert got == data and stored.size == len(data) and stored.card == card

    watch = reader.watch(name)
    try:
        now = await asyncio.wait_for(anext(watch), 10)
        assert now is not None and now.current == "1.0.0"
        await writer.promote(name, "2.0.0")
        seen = await asyncio.wait_for(anext(watch), 10)
        assert seen is not None and (seen.current, seen.previous) == ("2.0.0", ("1.0.0",))
    finally:
        await watch.aclose()


async def test_an_agent_cannot_store_a_model_change_a_rollout_or_touch_the_streams(
    secured_server: EmbeddedServer, as_role: OpenAs
) -> None:
    """With agent credentials, putting a version, promoting one, writing the rollout key,
    and creating, updating, deleting or purging the registry's streams or their messages
    are each refused by the server (a permissions violation; the request never gets an
    answer, so the registry raises BusError) and the registry is as it was."""
    name = "accel-guard"
    writer = await writable_registry(as_role)
    data, card = MODEL.read_bytes(), accel_card()
    await writer.put(name, "1.0.0", data, file_name="accel.tflite", card=card)
    await writer.put(name, "2.0.0", data, file_name="accel.tflite", card=card)
    before = await writer.rollout(name)
    catalog = await writer.catalog()
    models_info = await writer.js.stream_info("OBJ_FB_MODELS")

    errors: list[str] = []
    nc = await connect_noting_errors(secured_server.url, "agent", errors)
    try:
        agent = await read_only_registry(nc, timeout_s=REFUSED_TIMEOUT_S)
        with pytest.raises(BusError, match=f"storing {name} version 3.0.0") as put:
            await agent.put(name, "3.0.0", data, file_name="accel.tflite", card=card)
        assert isinstance(put.value.__cause__, NatsTimeoutError)
        with pytest.raises(BusError, match=f"writing {name}'s rollout") as promote:
            await agent.promote(name, "2.0.0")
        assert isinstance(promote.value.__cause__, NatsTimeoutError)

        js = agent.js
        forged = CODEC.encode(ModelRollout(name=name, type="accel", current="9.9.9"))
        outcomes = await asyncio.gather(
            agent.rollouts.put(name, forged),
            js.purge_stream("OBJ_FB_MODELS"),
            js.purge_stream("KV_FB_ROLLOUTS"),
            js.delete_msg("OBJ_FB_MODELS", 1),
            js.delete_stream("KV_FB_ROLLOUTS"),
            js.update_stream(
                StreamConfig(name="OBJ_FB_MODELS", subjects=["$O.FB_MODELS.>", "fb.stolen.>"])
            ),
            js.add_stream(StreamConfig(name="FB_SHADOW", subjects=["fb.shadow.*"])),
            return_exceptions=True,
        )
        assert all(isinstance(o, NatsTimeoutError) for o in outcomes), outcomes
        refused = [
            '"$o.fb_models.c.',  # the new version's first chunk
            f'"$kv.fb_rollouts.{name}"',
            '"$js.api.stream.purge.obj_fb_models"',
            '"$js.api.stream.purge.kv_fb_rollouts"',
            '"$js.api.stream.msg.delete.obj_fb_models"',
            '"$js.api.stream.delete.kv_fb_rollouts"',
            '"$js.api.stream.update.obj_fb_models"',
            '"$js.api.stream.create.fb_shadow"',
        ]
        await eventually(
            lambda: all(any(f"permissions violation for publish to {s}" in e for e in errors)
                        for s in refused),
            what="a permissions violation for each attempt",
            state=lambda: errors,
        )  # fmt: skip
    finally:
        await nc.close()

    assert await writer.rollout(name) == before
    assert await writer.catalog() == catalog
    after = await writer.js.stream_info("OBJ_FB_MODELS")
    assert (after.state.messages, after.config.subjects) == (
        models_info.state.messages,
        models_info.config.subjects,
    )


async def test_the_pipeline_runs_with_an_agent_following_the_registry_under_role_credentials(
    as_role: OpenAs, basicmotions: SensorDataset, secured_server: EmbeddedServer
) -> None:
    """Every component with its own user, the accel agent serving `store:accel-follow` as
    `fusebus agent --model store:NAME` does: windows are decided by the version the rollout
    names; after the models user promotes a new version and shadows the old one, the agent
    switches, later decisions name the new version, its shadow outputs are stored, and
    `fusebus models compare` reads them as the models user."""
    name = "accel-follow"
    writer = await writable_registry(as_role)
    data, card = MODEL.read_bytes(), accel_card()
    await writer.put(name, "v1", data, file_name="accel.tflite", card=card)
    await writer.put(name, "v2", data, file_name="accel.tflite", card=card)

    waiting = TopologySettings(manage=False)
    coordinator = await Coordinator(
        await as_role("coordinator"),
        plans=PlanBook(default=basicmotions_plan()),
        subjects=SUBJECTS,
        topology=TopologySettings(),
    ).start()
    components: list[Any] = [coordinator]
    try:
        agent_nc = await as_role("agent")
        follower = RegistryFollower(await read_only_registry(agent_nc), [name])
        accel = AgentRuntime(
            Lineup.ranked(await follower.initial()), agent_nc, subjects=SUBJECTS, topology=waiting
        )
        await accel.start()
        accel.adopt(follower.follow(accel))
        components.append(accel)
        gyro = ModelAgent(models_dir() / "gyro.tflite")
        components.append(
            await AgentRuntime(
                Lineup.ranked([Choice.of(gyro, "gyro")]),
                await as_role("agent"),
                subjects=SUBJECTS,
                topology=waiting,
            ).start()
        )
        components.append(
            await FusionAgent(await as_role("fusion"), subjects=SUBJECTS, topology=waiting).start()
        )
        reader = await as_role("reader")
        sensor = Producer(await as_role("sensor"), SUBJECTS)

        async def replay(stream: str) -> list[Decision]:
            """Five windows of a stream, sent by the sensor user; their decisions."""
            decisions = await Collector(Decision).start_stream(reader, SUBJECTS.decision(stream))
            schedule, _ = chunk_schedule(
                basicmotions,
                streams=[stream],
                speed=200,
                chunk_ms=1000,
                start_ns=aligned_start_ns(basicmotions),
                limit=5,
            )
            await send_schedule(sensor, schedule)
            return await decisions.wait_for(5)

        before = await replay("before")
        assert {(d.status, d.models.get("accel")) for d in before} == {
            ("complete", "accel-follow@v1")
        }

        await writer.promote(name, "v2")
        await writer.shadow(name, "v1")
        await eventually(
            lambda: (
                accel.lineup.choices[0].describe()
                == {"model": "accel-follow@v2", "shadow": "accel-follow@v1"}
            ),
            what="the agent serving v2 with v1 in shadow",
            state=lambda: (accel.lineup.choices[0].describe(), follower),
        )
        after = await replay("after")
        assert {(d.status, d.models.get("accel")) for d in after} == {
            ("complete", "accel-follow@v2")
        }
        await eventually(
            lambda: accel.counts["shadow_rows"] >= 5,
            what="the shadow outputs of the five windows stored",
            state=lambda: dict(accel.counts),
        )
        assert accel.counts["shadow_lost"] == 0
    finally:
        for component in reversed(components):
            await component.stop()

    models_js = (await as_role("models")).jetstream()
    shadows = [
        CODEC.decode(stored.data, ShadowBatch)
        async for stored in iter_stored(models_js, SUBJECTS.shadow_stream, SUBJECTS.shadow(name))
    ]
    assert {(b.current.version, b.shadow.version) for b in shadows} == {("v2", "v1")}
    assert sum(len(b) for b in shadows) >= 5
    compared = await fusebus_models(secured_server.url, "compare", name)
    assert "accel-follow@v1 vs accel-follow@v2: " in compared, compared
