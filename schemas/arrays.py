"""Arrays on the wire: a map ``{dtype, shape, data}`` with little-endian raw bytes.

Any language can read it: ``np.frombuffer`` in Python, a typed array in JavaScript.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from schemas.errors import SchemaError
from schemas.limits import MAX_ARRAY_DIMS, MAX_ARRAY_EXTENT

#: dtype names a wire array may carry, mapped to their little-endian numpy dtype.
WIRE_DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
    )
}


def encode_array(array: np.ndarray) -> dict[str, Any]:
    """Encode ``array`` as a wire map; raises :class:`SchemaError` for unsupported dtypes."""
    name = array.dtype.name
    wire_dtype = WIRE_DTYPES.get(name)
    if wire_dtype is None:
        raise SchemaError(
            "bad_array", f"dtype {name!r} cannot travel; use one of {sorted(WIRE_DTYPES)}"
        )
    if array.dtype != wire_dtype or not array.flags.c_contiguous:
        array = np.ascontiguousarray(array, dtype=wire_dtype)
    return {"dtype": name, "shape": list(array.shape), "data": array.tobytes()}


def decode_array(value: Any, where: str = "array") -> np.ndarray:
    """Decode a wire map into a read-only array; raises :class:`SchemaError` naming ``where``."""
    if not isinstance(value, dict):
        raise SchemaError("bad_array", f"{where}: expected a map with dtype, shape, data")
    try:
        name, shape, data = value["dtype"], value["shape"], value["data"]
    except KeyError as missing:
        raise SchemaError("bad_array", f"{where}: missing key {missing}") from None
    dtype = WIRE_DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise SchemaError("bad_array", f"{where}: unsupported dtype {name!r}")
    if isinstance(shape, list | tuple) and len(shape) > MAX_ARRAY_DIMS:
        raise SchemaError(
            "bad_array", f"{where}: {len(shape)} dimensions, at most {MAX_ARRAY_DIMS}"
        )
    if not isinstance(shape, list | tuple) or not all(
        isinstance(n, int) and not isinstance(n, bool) and 0 <= n < MAX_ARRAY_EXTENT for n in shape
    ):
        raise SchemaError(
            "bad_array", f"{where}: shape must be a list of ints in [0, {MAX_ARRAY_EXTENT})"
        )
    if not isinstance(data, bytes):
        raise SchemaError("bad_array", f"{where}: data must be binary")
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise SchemaError(
            "bad_array",
            f"{where}: {len(data)} bytes of data for shape {list(shape)} {name}, "
            f"expected {expected}",
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)
