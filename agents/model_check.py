"""Whether a model file can serve: it loads, warms up, and answers what its card says."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agents.model_agent import ModelAgent
from schemas import ConfigError, FusebusError


def check_model_file(path: Path, *, type_name: str | None = None) -> ModelAgent:
    """Load the model at ``path`` (its card beside it), warm it up and run it once on
    zeros, checking it answers one row of its card's output per input row.

    This is what ``fusebus models put`` checks before storing a version, and what an agent
    checks before switching to one. Returns the loaded agent, ready to serve.

    Raises:
        ConfigError: one line naming the file and what is wrong (the card, a model that
            does not load, an input or output shape that disagrees with the card).
    """
    try:
        agent = ModelAgent(path, type_name=type_name)
        agent.warm_up()
        rows = 2
        zeros = {
            spec.sensor: np.zeros((rows, *_row_shape(shape)), dtype)
            for spec, shape, dtype in zip(
                agent.inputs, agent.input_shapes, agent.input_dtypes, strict=True
            )
        }
        agent.predict(zeros)
    except ConfigError:
        raise  # names the model already
    except FusebusError as exc:
        raise ConfigError(f"model {path.name}: {exc}") from None
    except Exception as exc:  # a runtime's own error for a file it cannot read or run
        raise ConfigError(f"model {path.name} does not load or run: {exc}") from None
    return agent


def _row_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A concrete per-row shape: any-size axes (-1 or 0) as 1."""
    return tuple(n if n > 0 else 1 for n in shape)
