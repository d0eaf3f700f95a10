"""Finding the agent to serve: a model file, a ``module:Class``, or a registered name.

Agents can be registered by any installed package under the entry-point group
``fusebus.agents``, for example in its ``pyproject.toml``::

    [project.entry-points."fusebus.agents"]
    motion = "agents.builtin.motion:MotionEnergyAgent"
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

from agents.base import Agent
from schemas import ConfigError

ENTRY_POINT_GROUP = "fusebus.agents"


def registered_agents() -> dict[str, str]:
    """Names registered in the ``fusebus.agents`` entry-point group, with their targets."""
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def resolve_agent_class(spec: str) -> type:
    """The class named by ``package.module:Class`` or by a registered entry-point name."""
    if ":" not in spec:
        registered = registered_agents()
        if spec not in registered:
            known = ", ".join(sorted(registered)) or "none"
            raise ConfigError(
                f"no agent registered as {spec!r} (registered: {known}); or give module:Class"
            )
        spec = registered[spec]
    module_name, _, class_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import agent module {module_name!r}: {exc}") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ConfigError(f"module {module_name!r} has no class {class_name!r}")
    return cls


def load_agent(spec: str, params: dict[str, str] | None = None) -> Agent:
    """Instantiate the agent class ``spec`` with keyword ``params`` and check it is an agent."""
    cls = resolve_agent_class(spec)
    try:
        agent: Any = cls(**(params or {}))
    except TypeError as exc:
        raise ConfigError(f"cannot create {cls.__name__} with {params or {}}: {exc}") from None
    missing = [
        a
        for a in ("type", "model", "runtime", "inputs", "labels", "weight", "predict", "warm_up")
        if not hasattr(agent, a)
    ]
    if missing:
        raise ConfigError(f"{cls.__name__} is not an agent: it lacks {', '.join(missing)}")
    return agent  # type: ignore[no-any-return]
