"""Agents that ship with fusebus and need no model file."""

from agents.builtin.features import EnergyBandsHead, SmoothingStage, WindowStatsStage
from agents.builtin.motion import MotionEnergyAgent

__all__ = ["EnergyBandsHead", "MotionEnergyAgent", "SmoothingStage", "WindowStatsStage"]
