"""Agents: the runtime that serves them, model runtimes, the model agent, fusion and training.

TensorFlow is imported only by :mod:`agents.runtimes.keras`, :mod:`agents.training`,
:mod:`agents.chain_training` and :mod:`agents.selection_training`.
"""

from typing import TYPE_CHECKING, Any

from agents.base import Agent
from agents.model_agent import ModelAgent
from agents.model_card import ModelCard

if TYPE_CHECKING:
    from agents.runtime import AgentRuntime, AgentSettings, new_agent_id

__all__ = ["Agent", "AgentRuntime", "AgentSettings", "ModelAgent", "ModelCard", "new_agent_id"]


def __getattr__(name: str) -> Any:
    # The runtime brings the bus (nats, structlog) with it, so it loads only when asked for:
    # an agent class and its model import on their own.
    if name in ("AgentRuntime", "AgentSettings", "new_agent_id"):
        from agents import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
