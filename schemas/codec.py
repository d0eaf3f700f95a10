"""The msgpack codec for every wire message, built once from the dataclass fields.

Encoding turns a message into a msgpack map with ``v`` (version) and ``kind`` (tag) beside
its fields. Decoding checks the tag and the version, ignores unknown keys, fills defaults
for absent fields and checks each value's type, so bad bytes raise one
:class:`SchemaError` that says what was wrong and where.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack
import numpy as np

from schemas.arrays import decode_array, encode_array
from schemas.errors import SchemaError
from schemas.limits import MAX_LIST_ITEMS, MAX_MAP_ENTRIES, WireText
from schemas.messages import BATCH_OF, MESSAGES

M = TypeVar("M")
Encoder = Callable[[Any], Any]
Decoder = Callable[[Any, str], Any]

_MISSING = dataclasses.MISSING


def _identity(value: Any) -> Any:
    return value


_INT64 = range(-(1 << 63), 1 << 63)


def _scalar(kind: type, name: str) -> tuple[Encoder, Decoder]:
    def dec(value: Any, where: str) -> Any:
        if type(value) is not kind:
            raise SchemaError("bad_field", f"{where}: expected {name}, got {type(value).__name__}")
        if kind is int and value not in _INT64:
            raise SchemaError("bad_field", f"{where}: {value} does not fit in 64 bits")
        return value

    dec.scalar_type = kind  # type: ignore[attr-defined]  # lets sequences check in one pass
    return _identity, dec


def _text(rule: WireText) -> tuple[Encoder, Decoder]:
    def dec(value: Any, where: str) -> str:
        if type(value) is not str:
            raise SchemaError("bad_field", f"{where}: expected string, got {type(value).__name__}")
        return rule.check(value, where)

    dec.text_rule = rule  # type: ignore[attr-defined]  # lets sequences check in one pass
    return _identity, dec


def _float() -> tuple[Encoder, Decoder]:
    def dec(value: Any, where: str) -> float:
        if type(value) is float:
            return value
        if type(value) is int:
            return float(value)
        raise SchemaError("bad_field", f"{where}: expected a number, got {type(value).__name__}")

    return float, dec


def _choice(allowed: tuple[Any, ...]) -> tuple[Encoder, Decoder]:
    def dec(value: Any, where: str) -> Any:
        if type(value) is not str or value not in allowed:
            shown = value if isinstance(value, int | float | bool) else repr(value)[:40]
            raise SchemaError("bad_field", f"{where}: {shown} is not one of {', '.join(allowed)}")
        return value

    return _identity, dec


def _optional(inner: tuple[Encoder, Decoder]) -> tuple[Encoder, Decoder]:
    enc_inner, dec_inner = inner
    return (
        lambda v: None if v is None else enc_inner(v),
        lambda v, where: None if v is None else dec_inner(v, where),
    )


def _mapping(inner: tuple[Encoder, Decoder], keys: WireText | None) -> tuple[Encoder, Decoder]:
    enc_inner, dec_inner = inner

    def dec(value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise SchemaError("bad_field", f"{where}: expected a map, got {type(value).__name__}")
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise SchemaError("bad_field", f"{where}: map keys must be strings")
            if keys is not None:
                keys.check(key, f"{where} key")
            out[key] = dec_inner(item, f"{where}.{key}")
        return out

    return (lambda v: {k: enc_inner(x) for k, x in v.items()}), dec


def _sequence(inner: tuple[Encoder, Decoder]) -> tuple[Encoder, Decoder]:
    enc_inner, dec_inner = inner

    scalar = getattr(dec_inner, "scalar_type", None)
    rule: WireText | None = getattr(dec_inner, "text_rule", None)

    def dec(value: Any, where: str) -> tuple[Any, ...]:
        if not isinstance(value, list | tuple):
            raise SchemaError("bad_field", f"{where}: expected a list, got {type(value).__name__}")
        if scalar is not None and all(type(item) is scalar for item in value):
            if scalar is int and value and (min(value) < _INT64.start or max(value) >= _INT64.stop):
                raise SchemaError("bad_field", f"{where}: a value does not fit in 64 bits")
            return tuple(value)  # the common case, checked without a call per item
        if rule is not None and all(type(item) is str for item in value):
            rule.check_all(value, where)
            return tuple(value)
        try:
            return tuple([dec_inner(item, where) for item in value])
        except SchemaError:  # again, with each item's own path for the message
            return tuple(dec_inner(item, f"{where}[{i}]") for i, item in enumerate(value))

    return (lambda v: [enc_inner(x) for x in v]), dec


class _Plan:
    """How to turn one dataclass into a map and back."""

    def __init__(self, cls: type, fields: list[tuple[str, Encoder, Decoder, Any]]) -> None:
        self.cls = cls
        self.name = cls.__name__
        self.fields = fields
        # Precomputed so that the hot paths call nothing they do not need: fields that
        # travel as they are, and each field's path for error messages.
        self._plain = tuple(name for name, enc, _, _ in fields if enc is _identity)
        self._converted = tuple((name, enc) for name, enc, _, _ in fields if enc is not _identity)
        self._paths = {name: f"{self.name}.{name}" for name, _, _, _ in fields}

    def to_map(self, obj: Any) -> dict[str, Any]:
        out = {name: getattr(obj, name) for name in self._plain}
        for name, enc in self._converted:
            out[name] = enc(getattr(obj, name))
        return out

    def from_map(self, data: dict[str, Any], where: str) -> Any:
        kwargs = {}
        top = where is self.name  # nested plans get a longer path, formatted when needed
        for name, _, dec, default in self.fields:
            value = data.get(name, _MISSING)
            if value is _MISSING:
                if default is _MISSING:
                    raise SchemaError("missing_field", f"{where}.{name} is required")
                kwargs[name] = default() if callable(default) else default
            else:
                kwargs[name] = dec(value, self._paths[name] if top else f"{where}.{name}")
        try:
            return self.cls(**kwargs)
        except SchemaError:
            raise
        except (TypeError, ValueError) as exc:
            raise SchemaError("bad_field", f"{where}: {exc}") from None


class Codec:
    """Encodes and decodes the registered message classes.

    Build it once (see :data:`CODEC`); the per-field converters are derived from the type
    hints at construction so that each call does no reflection.
    """

    def __init__(self, messages: tuple[type, ...]) -> None:
        self._plans: dict[type, _Plan] = {}
        self._by_kind: dict[str, _Plan] = {}
        for cls in messages:
            plan = self._plan(cls)
            self._by_kind[cls.KIND] = plan  # type: ignore[attr-defined]

    def _plan(self, cls: type) -> _Plan:
        if cls in self._plans:
            return self._plans[cls]
        hints = typing.get_type_hints(cls, include_extras=True)
        fields = []
        for f in dataclasses.fields(cls):
            enc, dec = self._converter(hints[f.name])
            default: Any = f.default
            if f.default_factory is not _MISSING:
                default = f.default_factory
            fields.append((f.name, enc, dec, default))
        plan = _Plan(cls, fields)
        self._plans[cls] = plan
        return plan

    def _converter(self, hint: Any) -> tuple[Encoder, Decoder]:
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin is typing.Annotated:
            rule = _text_rule(hint)
            if args[0] is str and rule is not None:
                return _text(rule)
            return self._converter(args[0])
        if origin is typing.Literal and all(type(a) is str for a in args):
            return _choice(args)
        if hint is np.ndarray:
            return encode_array, decode_array
        if hint is float:
            return _float()
        if hint in (int, str, bytes, bool):
            return _scalar(hint, hint.__name__)
        if origin in (types.UnionType, typing.Union) and len(args) == 2 and type(None) in args:
            inner = next(a for a in args if a is not type(None))
            return _optional(self._converter(inner))
        if origin is dict and (args[0] is str or _text_rule(args[0]) is not None):
            return _mapping(self._converter(args[1]), _text_rule(args[0]))
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return _sequence(self._converter(args[0]))
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            plan = self._plan(hint)

            def dec(value: Any, where: str) -> Any:
                if not isinstance(value, dict):
                    raise SchemaError("bad_field", f"{where}: expected a map")
                return plan.from_map(value, where)

            return plan.to_map, dec
        raise TypeError(f"no wire form for field type {hint!r}")

    def encode(self, message: Any) -> bytes:
        """Encode a registered message to msgpack bytes."""
        plan = self._plans.get(type(message))
        if plan is None or type(message) not in MESSAGES:
            raise SchemaError("unknown_kind", f"{type(message).__name__} is not a wire message")
        body = plan.to_map(message)
        body["v"] = message.VERSION
        body["kind"] = message.KIND
        return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]

    def decode(self, data: bytes, expected: type[M]) -> M:
        """Decode bytes into a message of class ``expected``.

        Raises:
            SchemaError: as :meth:`decode_any`, or the message is of another kind.
        """
        return self._decode(data, expected)  # type: ignore[no-any-return]

    def decode_one_of(self, data: bytes, kinds: tuple[type, ...]) -> Any:
        """Decode a message of one of the classes ``kinds`` (callers ``match`` on the result).

        Raises:
            SchemaError: as :meth:`decode_any`, or the message is of another kind.
        """
        return self._decode(data, kinds)

    def decode_each(self, data: bytes, item: type[M]) -> list[M]:
        """Decode a message of class ``item``, or a batch of them (see
        :data:`~schemas.messages.BATCH_OF`), into a list of ``item``.

        Raises:
            SchemaError: as :meth:`decode`, or the message is neither ``item`` nor its batch.
        """
        message = self._decode(data, (item, BATCH_OF[item]))
        if type(message) is item:
            return [message]
        return message.items()  # type: ignore[no-any-return]

    def decode_any(self, data: bytes) -> object:
        """Decode bytes into whichever registered message they hold.

        Raises:
            SchemaError: the bytes are not msgpack, not a map, of an unknown kind, of a newer
                version, or a field is missing or of the wrong type.
        """
        return self._decode(data, None)

    def _decode(self, data: bytes, expected: type | tuple[type, ...] | None) -> Any:
        body = self._envelope(data, expected)
        plan = self._by_kind[body["kind"]]
        return plan.from_map(body, plan.name)

    def _envelope(self, data: bytes, expected: type | tuple[type, ...] | None) -> dict[str, Any]:
        """Unpack and check kind and version (one of ``expected``, if given); returns the
        raw map."""
        try:
            # Bounded before anything is built: no list or map can claim more items than this.
            body = msgpack.unpackb(
                data, raw=False, max_array_len=MAX_LIST_ITEMS, max_map_len=MAX_MAP_ENTRIES
            )
        except Exception as exc:  # msgpack raises several unrelated types for bad input
            raise SchemaError(
                "not_msgpack", f"cannot unpack {len(data)} bytes ({type(exc).__name__}: {exc})"
            ) from None
        if not isinstance(body, dict):
            raise SchemaError("not_a_map", f"top level is {type(body).__name__}, expected a map")
        kind = body.get("kind")
        plan = self._by_kind.get(kind) if isinstance(kind, str) else None
        if plan is None:
            raise SchemaError("unknown_kind", f"kind {kind!r} is not a fusebus message")
        if expected is None:
            allowed: tuple[type, ...] = (plan.cls,)
        else:
            allowed = expected if isinstance(expected, tuple) else (expected,)
        if plan.cls not in allowed:
            want = " or ".join(repr(cls.KIND) for cls in allowed)  # type: ignore[attr-defined]
            raise SchemaError("wrong_kind", f"got kind {kind!r}, expected {want}")
        known = plan.cls.VERSION  # type: ignore[attr-defined]
        version = body.get("v")
        if type(version) is not int or not 1 <= version <= known:
            raise SchemaError(
                "unsupported_version", f"{plan.name} v={version!r}; this reader knows v1..v{known}"
            )
        return body


def _text_rule(hint: Any) -> WireText | None:
    """The :class:`WireText` rule of an ``Annotated[str, WireText(...)]`` hint, if any."""
    if typing.get_origin(hint) is not typing.Annotated:
        return None
    return next((extra for extra in hint.__metadata__ if isinstance(extra, WireText)), None)


#: The codec for every fusebus message.
CODEC = Codec(MESSAGES)


def encode(message: Any) -> bytes:
    """Encode a wire message with :data:`CODEC`."""
    return CODEC.encode(message)


def decode(data: bytes, expected: type[M]) -> M:
    """Decode ``data`` as a message of class ``expected`` with :data:`CODEC`."""
    return CODEC.decode(data, expected)
