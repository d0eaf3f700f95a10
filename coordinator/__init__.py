"""The coordinator: plans, the pure task tracker and the service that runs them."""

from coordinator.directory import AgentDirectory, KnownType
from coordinator.plan import (
    BUILTIN_PLANS,
    Plan,
    PlanBook,
    SensorInput,
    SubtaskSpec,
    auto_plan,
    basicmotions_plan,
)
from coordinator.service import Coordinator, CoordinatorSettings
from coordinator.tracker import Ended, OpenTask, Seen, TaskTracker

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
    "SubtaskSpec",
    "TaskTracker",
    "auto_plan",
    "basicmotions_plan",
]
