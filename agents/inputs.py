"""Whether the inputs a subtask brings fit what an agent reads: a pure check, no bus.

An agent's inputs (from its card) name each sensor with its samples and channels (0 for
any), and may name the dtype each input is cast to. A plan that feeds the agent something
else (another window length, another sensor, a dtype the model cannot take) is a
deployment mistake, not a bad message: the runtime answers each such subtask with an error
result and says so once per stream and shape (see :mod:`agents.runtime`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from schemas import InputSpec

#: The error code of a result whose subtask's inputs do not fit the agent.
INPUT_MISMATCH = "input_mismatch"

#: What an input's shape and dtype look like, as a key: sensor, [samples, channels], dtype.
InputShape = tuple[tuple[str, tuple[int, ...], str], ...]


@dataclass(frozen=True)
class InputMismatch:
    """One input that does not fit: which sensor, what the agent reads, what came."""

    sensor: str
    expected: str
    got: str

    @property
    def text(self) -> str:
        """One sentence naming expected against got."""
        return f"input {self.sensor!r}: the agent reads {self.expected}, the subtask has {self.got}"


def input_shape(arrays: Mapping[str, np.ndarray]) -> InputShape:
    """The names, per-row shapes and dtypes of ``arrays`` (``[rows, samples, channels]``)."""
    return tuple(sorted((name, tuple(a.shape[1:]), a.dtype.name) for name, a in arrays.items()))


def input_mismatch(
    specs: Sequence[InputSpec],
    arrays: Mapping[str, np.ndarray],
    *,
    dtypes: Sequence[np.dtype] | None = None,
) -> InputMismatch | None:
    """The first input of ``specs`` that ``arrays`` (``{sensor: [rows, samples, channels]}``)
    does not fit, or ``None`` when all fit.

    Args:
        specs: what the agent reads, in order.
        arrays: the batch's inputs; sensors the agent does not read are ignored.
        dtypes: the dtype each input is cast to (one per spec); an input fits when it casts
            within its kind or up (``same_kind``: float64 to float32 fits, float to int8
            does not). Without them any numeric dtype fits.
    """
    for i, spec in enumerate(specs):
        want_dtype = np.dtype(dtypes[i]) if dtypes is not None else None
        expected = _describe_spec(spec, want_dtype)
        array = arrays.get(spec.sensor)
        if array is None and spec.optional:
            continue
        if array is None:
            others = ", ".join(_describe(n, a) for n, a in sorted(arrays.items())) or "nothing"
            return InputMismatch(spec.sensor, expected, f"no such input ({others})")
        shape = tuple(array.shape[1:])
        if spec.stage:
            fits_shape = not spec.shape or (
                len(shape) == len(spec.shape)
                and all(w in (0, g) for w, g in zip(spec.shape, shape, strict=True))
            )
        else:
            fits_shape = (
                len(shape) == 2
                and (spec.samples == 0 or shape[0] == spec.samples)
                and (spec.channels == 0 or shape[1] == spec.channels)
            )
        if want_dtype is not None:
            fits_dtype = bool(np.can_cast(array.dtype, want_dtype, casting="same_kind"))
        else:
            fits_dtype = array.dtype.kind in "biuf"
        if not (fits_shape and fits_dtype):
            return InputMismatch(spec.sensor, expected, _describe_array(array))
    return None


def _describe_spec(spec: InputSpec, dtype: np.dtype | None) -> str:
    if spec.stage:
        shape = "any shape" if not spec.shape else f"per-row shape {_axes(spec.shape)}"
        return f"{spec.sensor!r}'s output of {shape}" + (f" {dtype.name}" if dtype else "")
    samples = str(spec.samples) if spec.samples else "any"
    channels = str(spec.channels) if spec.channels else "any"
    return f"{samples} samples x {channels} channels" + (f" {dtype.name}" if dtype else "")


def _axes(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(n) if n else "any" for n in shape) + ")"


def _describe_array(array: np.ndarray) -> str:
    shape = tuple(array.shape[1:])
    if len(shape) == 2:
        return f"{shape[0]} samples x {shape[1]} channels {array.dtype.name}"
    return f"per-row shape {shape} {array.dtype.name}"


def _describe(name: str, array: np.ndarray) -> str:
    return f"{name}: {_describe_array(array)}"
