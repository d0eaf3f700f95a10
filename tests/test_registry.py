"""The model registry across a real nats-server: versions, rollouts, agents that follow them."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from nats.aio.client import Client

from agents import AgentRuntime, AgentSettings
from agents.follow import start_agent
from agents.serving import Choice, Lineup
from bus import EmbeddedServer, Subjects, TopologySettings
from bus.registry import (
    ModelRegistry,
    first_rollout,
    promoted,
    rolled_back,
    with_canary,
    with_shadow,
)
from fusebus.models import agreements
from fusebus.paths import models_dir
from schemas import ConfigError, Decision, ModelError, Result, ShadowBatch
from tests.helpers import Collector, FrameFeeder, Pipeline, eventually, wait_for_agents

ROOT = Path(__file__).resolve().parent.parent
ACCEL = models_dir() / "accel.tflite"


def card_of(path: Path) -> dict[str, Any]:
    card: dict[str, Any] = json.loads(path.with_suffix(".json").read_text())
    return card


@pytest.fixture
async def registry(
    connect_bus: Callable[[str], Awaitable[Client]], subjects: Subjects
) -> ModelRegistry:
    nc = await connect_bus("models")
    return await ModelRegistry.open(nc.jetstream(), subjects, TopologySettings(), create=True)


async def put_accel(registry: ModelRegistry, *versions: str) -> None:
    for version in versions:
        await registry.put(
            "accel", version, ACCEL.read_bytes(), file_name=ACCEL.name, card=card_of(ACCEL)
        )


def versions_of(results: list[Result], type_name: str = "accel") -> list[str]:
    return [r.model.version for r in results if r.type == type_name]


# Rollout rules, without a server ------------------------------------------------------------
def test_promote_remembers_the_old_version_and_rollback_restores_it() -> None:
    rollout = first_rollout("accel", "accel", "1")
    two = promoted(rollout, "2")
    assert (two.current, two.previous) == ("2", ("1",))
    three = promoted(two, "3")
    assert rolled_back(three).current == "2"
    assert rolled_back(rolled_back(three)).current == "1"
    with pytest.raises(ConfigError, match="no earlier version"):
        rolled_back(rollout)


def test_promoting_the_canary_ends_the_canary_and_rollback_ends_any() -> None:
    canary = with_canary(first_rollout("accel", "accel", "1"), "2", 0.25)
    assert (canary.canary, canary.canary_share, canary.versions) == ("2", 0.25, ("1", "2"))
    done = promoted(canary, "2")
    assert (done.current, done.canary, done.canary_share) == ("2", "", 0.0)
    other = with_canary(promoted(canary, "3"), "2", 0.1)
    assert rolled_back(other).canary == ""
    shadowing_the_old = with_shadow(promoted(first_rollout("a", "a", "1"), "2"), "1")
    assert rolled_back(shadowing_the_old).shadow == ""  # it serves again
    with pytest.raises(ConfigError, match="already current"):
        with_canary(done, "2", 0.5)
    with pytest.raises(ConfigError, match="share"):
        with_canary(done, "4", 1.0)


def test_a_shadow_is_set_and_ended_and_ends_when_promoted() -> None:
    shadowed = with_shadow(first_rollout("accel", "accel", "1"), "2")
    assert shadowed.versions == ("1", "2")
    assert promoted(shadowed, "2").shadow == ""
    assert with_shadow(shadowed, "").shadow == ""
    with pytest.raises(ConfigError, match="already current"):
        with_shadow(shadowed, "1")


# The registry on the server ---------------------------------------------------------------
async def test_put_list_promote_rollback_and_rm(registry: ModelRegistry) -> None:
    await put_accel(registry, "1", "2")
    listed = await registry.catalog()
    assert [(m.name, m.version) for m in listed] == [("accel", "1"), ("accel", "2")]
    assert all(m.size == ACCEL.stat().st_size and m.digest.startswith("SHA-256=") for m in listed)
    assert listed[0].type == "accel" and listed[0].card["labels"] == card_of(ACCEL)["labels"]
    first = await registry.rollout("accel")
    assert first is not None and first.current == "1"  # the first version stored serves

    assert (await registry.promote("accel", "2")).current == "2"
    info, data = await registry.get("accel", "2")
    assert data == ACCEL.read_bytes() and info.file_name == "accel.tflite"
    assert (await registry.rollback("accel")).current == "1"

    with pytest.raises(ConfigError, match="already stored"):
        await put_accel(registry, "1")
    with pytest.raises(ConfigError, match="no stored version"):
        await registry.promote("accel", "9")
    with pytest.raises(ConfigError, match="is serving"):
        await registry.remove("accel", "1")
    assert await registry.remove("accel", "2") == ["2"]
    assert [m.version for m in await registry.catalog()] == ["1"]
    assert await registry.remove("accel") == ["1"]
    assert await registry.catalog() == [] and await registry.rollout("accel") is None


async def test_concurrent_changes_to_a_rollout_are_all_kept(registry: ModelRegistry) -> None:
    await put_accel(registry, "1", "2", "3")
    await asyncio.gather(registry.canary("accel", "2", 0.2), registry.shadow("accel", "3"))
    rollout = await registry.rollout("accel")
    assert rollout is not None
    assert (rollout.canary, rollout.shadow) == ("2", "3")


async def test_a_version_for_another_type_is_refused(registry: ModelRegistry) -> None:
    await put_accel(registry, "1")
    gyro = models_dir() / "gyro.tflite"
    with pytest.raises(ConfigError, match="serves type 'accel'"):
        await registry.put("accel", "2", gyro.read_bytes(), file_name=gyro.name, card=card_of(gyro))


# The command line -------------------------------------------------------------------------
def fusebus(*args: str, url: str, prefix: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fusebus", *args, "--nats-url", url, "--prefix", prefix],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "FUSEBUS_LOG_LEVEL": "warning"},
        cwd=ROOT,
    )


async def test_the_models_command_puts_lists_promotes_and_refuses_a_broken_file(
    nats_server: EmbeddedServer, subjects: Subjects, tmp_path: Path, connect_bus: Any
) -> None:
    await connect_bus("cleanup")  # so the streams the commands make are removed after
    url, prefix = nats_server.url, subjects.prefix

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return fusebus("models", *args, url=url, prefix=prefix)

    put = await asyncio.to_thread(run, "put", str(ACCEL), "--version", "1")
    assert put.returncode == 0, put.stderr
    assert "stored accel version 1" in put.stdout and "current 1" in put.stdout
    assert (await asyncio.to_thread(run, "put", str(ACCEL), "--version", "2")).returncode == 0

    broken = tmp_path / "accel.tflite"
    broken.write_bytes(b"not a flatbuffer" * 64)
    shutil.copy(ACCEL.with_suffix(".json"), broken.with_suffix(".json"))
    refused = await asyncio.to_thread(run, "put", str(broken), "--version", "3")
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1 and "cannot load" in refused.stderr

    lying = tmp_path / "wide" / "accel.tflite"  # its card says 6 channels; the model takes 3
    lying.parent.mkdir()
    shutil.copy(ACCEL, lying)
    card = card_of(ACCEL)
    card["inputs"][0]["channels"] = 6
    lying.with_suffix(".json").write_text(json.dumps(card))
    mismatch = await asyncio.to_thread(run, "put", str(lying), "--version", "4")
    assert mismatch.returncode == 2 and "6 channels, the model takes 3" in mismatch.stderr

    reversed_labels = tmp_path / "reversed" / "accel.tflite"
    reversed_labels.parent.mkdir()
    shutil.copy(ACCEL, reversed_labels)
    card = card_of(ACCEL)
    card["labels"] = card["labels"][::-1]
    reversed_labels.with_suffix(".json").write_text(json.dumps(card))
    relabelled = await asyncio.to_thread(run, "put", str(reversed_labels), "--version", "5")
    assert relabelled.returncode == 2 and "answers labels" in relabelled.stderr
    gyro = models_dir() / "gyro.tflite"
    other = tmp_path / "other" / "accel.tflite"  # a gyro model whose card claims type accel
    other.parent.mkdir()
    shutil.copy(gyro, other)
    other.with_suffix(".json").write_text(json.dumps({**card_of(gyro), "type": "accel"}))
    rewired = await asyncio.to_thread(run, "put", str(other), "--version", "6")
    assert rewired.returncode == 2 and "reads other inputs" in rewired.stderr
    empty = await asyncio.to_thread(run, "put", str(ACCEL), "--version", "")
    assert empty.returncode == 2 and "model version ''" in empty.stderr

    promote = await asyncio.to_thread(run, "promote", "accel", "2")
    assert (
        promote.returncode == 0
        and "current 2" in promote.stdout
        and "rollback to 1" in promote.stdout
    )
    listing = await asyncio.to_thread(run, "list")
    rows = {line.split()[1]: line for line in listing.stdout.splitlines()[1:]}
    assert set(rows) == {"1", "2"}  # the refused versions were never stored
    assert "current" in rows["2"] and "previous" in rows["1"]
    back = await asyncio.to_thread(run, "rollback", "accel")
    assert back.returncode == 0 and "current 1" in back.stdout
    bad_share = await asyncio.to_thread(run, "canary", "accel", "2", "150")
    assert bad_share.returncode == 2 and "canary share" in bad_share.stderr


# Agents that follow the registry ----------------------------------------------------------
@pytest.fixture
async def followers(
    connect_bus: Callable[[str], Awaitable[Client]], subjects: Subjects
) -> AsyncIterator[Callable[..., Awaitable[AgentRuntime]]]:
    """Start agent replicas that follow registry models; all are stopped at the end."""
    started: list[AgentRuntime] = []

    async def start(*names: str, files: tuple[Choice, ...] = (), **options: Any) -> AgentRuntime:
        nc = await connect_bus(f"agent-{len(started)}")
        runtime = await start_agent(nc, subjects=subjects, files=files, stored=names, **options)
        started.append(runtime)
        return runtime

    yield start
    await asyncio.gather(*(r.stop() for r in started), return_exceptions=True)


async def test_a_promotion_under_load_switches_every_replica_between_batches(
    registry: ModelRegistry,
    pipeline: Callable[..., Awaitable[Pipeline]],
    followers: Callable[..., Awaitable[AgentRuntime]],
    basicmotions: Any,
) -> None:
    await put_accel(registry, "1", "2")
    parts = await pipeline(agents=("gyro",))
    replicas = [await followers("accel") for _ in range(2)]
    results = await Collector(Result).start(parts.nc, parts.subjects.all_results())
    decisions = await Collector(Decision).start_stream(parts.nc, parts.subjects.all_decisions())
    feeder = FrameFeeder(parts.nc, parts.subjects, basicmotions, every_s=0.005).start()

    def answered(version: str) -> set[str]:
        return {
            r.agent_id for r in results.items if r.type == "accel" and r.model.version == version
        }

    await eventually(
        lambda: answered("1") == {r.agent_id for r in replicas}, what="both replicas answer with 1"
    )
    await registry.promote("accel", "2")
    await eventually(
        lambda: all(r.counts["switches"] == 1 for r in replicas), what="every replica switched"
    )
    await eventually(
        lambda: answered("2") == {r.agent_id for r in replicas}, what="both answer with 2"
    )
    sent = await feeder.stop()
    got = await decisions.wait_for(sent)
    await decisions.settle()

    assert len({d.task_id for d in decisions.items}) == len(decisions.items) == sent
    accel = [r for r in results.items if r.type == "accel"]
    per_task = Counter(r.task_id for r in accel)
    assert len(per_task) == sent and set(per_task.values()) == {1}  # none lost, none twice
    for replica in replicas:
        # What one replica published, in order: version 1 until its switch, then 2 only.
        served = versions_of([r for r in accel if r.agent_id == replica.agent_id])
        flip = served.index("2")
        assert set(served[:flip]) == {"1"} and set(served[flip:]) == {"2"}
        assert replica.lineup.preferred.model.version == "2"
        assert replica.stats()["serving"] == [{"name": "accel", "model": "accel@2"}]
    assert {d.models["accel"] for d in got} == {"accel@1", "accel@2"}
    assert {d.models["gyro"] for d in got} == {"basicmotions-gyro@1.0.0"}


async def test_a_replica_follows_every_change_promote_canary_shadow_and_rollback(
    registry: ModelRegistry, followers: Callable[..., Awaitable[AgentRuntime]]
) -> None:
    await put_accel(registry, "1", "2", "3")
    replica = await followers("accel")

    async def serves(wanted: dict[str, str]) -> None:
        await eventually(
            lambda: replica.stats()["serving"] == [{"name": "accel", **wanted}],
            what=f"the replica serving {wanted}",
            state=lambda: replica.stats()["serving"],
        )

    await registry.promote("accel", "2")
    await serves({"model": "accel@2"})
    await registry.canary("accel", "3", 0.2)
    await serves({"model": "accel@2", "canary": "accel@3 20%"})
    await registry.shadow("accel", "1")
    await serves({"model": "accel@2", "canary": "accel@3 20%", "shadow": "accel@1"})
    await registry.rollback("accel")  # back to 1; the canary ends, the shadow of 1 with it
    await serves({"model": "accel@1"})
    assert replica.counts["switches"] == 4


def serves_both(replica: AgentRuntime, version: str) -> bool:
    """Whether ``replica`` serves ``version`` of both accel-a and accel-b."""
    wanted = [{"name": n, "model": f"{n}@{version}"} for n in ("accel-a", "accel-b")]
    return sorted(replica.stats()["serving"], key=str) == wanted


async def test_two_models_of_one_replica_promoted_together_both_switch(
    registry: ModelRegistry,
    pipeline: Callable[..., Awaitable[Pipeline]],
    followers: Callable[..., Awaitable[AgentRuntime]],
    basicmotions: Any,
) -> None:
    """Changes to two models that wait for the same batch to end are both applied."""
    for name in ("accel-a", "accel-b"):
        for version in ("1", "2", "3"):
            await registry.put(
                name, version, ACCEL.read_bytes(), file_name=ACCEL.name, card=card_of(ACCEL)
            )
    parts = await pipeline(agents=("gyro",))
    replica = await followers("accel-a", "accel-b")
    feeder = FrameFeeder(parts.nc, parts.subjects, basicmotions, every_s=0.002).start()
    try:
        for version in ("2", "3"):
            await asyncio.gather(
                registry.promote("accel-a", version), registry.promote("accel-b", version)
            )
            await eventually(
                partial(serves_both, replica, version),
                what=f"both models serving {version}",
                state=lambda: replica.stats()["serving"],
            )
    finally:
        await feeder.stop()
    assert replica.counts["switches"] == 4


async def test_an_unreadable_rollout_is_skipped_and_the_next_one_followed(
    registry: ModelRegistry, followers: Callable[..., Awaitable[AgentRuntime]]
) -> None:
    import structlog

    await put_accel(registry, "1", "2", "3")
    replica = await followers("accel")

    def serving(version: str) -> bool:
        return replica.lineup.preferred.model.version == version

    await registry.promote("accel", "2")  # once followed, the replica's watch is live
    await eventually(lambda: serving("2"), what="the replica following the rollout")
    with structlog.testing.capture_logs() as logs:
        for junk in (b"\x00garbage", b"\x81\xa4kind\xa3bad", b""):
            await registry.rollouts.put("accel", junk)
        await eventually(
            lambda: sum(e["event"] == "model.bad_rollout" for e in logs) == 3,
            what="three unreadable rollouts said",
        )
    assert serving("2")  # still serving
    await registry.promote("accel", "3")  # the registry reads past them too
    await eventually(lambda: serving("3"), what="the next change followed")


async def test_a_version_that_does_not_load_is_not_switched_to(
    registry: ModelRegistry,
    pipeline: Callable[..., Awaitable[Pipeline]],
    followers: Callable[..., Awaitable[AgentRuntime]],
    basicmotions: Any,
) -> None:
    await put_accel(registry, "1")
    # Stored past the command's check, as a file corrupted in transit or a hand-made object.
    await registry.put("accel", "2", b"\x00" * 4096, file_name="accel.tflite", card=card_of(ACCEL))
    parts = await pipeline(agents=("gyro",))
    replica = await followers("accel")
    results = await Collector(Result).start(parts.nc, parts.subjects.all_results())
    await registry.promote("accel", "2")
    await eventually(lambda: "accel@2" in replica.refused, what="the broken version refused")
    assert "cannot load" in replica.refused["accel@2"]
    assert replica.stats()["refused"] == replica.refused

    late = await followers("accel")  # a replica starting now serves what the others serve
    assert late.lineup.preferred.model.version == "1" and "accel@2" in late.refused

    feeder = FrameFeeder(parts.nc, parts.subjects, basicmotions, every_s=0.01).start()
    await eventually(
        lambda: len(versions_of(results.items)) >= 20, what="answers after the refusal"
    )
    await feeder.stop()
    assert set(versions_of(results.items)) == {"1"}
    assert replica.counts["switches"] == 0 and replica.counts["errors"] == 0
    await registry.rollback("accel")  # 2 is no longer asked for: no longer reported
    await eventually(lambda: not replica.refused, what="the refusal forgotten")


async def test_shadow_outputs_go_to_the_shadow_subject_and_are_never_fused(
    registry: ModelRegistry,
    pipeline: Callable[..., Awaitable[Pipeline]],
    followers: Callable[..., Awaitable[AgentRuntime]],
    basicmotions: Any,
) -> None:
    await put_accel(registry, "1", "2")
    await registry.shadow("accel", "2")
    parts = await pipeline(agents=("gyro",))
    replica = await followers("accel")
    assert replica.stats()["serving"] == [
        {"name": "accel", "model": "accel@1", "shadow": "accel@2"}
    ]
    shadows = await Collector(ShadowBatch).start(parts.nc, parts.subjects.shadow("accel"))
    results = await Collector(Result).start(parts.nc, parts.subjects.all_results())
    decisions = await Collector(Decision).start_stream(parts.nc, parts.subjects.all_decisions())
    feeder = FrameFeeder(parts.nc, parts.subjects, basicmotions, every_s=0.01).start()
    await eventually(lambda: len(decisions.items) >= 30, what="30 decisions")
    sent = await feeder.stop()
    await decisions.wait_for(sent)

    assert set(versions_of(results.items)) == {"1"}
    assert {d.models.get("accel") for d in decisions.items} == {"accel@1"}
    await eventually(lambda: sum(map(len, shadows.items)) >= sent, what="a shadow row per subtask")
    (agreement,) = agreements(shadows.items)
    assert (agreement.current, agreement.shadow) == ("accel@1", "accel@2")
    # The same weights under two versions: their answers agree exactly.
    assert agreement.rows == sent and agreement.share == 1.0 and agreement.mean_abs_diff == 0.0
    assert replica.counts["shadow_rows"] >= sent and replica.counts["shadow_lost"] == 0


async def test_a_canary_answers_its_share_of_subtasks(
    registry: ModelRegistry,
    pipeline: Callable[..., Awaitable[Pipeline]],
    followers: Callable[..., Awaitable[AgentRuntime]],
    basicmotions: Any,
) -> None:
    await put_accel(registry, "1", "2")
    await registry.canary("accel", "2", 0.3)
    parts = await pipeline(agents=("gyro",))
    await followers("accel")
    results = await Collector(Result).start(parts.nc, parts.subjects.all_results())
    feeder = FrameFeeder(parts.nc, parts.subjects, basicmotions, every_s=0.002).start()
    await eventually(
        lambda: len(versions_of(results.items)) >= 400, what="400 answers", timeout_s=30
    )
    await feeder.stop()
    accel = [r for r in results.items if r.type == "accel"]
    share = sum(r.model.version == "2" for r in accel) / len(accel)
    # 3.5 standard deviations of a binomial share of 0.3 over 400 draws is 0.08.
    assert abs(share - 0.3) < 0.08, share
    assert {r.selection for r in accel if r.model.version == "2"} == {"canary"}
    assert {r.selection for r in accel if r.model.version == "1"} == {""}


# Choosing among models by deadline --------------------------------------------------------
class TimedAgent:
    """A real model (the shipped accel classifier) that also costs a fixed time per row,
    standing for a larger model: the backlog a test builds is then the same on any machine."""

    def __init__(self, name: str, *, ms_per_row: float, accuracy: float) -> None:
        from agents import ModelAgent

        inner = ModelAgent(ACCEL)
        self._inner = inner
        self.type, self.inputs, self.labels = inner.type, inner.inputs, inner.labels
        self.runtime, self.weight = inner.runtime, inner.weight
        from schemas import ModelRef

        self.model = ModelRef(name, "1")
        # What a card says of a model: its accuracy, and its cost as measured at training.
        metrics = {"val_accuracy": accuracy, "infer_ms_per_row": ms_per_row or 0.001}
        self.card = type("Card", (), {"metrics": metrics})()
        self.ms_per_row = ms_per_row

    def warm_up(self) -> None:
        self._inner.warm_up()

    def predict(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        import time

        rows = len(next(iter(batch.values())))
        time.sleep(rows * self.ms_per_row / 1e3)  # the larger model's cost, by construction
        return self._inner.predict(batch)


async def test_the_fast_model_answers_when_the_backlog_leaves_no_room(
    pipeline: Callable[..., Awaitable[Pipeline]],
    followers: Callable[..., Awaitable[AgentRuntime]],
    connect_bus: Callable[[str], Awaitable[Client]],
    basicmotions: Any,
) -> None:
    from coordinator.plan import Plan, SensorInput, SubtaskSpec

    plan = Plan(
        subtasks=(SubtaskSpec("accel", (SensorInput("accel"),)),),
        deadline_ms=1000,
    )
    parts = await pipeline(agents=(), plan=plan)
    large = TimedAgent("accel-large", ms_per_row=20.0, accuracy=0.99)
    small = TimedAgent("accel-small", ms_per_row=0.0, accuracy=0.9)
    replica = await followers(
        files=(Choice.of(small), Choice.of(large)), settings=AgentSettings(max_batch=16)
    )
    assert [c.name for c in replica.lineup.choices] == ["accel-large", "accel-small"]
    await wait_for_agents(parts.nc, parts.subjects.prefix, {"accel": 1})
    decisions = await Collector(Decision).start_stream(parts.nc, parts.subjects.all_decisions())
    results = await Collector(Result).start(parts.nc, parts.subjects.all_results())
    # A burst of 300 windows: the larger model alone would need 6 s for what the deadline
    # gives 1 s.
    feeder = FrameFeeder(parts.nc, parts.subjects, basicmotions, every_s=0.0).start()
    await eventually(lambda: feeder.sent >= 300, what="300 frames sent")
    sent = await feeder.stop()
    await decisions.wait_for(sent, timeout_s=60)

    by_model = Counter((r.model.name, r.selection) for r in results.items)
    fast = by_model[("accel-small", "backlog")] + by_model[("accel-small", "deadline")]
    assert fast > sent / 2, by_model  # most of the burst went to the fast model, saying why
    assert set(by_model) <= {
        ("accel-small", "backlog"),
        ("accel-small", "deadline"),
        ("accel-large", ""),
    }
    assert replica.selections["backlog"] + replica.selections["deadline"] == fast
    assert replica.counts["expired"] == 0
    assert all(d.status == "complete" for d in decisions.items)


async def run_pinned(
    pipeline: Callable[..., Awaitable[Pipeline]],
    followers: Callable[..., Awaitable[AgentRuntime]],
    basicmotions: Any,
    *,
    pin: str,
    serving: tuple[str, ...],
    decisions: int,
) -> tuple[list[Result], list[Decision]]:
    """Frames through a plan pinning ``pin``, answered by one replica serving ``serving``
    (cost-free stand-ins of the accel model); the results and decisions of the run."""
    from coordinator.plan import Plan, SensorInput, SubtaskSpec

    plan = Plan(
        subtasks=(SubtaskSpec("accel", (SensorInput("accel"),), model=pin),), deadline_ms=2000
    )
    parts = await pipeline(agents=(), plan=plan)
    choices = [TimedAgent(n, ms_per_row=0.0, accuracy=0.99 - i / 10) for i, n in enumerate(serving)]
    await followers(files=tuple(Choice.of(c) for c in choices))
    decided = await Collector(Decision).start_stream(parts.nc, parts.subjects.all_decisions())
    results = await Collector(Result).start(parts.nc, parts.subjects.all_results())
    feeder = FrameFeeder(parts.nc, parts.subjects, basicmotions, every_s=0.01).start()
    await eventually(lambda: len(decided.items) >= decisions, what=f"{decisions} decisions")
    await feeder.stop()
    return results.items, decided.items


async def test_a_plan_pins_the_model_that_answers(
    pipeline: Callable[..., Awaitable[Pipeline]],
    followers: Callable[..., Awaitable[AgentRuntime]],
    basicmotions: Any,
) -> None:
    results, decisions = await run_pinned(
        pipeline,
        followers,
        basicmotions,
        pin="accel-small",
        serving=("accel-large", "accel-small"),
        decisions=20,
    )
    assert {(r.model.name, r.selection) for r in results} == {("accel-small", "pinned")}
    assert {d.models["accel"] for d in decisions} == {"accel-small@1"}


async def test_a_pin_no_replica_serves_is_answered_with_an_error(
    pipeline: Callable[..., Awaitable[Pipeline]],
    followers: Callable[..., Awaitable[AgentRuntime]],
    basicmotions: Any,
) -> None:
    results, decisions = await run_pinned(
        pipeline, followers, basicmotions, pin="accel-huge", serving=("accel-small",), decisions=5
    )
    assert results and all(r.error is not None for r in results)
    assert {r.error.code for r in results if r.error} == {"pin_unserved"}
    assert {d.status for d in decisions} == {"failed"}


def test_a_lineup_refuses_a_model_that_reads_other_inputs() -> None:
    from agents import ModelAgent

    with pytest.raises(ConfigError, match="other inputs"):
        gyro = ModelAgent(models_dir() / "gyro.tflite", type_name="accel")
        Lineup((Choice.of(ModelAgent(ACCEL)), Choice.of(gyro)))


async def test_on_a_cluster_the_registry_has_the_deployments_replicas_and_survives_a_node(
    cluster_bus: Callable[[str], Awaitable[Client]],
    healthy_cluster: Any,
    subjects: Subjects,
) -> None:
    topology = TopologySettings(replicas=3)
    nc = await cluster_bus("models")
    js = nc.jetstream()
    registry = await ModelRegistry.open(js, subjects, topology, create=True)
    await put_accel(registry, "1", "2")
    for stream in (
        f"OBJ_{subjects.models_bucket}",
        f"KV_{subjects.rollouts_bucket}",
        subjects.shadow_stream,
    ):
        assert (await js.stream_info(stream)).config.num_replicas == 3, stream
    store = await js.stream_info(f"OBJ_{subjects.models_bucket}")
    assert store.cluster is not None and store.cluster.leader is not None
    healthy_cluster.node(store.cluster.leader).kill()

    reader = await cluster_bus("agent-accel")

    async def readable() -> bool:
        try:
            agents = await ModelRegistry.open(reader.jetstream(), subjects, topology)
            _, data = await agents.get("accel", "2")
            return data == ACCEL.read_bytes()
        except Exception:  # an election under way: ask again
            return False

    await eventually(readable, what="the model read after its leader died", timeout_s=30)

    async def promoted_2() -> bool:
        try:
            return (await registry.promote("accel", "2")).current == "2"
        except Exception:
            return False

    await eventually(promoted_2, what="a promotion after the election", timeout_s=30)


def test_a_canary_share_is_a_fraction_or_a_percent_with_its_sign(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from agents.serving import share_text
    from fusebus.cli import build_parser

    parser = build_parser()

    def share(text: str) -> float:
        return float(parser.parse_args(["models", "canary", "accel", "2", text]).share)

    assert share("0.1") == pytest.approx(0.1) and share("10%") == pytest.approx(0.1)
    assert share("0.5%") == pytest.approx(0.005) and share("0") == 0.0
    for bad in ("10", "1", "100%", "1.5", "half"):
        with pytest.raises(SystemExit) as exited:
            share(bad)
        assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("a canary share is a fraction") == 4 and "not a share: 'half'" in err
    assert [share_text(s) for s in (0.1, 0.005, 1 / 3, 0.00001)] == [
        "10%",
        "0.5%",
        "33.33%",
        "0.001%",
    ]


def test_the_directory_knows_which_models_every_replica_holds() -> None:
    from coordinator.directory import AgentDirectory
    from schemas import AgentInfo, InputSpec, ModelRef

    def replica(agent_id: str, *models: str) -> AgentInfo:
        return AgentInfo(
            agent_id=agent_id,
            type="accel",
            model=ModelRef(models[0], "1"),
            runtime="litert",
            inputs=(InputSpec("accel", 100, 3),),
            labels=("x",),
            models=models,
        )

    directory = AgentDirectory()
    directory.observe([replica("a", "accel"), replica("b", "accel-large", "accel-small")], 0.0)
    known = directory.by_type["accel"]
    assert "only some replicas" in known.pin_problem("accel-small")
    assert known.pin_problem("accel-huge") == "no replica of 'accel' holds model 'accel-huge'"
    directory.observe([replica("b", "accel-large", "accel-small")], 1.0)
    assert directory.by_type["accel"].pin_problem("accel-small") == ""


async def test_the_coordinator_warns_of_a_pin_some_replicas_cannot_answer(
    pipeline: Callable[..., Awaitable[Pipeline]],
    followers: Callable[..., Awaitable[AgentRuntime]],
) -> None:
    import structlog

    from coordinator.plan import Plan, SensorInput, SubtaskSpec

    plan = Plan(
        subtasks=(SubtaskSpec("accel", (SensorInput("accel"),), model="accel-small"),),
        deadline_ms=2000,
    )
    with structlog.testing.capture_logs() as logs:
        parts = await pipeline(agents=(), plan=plan)
        small = TimedAgent("accel-small", ms_per_row=0.0, accuracy=0.9)
        holder = await followers(files=(Choice.of(small),))
        assert holder.info.models == ("accel-small",)
        plain = await followers(files=(Choice.of(TimedAgent("accel", ms_per_row=0.0, accuracy=1)),))
        assert parts.coordinator is not None

        def warned() -> list[Any]:
            return [e for e in logs if e["event"] == "plan.pin_unserved"]

        await eventually(lambda: bool(warned()), what="the pin warning")
        assert "only some replicas of 'accel'" in warned()[0]["problem"]
        await plain.stop()
        await eventually(
            lambda: any(e["event"] == "plan.pin_served" for e in logs), what="the pin mended"
        )


class BrokenShadow(TimedAgent):
    """A shadow version that fails on real input (its warm-up passed)."""

    def predict(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        raise ModelError("the shadow cannot read this")


async def test_a_failing_shadow_never_costs_an_answer(
    pipeline: Callable[..., Awaitable[Pipeline]],
    followers: Callable[..., Awaitable[AgentRuntime]],
    basicmotions: Any,
) -> None:
    import structlog

    parts = await pipeline(agents=("gyro",))
    current = TimedAgent("accel", ms_per_row=0.0, accuracy=1.0)
    shadow = BrokenShadow("accel-next", ms_per_row=0.0, accuracy=1.0)
    with structlog.testing.capture_logs() as logs:
        replica = await followers(files=(Choice("accel", current, shadow=shadow),))
        decisions = await Collector(Decision).start_stream(parts.nc, parts.subjects.all_decisions())
        feeder = FrameFeeder(parts.nc, parts.subjects, basicmotions, every_s=0.01).start()
        await eventually(lambda: len(decisions.items) >= 20, what="20 decisions")
        sent = await feeder.stop()
        await decisions.wait_for(sent)
    assert {d.status for d in decisions.items} == {"complete"}
    assert replica.counts["shadow_failed"] >= 20 and replica.counts["errors"] == 0
    assert sum(e["event"] == "shadow.failed" for e in logs) == 1  # said once, not per batch


def test_model_folders_of_replicas_that_are_gone_are_swept(tmp_path: Path) -> None:
    import tempfile

    from agents import follow

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    root = Path(tempfile.gettempdir())
    dead = root / f"{follow.CACHE_PREFIX}{gone.pid}-test"
    alive = root / f"{follow.CACHE_PREFIX}{os.getppid()}-test"  # this test's parent runs
    for folder in (dead, alive):
        (folder / "accel" / "1").mkdir(parents=True, exist_ok=True)
    try:
        follow._sweep_caches()
        assert not dead.exists() and alive.exists()
    finally:
        shutil.rmtree(dead, ignore_errors=True)
        shutil.rmtree(alive, ignore_errors=True)
