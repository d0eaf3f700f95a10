"""Wire messages, their msgpack codec, array encoding and the project's error tree."""

from schemas.arrays import WIRE_DTYPES, decode_array, encode_array
from schemas.codec import CODEC, Codec, decode, encode
from schemas.errors import (
    BusError,
    ConfigError,
    FusebusError,
    ModelError,
    SchemaError,
    SubjectError,
)
from schemas.messages import (
    MESSAGES,
    TASK_STATES,
    AgentInfo,
    DeadLetter,
    Decision,
    ErrorInfo,
    InputSpec,
    ModelRef,
    Result,
    SensorChunk,
    SensorFrame,
    Subtask,
    TaskStatus,
    Window,
)

__all__ = [
    "CODEC",
    "MESSAGES",
    "TASK_STATES",
    "WIRE_DTYPES",
    "AgentInfo",
    "BusError",
    "Codec",
    "ConfigError",
    "DeadLetter",
    "Decision",
    "ErrorInfo",
    "FusebusError",
    "InputSpec",
    "ModelError",
    "ModelRef",
    "Result",
    "SchemaError",
    "SensorChunk",
    "SensorFrame",
    "SubjectError",
    "Subtask",
    "TaskStatus",
    "Window",
    "decode",
    "decode_array",
    "encode",
    "encode_array",
]
