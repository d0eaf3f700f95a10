"""The agents a config's ``[agents]`` table names: built, described, and checked against the
plan they serve, before ``fusebus up`` or ``fusebus eval`` starts anything.

A mistake in the table (a model whose card reads another sensor than the plan gives its
type, a head reading an upstream the plan does not list, features where fusion needs
scores, shapes that do not meet) is one :class:`~schemas.ConfigError` naming the file, the
``agents.<type>`` key and what does not fit, instead of subtasks answered with errors.
"""

from __future__ import annotations

from dataclasses import dataclass

from agents import ModelAgent, ModelCard
from agents.base import Agent, output_of
from agents.loading import load_agent
from coordinator import Plan
from fusebus.config import AgentEntry, Deployment
from schemas import ConfigError, FusebusError, InputSpec, OutputKind


@dataclass(frozen=True)
class Served:
    """What an ``[agents]`` entry serves, as far as the checks need: its inputs and answer."""

    type: str
    inputs: tuple[InputSpec, ...]
    output: OutputKind
    output_shape: tuple[int, ...]  # per row: (len(labels),) for scores

    @classmethod
    def of_agent(cls, agent: Agent) -> Served:
        """What a built agent serves."""
        output, shape = output_of(agent)
        return cls(agent.type, agent.inputs, output, shape)

    @classmethod
    def of_card(cls, type_name: str, card: ModelCard) -> Served:
        """What a model serves, from its card alone (the model is not loaded)."""
        shape = card.output_shape if card.output == "features" else (len(card.labels),)
        return cls(type_name, card.inputs, card.output, shape)


def build_agent(entry: AgentEntry, *, source: str) -> Agent:
    """The agent an entry names, serving the entry's type.

    Raises:
        ConfigError: naming ``source``, the entry's key and why it cannot be built.
    """
    try:
        if entry.model is not None:
            return ModelAgent(entry.model, type_name=entry.type)
        assert entry.agent is not None  # the config allows a model or an agent
        return load_agent(entry.agent, {**entry.params, "type": entry.type})
    except FusebusError as exc:
        raise ConfigError(f"{source}: agents.{entry.type}: {exc}") from None


def describe(entry: AgentEntry, *, source: str) -> Served:
    """What an entry serves without loading a model (its card says); an agent class is built.

    Raises:
        ConfigError: naming ``source`` and the entry's key.
    """
    if entry.model is None:
        return Served.of_agent(build_agent(entry, source=source))
    try:
        card = ModelCard.for_model(entry.model)
    except FusebusError as exc:
        raise ConfigError(f"{source}: agents.{entry.type}: {exc}") from None
    return Served.of_card(entry.type, card)


def agent_command(entry: AgentEntry) -> list[str]:
    """The ``fusebus agent`` arguments that serve an entry in a process of its own."""
    if entry.model is not None:
        return ["agent", "--model", str(entry.model), "--type", entry.type]
    assert entry.agent is not None
    params = [arg for key, value in entry.params.items() for arg in ("--param", f"{key}={value}")]
    return ["agent", "--agent", entry.agent, "--type", entry.type, *params]


def plan_for(deployment: Deployment, stream: str) -> tuple[Plan, str]:
    """The plan of ``stream`` and its key in the file (``default``, ``streams.<id>``).

    Raises:
        ConfigError: no plan applies to the stream.
    """
    plan = deployment.plans.for_stream(stream)
    if plan is None:
        raise ConfigError(
            f"{deployment.source}: no plan for the stream {stream!r}: add a [default] plan "
            f"or [streams.{stream}]"
        )
    return plan, f"streams.{stream}" if stream in deployment.plans.plans else "default"


def check_lineup(deployment: Deployment, served: dict[str, Served], *, stream: str) -> None:
    """Check that the served agents fit the plan of ``stream``: each reads only the sensors
    its subtask is given, and every upstream type it cannot run without is one the plan
    lists as required (an optional input the plan does not list is given as absent), reads
    the shape its upstream answers, and every fused type answers scores.

    Raises:
        ConfigError: the first misfit, naming the file and ``agents.<type>``.
    """
    plan, key = plan_for(deployment, stream)
    fused = set(plan.fused)
    for spec in plan.subtasks:
        agent = served.get(spec.type)
        if agent is None:
            continue
        where = f"{deployment.source}: agents.{spec.type}"
        for i in agent.inputs:
            if not i.stage:
                if i.sensor not in spec.sensors:
                    given = ", ".join(spec.sensors) or "no sensor"
                    raise ConfigError(
                        f"{where}: reads the sensor {i.sensor!r}, but {key}.subtasks."
                        f"{spec.type} gives it {given}"
                    )
                continue
            if i.sensor not in spec.upstream:
                if i.optional:
                    continue  # the agent runs without it, as it was made to
                raise ConfigError(
                    f"{where}: needs the answers of {i.sensor!r} (its input is not optional), "
                    f"which {key}.subtasks.{spec.type}.after does not list"
                )
            if not i.optional and i.sensor in spec.optional_upstream:
                raise ConfigError(
                    f"{where}: cannot run without {i.sensor!r} (its input is not optional), "
                    f"but {key}.subtasks.{spec.type}.after makes it optional"
                )
            upstream = served.get(i.sensor)
            if upstream is not None and not _fits(i.shape, upstream.output_shape):
                raise ConfigError(
                    f"{where}: reads {i.sensor!r} as per-row shape {list(i.shape)}, but "
                    f"agents.{i.sensor} answers {list(upstream.output_shape)}"
                )
        if spec.type in fused and agent.output == "features":
            raise ConfigError(
                f"{where}: answers features, which fusion cannot vote with, and {key} fuses "
                f"{spec.type!r} (let another type read it, or leave it out of fuse)"
            )


def _fits(wanted: tuple[int, ...], given: tuple[int, ...]) -> bool:
    """Whether an input of shape ``wanted`` (0: any size, ``()``: any shape) takes ``given``."""
    if not wanted:
        return True
    return len(wanted) == len(given) and all(
        w in (0, g) for w, g in zip(wanted, given, strict=True)
    )
