"""Agents: the runtime that serves them, model runtimes, the model agent, fusion and training.

TensorFlow is imported only by :mod:`agents.runtimes.keras` and :mod:`agents.training`.
"""

from agents.base import Agent
from agents.model_agent import ModelAgent
from agents.model_card import ModelCard
from agents.runtime import AgentRuntime, AgentSettings, new_agent_id

__all__ = ["Agent", "AgentRuntime", "AgentSettings", "ModelAgent", "ModelCard", "new_agent_id"]
