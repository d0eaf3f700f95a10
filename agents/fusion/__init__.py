"""The fusion agent and its strategies."""

from agents.fusion.service import FusionAgent, FusionSettings
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
