"""The fusion agent and its strategies."""

from typing import TYPE_CHECKING, Any

from agents.fusion.strategies import (
    STRATEGIES,
    Fused,
    FusionSpec,
    KOfN,
    MajorityVote,
    MaxConfidence,
    Mean,
    Strategy,
    ThresholdAlarm,
    Vote,
    WeightedMean,
    aligned,
    make_strategy,
)

if TYPE_CHECKING:
    from agents.fusion.service import FusionAgent, FusionSettings

__all__ = [
    "STRATEGIES",
    "Fused",
    "FusionAgent",
    "FusionSettings",
    "FusionSpec",
    "KOfN",
    "MajorityVote",
    "MaxConfidence",
    "Mean",
    "Strategy",
    "ThresholdAlarm",
    "Vote",
    "WeightedMean",
    "aligned",
    "make_strategy",
]


def __getattr__(name: str) -> Any:
    # The service brings the bus (nats, structlog) with it, so it loads only when asked
    # for: the strategies import on their own.
    if name in ("FusionAgent", "FusionSettings"):
        from agents.fusion import service

        return getattr(service, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
