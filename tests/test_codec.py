"""The msgpack codec: every message round-trips; bad bytes raise one clear SchemaError."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from schemas import (
    CODEC,
    MESSAGES,
    AgentInfo,
    DeadLetter,
    Decision,
    ErrorInfo,
    InputSpec,
    ModelRef,
    OpenTaskRecord,
    Result,
    SchemaError,
    SensorChunk,
    SensorFrame,
    SensorStatus,
    Subtask,
    TaskStatus,
    Window,
    decode,
    decode_array,
    encode,
    encode_array,
)

ARRAYS = [
    np.arange(12, dtype=np.float32).reshape(4, 3),
    np.linspace(-1, 1, 7, dtype=np.float64),
    np.array([[1, -2], [3, -4]], dtype=np.int64),
    np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
    np.array([True, False, True]),
    np.array([0.5, -0.25], dtype=np.float16),
    np.zeros((0, 3), dtype=np.int16),
    np.array(3.5, dtype=np.float32),  # 0-d
]


def samples() -> list[object]:
    window = Window(1_000, 2_000)
    return [
        SensorChunk(stream="s1", sensor="accel", t0_ns=5, period_ns=100, samples=ARRAYS[0]),
        SensorFrame(
            stream="s1", t_ns=7, period_ns=10, sensors={"accel": ARRAYS[0], "gyro": ARRAYS[2]}
        ),
        Subtask(
            task_id="s1:7:ab",
            stream="s1",
            type="accel",
            window=window,
            inputs={"accel": ARRAYS[0]},
            deadline_ns=99,
            expected=("accel", "gyro"),
            attempt=2,
            ingest_ns=3,
        ),
        Result(
            task_id="s1:7:ab",
            stream="s1",
            type="accel",
            agent_id="a-1",
            model=ModelRef("m", "1.0.0"),
            output=np.array([0.1, 0.9], np.float32),
            labels=("x", "y"),
            latency_ms=1.5,
            window=window,
            expected=("accel",),
            ingest_ns=3,
            weight=0.8,
        ),
        Result(
            task_id="t",
            stream="s1",
            type="gyro",
            agent_id="a-2",
            model=ModelRef("m", "1"),
            output=None,
            labels=(),
            latency_ms=0.0,
            error=ErrorInfo("model_error", "boom"),
        ),
        TaskStatus(
            task_id="t",
            stream="s1",
            state="partial",
            missing=("gyro",),
            reason="deadline",
            window=window,
            expected=("accel", "gyro"),
            ingest_ns=1,
        ),
        Decision(
            task_id="t",
            stream="s1",
            window=window,
            label="y",
            scores={"x": 0.1, "y": 0.9},
            status="complete",
            contributors=("accel", "gyro"),
            missing=(),
            strategy="mean",
            latency_ms=2.25,
            decided_ns=11,
        ),
        DeadLetter(
            component="coordinator",
            subject="fb.frame.s1",
            reason="not_msgpack",
            error="bad",
            data=b"\x00\xff",
            headers={"k": "v"},
            first_seen_ns=12,
        ),
        OpenTaskRecord(
            task_id="t",
            stream="s1",
            window=window,
            expected=("accel", "gyro"),
            deadline_ns=10,
            ingest_ns=2,
            seen=("accel",),
            unavailable=(),
        ),
        SensorStatus(stream="s1", sensor="gyro", state="down", last_seen_ns=5, silent_ms=3000.0),
        AgentInfo(
            agent_id="a-1",
            type="accel",
            model=ModelRef("m", "1"),
            runtime="litert",
            inputs=(InputSpec("accel", 100, 3),),
            labels=("x", "y"),
            weight=0.9,
        ),
    ]


def assert_same(a: object, b: object) -> None:
    """Field-by-field equality that understands arrays, recursively."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif hasattr(a, "__dataclass_fields__"):
        assert type(a) is type(b)
        for name in a.__dataclass_fields__:
            assert_same(getattr(a, name), getattr(b, name))
    else:
        assert a == b, (a, b)


@pytest.mark.parametrize("message", samples(), ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: object) -> None:
    """Encoding then decoding gives back an equal message of the same class."""
    assert_same(message, decode(encode(message), type(message)))


def test_every_message_kind_is_covered() -> None:
    """The round-trip samples cover every registered message class."""
    assert {type(m) for m in samples()} == set(MESSAGES)


@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{a.dtype}{list(a.shape)}")
def test_arrays_round_trip_with_dtype_and_shape(array: np.ndarray) -> None:
    """Arrays of several dtypes and shapes come back identical."""
    assert_same(array, decode_array(encode_array(array)))


def test_arrays_travel_little_endian_and_contiguous() -> None:
    """A big-endian, strided array is sent as plain little-endian bytes any language can read."""
    source = np.arange(12, dtype=">i4").reshape(3, 4)[:, ::2]
    wire = encode_array(source)
    assert wire["dtype"] == "int32" and wire["shape"] == [3, 2]
    assert np.frombuffer(wire["data"], "<i4").tolist() == source.ravel().tolist()


def test_unknown_keys_are_ignored_and_defaults_filled() -> None:
    """A newer sender's extra field is ignored; an older sender's missing optional field defaults."""
    body = msgpack.unpackb(encode(samples()[5]))
    body["added_in_future"] = [1, 2, 3]
    del body["ingest_ns"]
    status = decode(msgpack.packb(body), TaskStatus)
    assert status.ingest_ns == 0 and status.missing == ("gyro",)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xc1", "not_msgpack"),
        (b"", "not_msgpack"),
        (msgpack.packb([1, 2]), "not_a_map"),
        (msgpack.packb({"v": 1, "kind": "pizza"}), "unknown_kind"),
        (msgpack.packb({"v": 1}), "unknown_kind"),
        (encode(samples()[5]), "wrong_kind"),
        (msgpack.packb({"v": 99, "kind": "subtask"}), "unsupported_version"),
        (msgpack.packb({"v": 1, "kind": "subtask", "task_id": "t"}), "missing_field"),
    ],
)
def test_bad_bytes_raise_schema_error_with_reason(data: bytes, reason: str) -> None:
    """Every kind of bad input raises SchemaError (a ValueError) with a stable reason code."""
    with pytest.raises(SchemaError) as caught:
        decode(data, Subtask)
    assert caught.value.reason == reason
    assert isinstance(caught.value, ValueError)


def _subtask_body() -> dict[str, object]:
    return msgpack.unpackb(encode(samples()[2]))


def test_wrong_field_type_names_the_field() -> None:
    """A field of the wrong type is reported with its path."""
    body = _subtask_body()
    body["deadline_ns"] = "soon"
    with pytest.raises(SchemaError, match=r"Subtask\.deadline_ns: expected int") as caught:
        decode(msgpack.packb(body), Subtask)
    assert caught.value.reason == "bad_field"


@pytest.mark.parametrize(
    ("array", "message"),
    [
        ({"dtype": "float32", "shape": [2, 3], "data": b"\x00" * 5}, "expected 24"),
        ({"dtype": "complex64", "shape": [1], "data": b"\x00" * 8}, "unsupported dtype"),
        ({"dtype": "float32", "shape": [-1], "data": b""}, "non-negative"),
        ({"dtype": "float32", "shape": [1]}, "missing key"),
        ([1.0, 2.0], "expected a map"),
    ],
)
def test_bad_arrays_are_refused_with_location(array: object, message: str) -> None:
    """A malformed array says what is wrong and in which input."""
    body = _subtask_body()
    body["inputs"] = {"accel": array}
    with pytest.raises(SchemaError, match=message) as caught:
        decode(msgpack.packb(body), Subtask)
    assert "inputs.accel" in str(caught.value)


def test_task_status_refuses_unknown_state() -> None:
    """A task can only end complete, partial or failed."""
    with pytest.raises(SchemaError):
        TaskStatus(task_id="t", stream="s", state="maybe", missing=(), reason="")


def test_unsupported_dtype_cannot_be_encoded() -> None:
    """Encoding an array of a dtype other languages cannot read fails early and clearly."""
    with pytest.raises(SchemaError, match="cannot travel"):
        encode_array(np.array([1 + 2j]))


def test_peek_reads_named_fields_and_checks_them() -> None:
    """peek returns the named fields of the right kind, and refuses what decode would."""
    result = samples()[3]
    assert CODEC.peek(encode(result), Result, ("task_id", "type")) == ("s1:7:ab", "accel")
    with pytest.raises(SchemaError) as caught:
        CODEC.peek(encode(samples()[5]), Result, ("task_id",))
    assert caught.value.reason == "wrong_kind"
    body = msgpack.unpackb(encode(result))
    body["type"] = 7
    with pytest.raises(SchemaError, match=r"Result\.type: expected str"):
        CODEC.peek(msgpack.packb(body), Result, ("task_id", "type"))
