"""Agents that ship with fusebus and need no model file."""

from agents.builtin.motion import MotionEnergyAgent

__all__ = ["MotionEnergyAgent"]
