"""The coordinator: plans, the pure task tracker and the service that runs them."""

from coordinator.plan import Plan, PlanBook, SensorInput, SubtaskSpec, basicmotions_plan
from coordinator.service import Coordinator, CoordinatorSettings
from coordinator.tracker import Ended, OpenTask, Seen, TaskTracker

__all__ = [
    "Coordinator",
    "CoordinatorSettings",
    "Ended",
    "OpenTask",
    "Plan",
    "PlanBook",
    "Seen",
    "SensorInput",
    "SubtaskSpec",
    "TaskTracker",
    "basicmotions_plan",
]
