"""Plans files: what a valid one gives, and the one-line error of a bad one."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from fusebus.config import load_deployment, parse_deployment
from schemas import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_example_plans_file_loads() -> None:
    """The shipped example gives a default plan and a stream plan that inherits from it."""
    deployment = load_deployment(ROOT / "examples" / "plans.toml")
    default = deployment.plans.default
    assert default is not None
    assert default.types == ("accel", "gyro", "motion")
    assert default.window is not None and default.window.size_ms == 10000
    assert [(s.name, s.required) for s in default.sensors] == [("accel", True), ("gyro", False)]
    patient = deployment.plans.for_stream("patient-7")
    assert patient is not None and patient.overflow == "block" and patient.max_inflight == 20
    assert patient.types == default.types and patient.deadline_ms == 2000
    spec = deployment.fusion_by_stream["patient-7"]
    assert (spec.strategy, spec.target, spec.k) == ("k_of_n", "running", 2)
    assert deployment.fusion_default.strategy == "weighted_mean"
    assert deployment.plans.for_stream("anyone-else") is default


def test_channel_selection_and_auto_types() -> None:
    """Inputs can pick channels of a sensor, and a plan can add discovered types."""
    deployment = parse_deployment(
        {
            "default": {
                "types": "auto",
                "subtasks": {"accel": {"sensors": [{"sensor": "watch", "channels": [0, 1, 2]}]}},
            }
        }
    )
    plan = deployment.plans.default
    assert plan is not None and plan.auto
    assert plan.subtasks[0].inputs[0].channels == (0, 1, 2)


def test_a_subtask_can_pin_its_model() -> None:
    deployment = parse_deployment(
        {"default": {"subtasks": {"accel": {"sensors": ["accel"], "model": "accel-small"}}}}
    )
    plan = deployment.plans.default
    assert plan is not None and plan.subtasks[0].model == "accel-small"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({}, "needs a [default] plan"),
        ({"defaults": {}}, "unknown key 'defaults'"),
        (
            {"default": {"deadline": 5, "subtasks": {"a": {"sensors": ["a"]}}}},
            "default: unknown key 'deadline'",
        ),
        (
            {"default": {"deadline_ms": -5, "subtasks": {"a": {"sensors": ["a"]}}}},
            "default: deadline_ms must be > 0",
        ),
        (
            {"default": {"deadline_ms": "soon", "subtasks": {"a": {"sensors": ["a"]}}}},
            "default.deadline_ms: must be a number",
        ),
        (
            {"default": {"overflow": "panic", "subtasks": {"a": {"sensors": ["a"]}}}},
            "overflow must be one of",
        ),
        (
            {"default": {"subtasks": {"a": {"sensors": []}}}},
            "subtasks.a: subtask 'a' reads no sensor",
        ),
        ({"default": {"subtasks": {"a.b": {"sensors": ["x"]}}}}, "contains '.'"),
        (
            {
                "default": {
                    "subtasks": {"a": {"sensors": ["x"]}},
                    "window": {"size_ms": 0, "hop_ms": 1, "rate_hz": 10},
                }
            },
            "default.window: window size_ms",
        ),
        (
            {"default": {"subtasks": {"a": {"sensors": ["x"]}}, "sensors": {"y": {}}}},
            "reads undeclared sensors ['x']",
        ),
        (
            {"default": {"subtasks": {"a": {"sensors": ["x"]}}, "fusion": {"strategy": "magic"}}},
            "default.fusion: unknown fusion strategy 'magic'",
        ),
        (
            {
                "default": {
                    "subtasks": {"a": {"sensors": ["x"]}},
                    "fusion": {"strategy": "threshold"},
                }
            },
            "needs a target label",
        ),
        (
            {"default": {"subtasks": {"a": {"sensors": ["x"]}}, "fusion": {"weights": {"a": 0}}}},
            "weight of 'a' must be > 0",
        ),
        (
            {"streams": {"s1": {"max_inflight": 0, "subtasks": {"a": {"sensors": ["x"]}}}}},
            "streams.s1: max_inflight must be >= 1",
        ),
        ({"default": {"types": ["a"]}}, 'only "auto" is allowed'),
        (
            {
                "default": {
                    "subtasks": {"a": {"sensors": ["x"]}},
                    "window": {"size_ms": 1, "hop_ms": 1},
                }
            },
            "default.window: missing key 'rate_hz'",
        ),
        (
            {"default": {"subtasks": {"a": {"sensors": ["x"]}, "b": {"after": ["c"]}}}},
            "subtask 'b' reads the answers of 'c', which the plan does not list",
        ),
        (
            {
                "default": {
                    "subtasks": {
                        "a": {"sensors": ["x"]},
                        "b": {"after": ["a", "c"]},
                        "c": {"after": ["b"]},
                    }
                }
            },
            "the plan's stages form a cycle: b -> c -> b",
        ),
        (
            {"default": {"subtasks": {"a": {"sensors": ["x"], "after": ["a"]}}}},
            "subtask 'a' reads its own answers",
        ),
        (
            {
                "default": {
                    "subtasks": {"x": {"sensors": ["s"]}, "b": {"sensors": ["x"], "after": ["x"]}}
                }
            },
            "subtask 'b' names the input 'x' twice",
        ),
        (
            {"default": {"subtasks": {"a": {"sensors": ["x"]}}, "fuse": ["z"]}},
            "default: fuse names 'z', which the plan does not list",
        ),
        (
            {"default": {"subtasks": {"a": {"sensors": ["x"]}, "b": {"after": "a"}}}},
            "default.subtasks.b.after: must be a list",
        ),
        (
            {
                "default": {
                    "subtasks": {
                        "a": {"sensors": ["x"]},
                        "b": {"after": [{"type": "a", "optional": "yes"}]},
                    }
                }
            },
            "default.subtasks.b.after: optional must be true or false",
        ),
        (
            {"default": {"subtasks": {"a": {"sensors": ["x"]}, "b": {"after": [{"kind": "a"}]}}}},
            "default.subtasks.b.after: unknown key 'kind'",
        ),
        (
            {"default": {"subtasks": {"a": {"sensors": ["x"], "model": ""}}}},
            "default.subtasks.a.model: must name a model",
        ),
        (
            {"default": {"subtasks": {"a": {"sensors": ["x"], "model": 3}}}},
            "default.subtasks.a.model: must name a model",
        ),
        (
            {"default": {"subtasks": {"a": {"sensors": ["x"], "model": "a.b"}}}},
            "default.subtasks.a: pinned model 'a.b' contains '.'",
        ),
    ],
)
def test_bad_plans_name_the_key_and_the_problem(doc: dict[str, object], message: str) -> None:
    """Each mistake gives one ConfigError that says where it is and what is wrong."""
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        parse_deployment(doc, source="plans.toml")
    assert str(caught.value).startswith("plans.toml")
    assert "\n" not in str(caught.value)


def test_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    """A missing file and a file that is not TOML are reported with their path."""
    with pytest.raises(ConfigError, match="does not exist"):
        load_deployment(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[default\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_deployment(bad)


def test_fusion_precedence_is_stream_table_then_flag_then_config_default() -> None:
    """A stream's own fusion table wins; then --strategy; then [default.fusion]; then
    weighted_mean."""
    from agents.fusion import FusionSpec
    from fusebus.commands import fusion_precedence
    from fusebus.config import parse_deployment

    deployment = parse_deployment(
        {
            "default": {
                "subtasks": {"accel": {"sensors": ["accel"]}},
                "fusion": {"strategy": "mean"},
            },
            "streams": {"s1": {"fusion": {"strategy": "max_confidence"}}},
        }
    )
    flag = FusionSpec(strategy="majority_vote")
    fallback = FusionSpec()
    default, streams = fusion_precedence(flag, deployment, fallback=fallback)
    assert default.strategy == "majority_vote" and streams["s1"].strategy == "max_confidence"
    default, streams = fusion_precedence(None, deployment, fallback=fallback)
    assert default.strategy == "mean" and streams["s1"].strategy == "max_confidence"
    default, streams = fusion_precedence(None, None, fallback=fallback)
    assert default.strategy == "weighted_mean" and streams == {}


def test_topology_table_and_its_precedence_under_flags_and_variables(tmp_path: Path) -> None:
    """[topology] sets replicas, storage and placement; a flag (or the FUSEBUS_* variable
    that is its default) wins over the file; bad values name the key."""
    import argparse

    from fusebus.commands import _topology

    doc = {"default": {"subtasks": {"accel": {"sensors": ["accel"]}}}}
    deployment = parse_deployment(
        {**doc, "topology": {"replicas": 3, "storage": "memory", "placement_tags": ["ssd"]}}
    )
    assert deployment.topology == {"replicas": 3, "storage": "memory", "placement_tags": ("ssd",)}
    args = argparse.Namespace(
        manage_topology=True, partitions=1, replicas=None, storage=None,
        placement_tags=None, placement_cluster=None,
    )  # fmt: skip
    from_file = _topology(args, deployment)
    assert (from_file.replicas, from_file.storage, from_file.placement_tags) == (
        3,
        "memory",
        ("ssd",),
    )
    flagged = _topology(argparse.Namespace(**{**vars(args), "replicas": 5}), deployment)
    assert flagged.replicas == 5 and flagged.storage == "memory"
    assert _topology(args).replicas == 1 and _topology(args).storage is None
    for table, message in (
        ({"replicas": 0}, "topology.replicas: must be an integer 1 to 5"),
        ({"storage": "disk"}, 'topology.storage: must be "file" or "memory"'),
        ({"placement_tags": "ssd"}, "topology.placement_tags: must be a list"),
        ({"copies": 3}, "copies"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_deployment({**doc, "topology": table})


def test_a_chain_plan_reads_its_stages_and_what_it_fuses() -> None:
    """``after`` entries become required or optional upstream types; by default the fused
    types are those no other type reads, and ``fuse`` adds read ones."""
    doc: dict[str, Any] = {
        "default": {
            "subtasks": {
                "enc": {"sensors": ["accel"]},
                "stats": {"sensors": ["accel"]},
                "head": {"after": ["enc", {"type": "stats", "optional": True}]},
            }
        }
    }
    plan = parse_deployment(doc).plans.default
    assert plan is not None and plan.chained
    head = plan.subtasks[2]
    assert (head.required_upstream, head.optional_upstream) == (("enc",), ("stats",))
    assert plan.fused == ("head",)
    doc["default"]["fuse"] = ["stats"]
    fused = parse_deployment(doc).plans.default
    assert fused is not None and fused.fused == ("stats", "head")
