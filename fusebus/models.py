"""``fusebus models``: the registry from the command line (put, list, roll out, compare).

The pure parts (the listing table, the comparison of shadow outputs) are functions of what
the registry and the shadow stream hold, so that they are tested without a server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agents.base import stand_in_problem
from agents.model_card import ModelCard
from agents.model_check import check_model_file
from agents.serving import share_text
from bus import Subjects, TopologySettings, connect, iter_stored
from bus.registry import ModelRegistry, StoredModel, check_model_name, check_version
from bus.types import Connection
from schemas import CODEC, BusError, ConfigError, ModelRollout, SchemaError, ShadowBatch

_VERSION_FROM_CARD = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class Agreement:
    """How often a shadow version's top label agreed with the current version's."""

    current: str  # name@version
    shadow: str
    rows: int
    agreed: int
    mean_abs_diff: float  # mean absolute difference of their scores

    @property
    def share(self) -> float:
        """The share of rows on which they agreed."""
        return self.agreed / self.rows if self.rows else 0.0


@dataclass
class Comparison:
    """What ``models compare`` reports: agreement by version pair, and accuracy on a
    labelled dataset by version, where one was given."""

    name: str
    agreements: list[Agreement] = field(default_factory=list)
    accuracy: dict[str, float] = field(default_factory=dict)  # version -> accuracy
    dataset: str = ""
    unreadable: int = 0  # shadow messages that did not decode


def agreements(batches: Iterable[ShadowBatch]) -> list[Agreement]:
    """Agreement of every (current, shadow) version pair seen in ``batches``, counting each
    subtask once (a redelivered batch is shadowed again)."""
    seen: dict[tuple[str, str], set[str]] = {}
    agreed: Counter[tuple[str, str]] = Counter()
    diffs: dict[tuple[str, str], float] = {}
    for batch in batches:
        key = (batch.current.label, batch.shadow.label)
        rows = seen.setdefault(key, set())
        top_current = np.argmax(batch.current_outputs.reshape(len(batch), -1), axis=1)
        top_shadow = np.argmax(batch.shadow_outputs.reshape(len(batch), -1), axis=1)
        diff = np.abs(batch.current_outputs - batch.shadow_outputs).reshape(len(batch), -1)
        for i, task_id in enumerate(batch.task_ids):
            if task_id in rows:
                continue
            rows.add(task_id)
            agreed[key] += int(top_current[i] == top_shadow[i])
            diffs[key] = diffs.get(key, 0.0) + float(diff[i].mean())
    return [
        Agreement(
            current,
            shadow,
            len(rows),
            agreed[(current, shadow)],
            diffs[(current, shadow)] / len(rows),
        )
        for (current, shadow), rows in seen.items()
        if rows
    ]


def render_catalog(models: Sequence[StoredModel], rollouts: dict[str, ModelRollout]) -> str:
    """The ``models list`` table: one line per stored version, saying which serve how."""
    if not models and not rollouts:
        return "no models in the registry"
    lines = [
        f"{'name':<20} {'version':<12} {'type':<12} {'size':>9} {'stored':<20} {'serving':<16} digest"
    ]
    for model in models:
        rollout = rollouts.get(model.name)
        lines.append(
            f"{model.name:<20.20} {model.version:<12.12} {model.type:<12.12} {_size(model.size):>9} "
            f"{model.stored[:19]:<20} {_role(model.version, rollout):<16} {model.digest}"
        )
    return "\n".join(lines)


def _role(version: str, rollout: ModelRollout | None) -> str:
    if rollout is None:
        return ""
    if version == rollout.current:
        return "current"
    if version == rollout.canary:
        return f"canary {share_text(rollout.canary_share)}"
    if version == rollout.shadow:
        return "shadow"
    if rollout.previous and version == rollout.previous[-1]:
        return "previous"
    return ""


def _size(size: int) -> str:
    for unit in ("B", "KB", "MB"):
        if size < 1024 or unit == "MB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    return str(size)


def render_rollout(rollout: ModelRollout) -> str:
    """One line saying what a model's rollout now serves."""
    parts = [f"{rollout.name}: current {rollout.current}"]
    if rollout.canary:
        parts.append(f"canary {rollout.canary} ({share_text(rollout.canary_share)} of subtasks)")
    if rollout.shadow:
        parts.append(f"shadow {rollout.shadow}")
    if rollout.previous:
        parts.append(f"rollback to {rollout.previous[-1]}")
    return ", ".join(parts)


def render_comparison(comparison: Comparison) -> str:
    """The ``models compare`` report."""
    lines = [f"{comparison.name}: shadow outputs stored (the last 24 h), by pair of versions"]
    if not comparison.agreements:
        lines.append("  none stored yet (set a shadow with `fusebus models shadow NAME VERSION`)")
    for a in comparison.agreements:
        lines.append(
            f"  {a.shadow} vs {a.current}: {a.agreed}/{a.rows} subtasks agree ({a.share:.1%}), "
            f"mean |score difference| {a.mean_abs_diff:.4f}"
        )
    if comparison.unreadable:
        lines.append(f"  ({comparison.unreadable} shadow messages could not be read)")
    if comparison.accuracy:
        lines.append(f"accuracy on {comparison.dataset} TEST:")
        for version, value in comparison.accuracy.items():
            lines.append(f"  {comparison.name}@{version}: {value:.3f}")
    return "\n".join(lines)


# The commands ------------------------------------------------------------------------------
async def models_command(args: argparse.Namespace, bus: Any, topology: TopologySettings) -> int:
    """Run one ``fusebus models`` subcommand against the deployment at ``bus``."""
    nc = await connect(bus, name="models")
    try:
        try:
            registry = await ModelRegistry.open(
                nc.jetstream(), Subjects(bus.prefix), topology, create=args.action == "put"
            )
        except BusError:
            if args.action != "list":
                raise
            print("no models in the registry (it is made by the first `fusebus models put`)")
            return 0
        return await _ACTIONS[args.action](args, registry, nc)
    finally:
        await nc.drain()


async def _put(args: argparse.Namespace, registry: ModelRegistry, nc: Connection) -> int:
    path: Path = args.path
    agent, card, data = _read_model(path)
    name = check_model_name(path.stem if args.name is None else args.name)
    version = check_version(
        _VERSION_FROM_CARD.sub("-", agent.model.version) if args.version is None else args.version
    )
    serving = await registry.rollout(name)
    current = await registry.info(name, serving.current) if serving is not None else None
    if current is not None:
        serving_card = ModelCard.from_dict(
            current.card, where=f"the card of {name}@{current.version}"
        )
        problem = stand_in_problem(serving_card.interface, agent.card.interface)
        if problem:
            raise ConfigError(
                f"{path} cannot be a version of {name} (current: {current.version}): "
                f"{problem} (a model that reads or answers otherwise is a new model: put it "
                "under its own name)"
            )
    stored = await registry.put(name, version, data, file_name=path.name, card=card)
    rollout = await registry.rollout(name)
    print(
        f"stored {stored.name} version {stored.version} ({_size(stored.size)}, {stored.digest}) "
        f"for type {stored.type}"
    )
    if rollout is not None:
        print(render_rollout(rollout))
    return 0


def _read_model(path: Path) -> tuple[Any, dict[str, Any], bytes]:
    """The model at ``path``, checked (see :func:`check_model_file`), its card and bytes."""
    if path.suffix not in (".tflite", ".keras"):
        raise ConfigError(f"{path}: a model file is .tflite or .keras")
    agent = check_model_file(path)  # refuses, in one line, what could not serve
    card: dict[str, Any] = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    return agent, card, path.read_bytes()


async def _list(args: argparse.Namespace, registry: ModelRegistry, nc: Connection) -> int:
    models = await registry.catalog()
    names = dict.fromkeys(m.name for m in models)
    rollouts = {n: r for n in names if (r := await registry.rollout(n)) is not None}
    print(render_catalog(models, rollouts))
    return 0


async def _promote(args: argparse.Namespace, registry: ModelRegistry, nc: Connection) -> int:
    print(render_rollout(await registry.promote(args.name, args.version)))
    return 0


async def _rollback(args: argparse.Namespace, registry: ModelRegistry, nc: Connection) -> int:
    print(render_rollout(await registry.rollback(args.name)))
    return 0


async def _canary(args: argparse.Namespace, registry: ModelRegistry, nc: Connection) -> int:
    print(render_rollout(await registry.canary(args.name, args.version, args.share)))
    return 0


async def _shadow(args: argparse.Namespace, registry: ModelRegistry, nc: Connection) -> int:
    if args.off == bool(args.version):
        raise ConfigError("give the shadow's version, or --off to end it")
    print(render_rollout(await registry.shadow(args.name, "" if args.off else args.version)))
    return 0


async def _rm(args: argparse.Namespace, registry: ModelRegistry, nc: Connection) -> int:
    removed = await registry.remove(args.name, args.version)
    print(f"removed {args.name} version{'s' if len(removed) != 1 else ''} {', '.join(removed)}")
    rollout = await registry.rollout(args.name)
    if rollout is not None:  # what is left to serve and to roll back to
        print(render_rollout(rollout) + ("" if rollout.previous else ", nothing to roll back to"))
    return 0


async def _compare(args: argparse.Namespace, registry: ModelRegistry, nc: Connection) -> int:
    if args.versions and not args.dataset:
        raise ConfigError("--versions says which versions --dataset scores: give --dataset too")
    name = check_model_name(args.name)
    rollout = await registry.rollout(name)
    if rollout is None:
        raise ConfigError(f"no model {name!r} in the registry")
    comparison = Comparison(name)
    batches: list[ShadowBatch] = []
    async for stored in iter_stored(
        nc.jetstream(), registry.subjects.shadow_stream, registry.subjects.shadow(name)
    ):
        try:
            batches.append(CODEC.decode(stored.data, ShadowBatch))
        except SchemaError:
            comparison.unreadable += 1
    comparison.agreements = agreements(batches)
    if args.dataset:
        from fusebus.datasets import load_dataset

        dataset = load_dataset(args.dataset)
        versions = args.versions or [
            v for v in (rollout.current, rollout.shadow or rollout.canary) if v
        ]
        comparison.dataset = dataset.name
        for version in versions:
            comparison.accuracy[version] = await _accuracy(registry, name, version, dataset)
    print(render_comparison(comparison))
    return 0


async def _accuracy(registry: ModelRegistry, name: str, version: str, dataset: Any) -> float:
    """A stored version's accuracy on the dataset's TEST split, run here."""
    import tempfile

    stored = await registry.info(name, version)
    if stored is None:
        raise ConfigError(f"{name} has no stored version {version!r}")
    with tempfile.TemporaryDirectory(prefix="fusebus-compare-") as folder:
        path = Path(folder) / f"model{Path(stored.file_name).suffix}"
        await registry.download(stored, path)
        await asyncio.to_thread(
            path.with_suffix(".json").write_text, json.dumps(stored.card), encoding="utf-8"
        )
        return await asyncio.to_thread(_score, stored, path, dataset)


def _score(stored: StoredModel, path: Path, dataset: Any) -> float:
    """The accuracy of a stored version's file (at ``path``, its card beside it) on the
    dataset's TEST split."""
    name, version = stored.name, stored.version
    agent = check_model_file(path)
    x, y = dataset.split("test")
    inputs = {}
    for spec in agent.inputs:
        if spec.stage or spec.sensor not in dataset.sensors:
            raise ConfigError(
                f"{name}@{version} reads {spec.sensor!r}, which dataset {dataset.name!r} "
                "does not have"
            )
        inputs[spec.sensor] = dataset.sensor_view(x, spec.sensor).astype(np.float32)
    scores = agent.predict(inputs)
    labels = list(agent.labels)
    if set(labels) - set(dataset.labels):
        raise ConfigError(f"{name}@{version} answers labels the dataset does not have")
    predicted = [labels[i] for i in np.argmax(scores, axis=1)]
    truth = [dataset.labels[i] for i in y]
    return float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)]))


_ACTIONS = {
    "put": _put,
    "list": _list,
    "promote": _promote,
    "rollback": _rollback,
    "canary": _canary,
    "shadow": _shadow,
    "rm": _rm,
    "compare": _compare,
}
