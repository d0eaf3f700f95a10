"""The fusion agent and its strategies."""

from agents.fusion.service import FusionAgent, FusionSettings
from agents.fusion.strategies import (
    Fused,
    Mean,
    Strategy,
    Vote,
    WeightedMean,
    aligned,
    make_strategy,
)

__all__ = [
    "Fused",
    "FusionAgent",
    "FusionSettings",
    "Mean",
    "Strategy",
    "Vote",
    "WeightedMean",
    "aligned",
    "make_strategy",
]
