"""The msgpack codec: every message round-trips; bad bytes raise one clear SchemaError."""

from __future__ import annotations

from dataclasses import replace
from typing import TypeVar

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
    ModelRollout,
    OpenTaskPage,
    OpenTaskRecord,
    Result,
    ResultBatch,
    SchemaError,
    SensorChunk,
    SensorFrame,
    SensorStatus,
    ShadowBatch,
    Subtask,
    SubtaskBatch,
    TaskStatus,
    Window,
    decode,
    decode_array,
    encode,
    encode_array,
)

M = TypeVar("M")

ARRAYS: list[np.ndarray] = [
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
    singles = _singles(window)
    subtasks = [m for m in singles if isinstance(m, Subtask)]
    result = next(m for m in singles if isinstance(m, Result))
    return [*singles, SubtaskBatch.of(subtasks), _result_batch(result)]


def _result_batch(result: Result, rows: int = 2) -> ResultBatch:
    assert result.output is not None
    return ResultBatch(
        stream=result.stream,
        type=result.type,
        agent_id=result.agent_id,
        model=result.model,
        labels=result.labels,
        weight=result.weight,
        latency_ms=result.latency_ms,
        task_ids=tuple(f"{result.task_id}-{i}" for i in range(rows)),
        outputs=np.stack([result.output] * rows),
        windows=np.array([(i, i + 10) for i in range(rows)], np.int64),
        expected=(result.expected,) * rows,
        ingest_ns=np.arange(rows, dtype=np.int64),
    )


def sample_of(kind: type[M]) -> M:
    """The first sample message of class ``kind``."""
    return next(m for m in samples() if isinstance(m, kind))


def _singles(window: Window) -> list[object]:
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
            ingest_ns=3,
        ),
        Subtask(
            task_id="s1:8:ab",
            stream="s2",
            type="accel",
            window=Window(2_000, 3_000),
            inputs={"accel": ARRAYS[0] * 2},
            deadline_ns=100,
            expected=("accel",),
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
        OpenTaskPage(
            records=(
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
            ),
            ended=("u", "v"),
        ),
        SensorStatus(stream="s1", sensor="gyro", state="down", last_seen_ns=5, silent_ms=3000.0),
        ModelRollout(
            name="accel-large",
            type="accel",
            current="2",
            previous=("1",),
            canary="3",
            canary_share=0.25,
            shadow="4",
            updated_ns=7,
        ),
        ShadowBatch(
            name="accel-large",
            type="accel",
            agent_id="a-1",
            current=ModelRef("m", "2"),
            shadow=ModelRef("m", "4"),
            labels=("x", "y"),
            task_ids=("s1:1", "s1:2"),
            streams=("s1", "s1"),
            windows=np.array([[1, 2], [2, 3]], np.int64),
            current_outputs=np.array([[0.1, 0.9], [0.8, 0.2]], np.float32),
            shadow_outputs=np.array([[0.2, 0.8], [0.3, 0.7]], np.float32),
            produced_ns=9,
        ),
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
    elif isinstance(a, tuple | list):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
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


def test_decode_each_reads_a_single_message_or_a_batch_alike() -> None:
    """Readers of subtasks and results take either form and get a list of items."""
    subtasks = [m for m in samples() if isinstance(m, Subtask)]
    batch = SubtaskBatch.of(subtasks)
    assert len(batch) == 2 and batch.inputs["accel"].shape == (2, 4, 3)
    assert_same(subtasks, CODEC.decode_each(encode(batch), Subtask))
    assert_same(subtasks[:1], CODEC.decode_each(encode(subtasks[0]), Subtask))
    results = CODEC.decode_each(encode(sample_of(ResultBatch)), Result)
    assert [r.task_id for r in results] == ["s1:7:ab-0", "s1:7:ab-1"]
    assert [r.window for r in results] == [Window(0, 10), Window(1, 11)]
    with pytest.raises(SchemaError, match=r"'result_batch'.*expected 'subtask' or 'subtask_batch'"):
        CODEC.decode_each(encode(sample_of(ResultBatch)), Subtask)


def test_a_batch_selects_and_concatenates_rows() -> None:
    """Agents drop expired rows and serve several batches in one model call."""
    batch = sample_of(SubtaskBatch)
    picked = batch.select(np.array([False, True]))
    assert picked.task_ids == ("s1:8:ab",) and picked.streams == ("s2",)
    assert_same(picked.inputs["accel"][0], ARRAYS[0] * 2)
    joined = SubtaskBatch.concat([batch, picked])
    assert joined.task_ids == ("s1:7:ab", "s1:8:ab", "s1:8:ab")
    assert joined.windows.tolist() == [[1_000, 2_000], [2_000, 3_000], [2_000, 3_000]]
    results = sample_of(ResultBatch).select(np.array([1]))
    assert results.task_ids == ("s1:7:ab-1",) and results.outputs.shape == (1, 2)


def test_a_bad_item_deep_in_a_batch_is_named_by_its_path() -> None:
    """Nested lists are checked without building a path per item, yet an error names it."""
    body = msgpack.unpackb(encode(sample_of(SubtaskBatch)))
    body["expected"][1] = ["accel", 3]
    with pytest.raises(SchemaError, match=r"SubtaskBatch\.expected\[1\]\[1\]: expected str"):
        decode(msgpack.packb(body), SubtaskBatch)


def test_a_batch_has_one_row_per_item_and_is_never_empty() -> None:
    """Columns of another length, mixed shapes and empty batches are refused, whether built
    here or read off the wire."""
    subtasks = [m for m in samples() if isinstance(m, Subtask)]
    with pytest.raises(SchemaError, match="one type and one input shape"):
        SubtaskBatch.of([subtasks[0], replace(subtasks[1], inputs={"accel": ARRAYS[0][:2]})])
    with pytest.raises(SchemaError, match="one type and one input shape"):
        SubtaskBatch.of([subtasks[0], replace(subtasks[1], type="gyro")])
    body = msgpack.unpackb(encode(sample_of(SubtaskBatch)))
    body["streams"] = ["s1"]
    with pytest.raises(SchemaError, match=r"SubtaskBatch\.streams does not have one row per item"):
        decode(msgpack.packb(body), SubtaskBatch)
    body = msgpack.unpackb(encode(sample_of(ResultBatch)))
    body["outputs"] = encode_array(np.zeros((3, 2), np.float32))
    with pytest.raises(SchemaError, match=r"ResultBatch\.outputs does not have one row"):
        decode(msgpack.packb(body), ResultBatch)
    for key in ("task_ids", "expected"):
        body[key] = []
    with pytest.raises(SchemaError, match="ResultBatch is empty"):
        decode(msgpack.packb(body), ResultBatch)


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
    body = msgpack.unpackb(encode(sample_of(TaskStatus)))
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
        (encode(sample_of(TaskStatus)), "wrong_kind"),
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
    body: dict[str, object] = msgpack.unpackb(encode(sample_of(Subtask)))
    return body


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
        ({"dtype": "float32", "shape": [-1], "data": b""}, "ints in"),
        ({"dtype": "float32", "shape": [0, 1 << 40], "data": b""}, "ints in"),
        ({"dtype": "float32", "shape": [1] * 9, "data": b"\x00" * 4}, "9 dimensions"),
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


@pytest.mark.parametrize("kind", [TaskStatus, Decision])
def test_states_outside_the_three_are_refused(kind: type) -> None:
    """A task can only end complete, partial or failed: any other state on the wire is
    refused at decode, naming the field."""
    good = next(m for m in _singles(Window(0, 10)) if type(m) is kind)
    body = msgpack.unpackb(encode(good))
    field = "state" if kind is TaskStatus else "status"
    body[field] = "maybe"
    with pytest.raises(SchemaError, match=f"{kind.__name__}.{field}: 'maybe' is not one of"):
        decode(msgpack.packb(body), kind)


def test_unsupported_dtype_cannot_be_encoded() -> None:
    """Encoding an array of a dtype other languages cannot read fails early and clearly."""
    with pytest.raises(SchemaError, match="cannot travel"):
        encode_array(np.array([1 + 2j]))
