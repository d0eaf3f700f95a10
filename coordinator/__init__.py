"""The coordinator: plans, the pure task tracker and the service that runs them."""

from typing import TYPE_CHECKING, Any

from coordinator.directory import AgentDirectory, KnownType, chain_problems
from coordinator.plan import (
    BUILTIN_PLANS,
    Plan,
    PlanBook,
    SensorInput,
    StageInput,
    SubtaskSpec,
    auto_plan,
    basicmotions_plan,
    fused_types,
)
from coordinator.tracker import Ended, OpenTask, Seen, TaskTracker

if TYPE_CHECKING:
    from coordinator.service import Coordinator, CoordinatorSettings

__all__ = [
    "BUILTIN_PLANS",
    "AgentDirectory",
    "Coordinator",
    "CoordinatorSettings",
    "Ended",
    "KnownType",
    "OpenTask",
    "Plan",
    "PlanBook",
    "Seen",
    "SensorInput",
    "StageInput",
    "SubtaskSpec",
    "TaskTracker",
    "auto_plan",
    "basicmotions_plan",
    "chain_problems",
    "fused_types",
]


def __getattr__(name: str) -> Any:
    # The service brings the bus (nats, structlog) with it, so it loads only when asked
    # for: the pure parts above import on their own.
    if name in ("Coordinator", "CoordinatorSettings"):
        from coordinator import service

        return getattr(service, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
