from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    FLOAT32: _ClassVar[DataType]
    FLOAT16: _ClassVar[DataType]
    BFLOAT16: _ClassVar[DataType]
    INT64: _ClassVar[DataType]
    INT32: _ClassVar[DataType]
    UINT8: _ClassVar[DataType]
    BOOL: _ClassVar[DataType]
    UINT16: _ClassVar[DataType]

class Transform(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RAW: _ClassVar[Transform]
    PROBS: _ClassVar[Transform]
    LOG_PROBS: _ClassVar[Transform]
DATA_TYPE_UNSPECIFIED: DataType
FLOAT32: DataType
FLOAT16: DataType
BFLOAT16: DataType
INT64: DataType
INT32: DataType
UINT8: DataType
BOOL: DataType
UINT16: DataType
RAW: Transform
PROBS: Transform
LOG_PROBS: Transform

class Tensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class OutputRequest(_message.Message):
    __slots__ = ("name", "transform", "temperature", "top_k", "dtype", "sample", "seed", "tail", "mask", "compact_indices")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TRANSFORM_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    COMPACT_INDICES_FIELD_NUMBER: _ClassVar[int]
    name: str
    transform: Transform
    temperature: float
    top_k: int
    dtype: DataType
    sample: int
    seed: int
    tail: bool
    mask: str
    compact_indices: bool
    def __init__(self, name: _Optional[str] = ..., transform: _Optional[_Union[Transform, str]] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., dtype: _Optional[_Union[DataType, str]] = ..., sample: _Optional[int] = ..., seed: _Optional[int] = ..., tail: _Optional[bool] = ..., mask: _Optional[str] = ..., compact_indices: _Optional[bool] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("request_id", "inputs", "outputs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    inputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    outputs: _containers.RepeatedCompositeFieldContainer[OutputRequest]
    def __init__(self, request_id: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[OutputRequest, _Mapping]]] = ...) -> None: ...

class Output(_message.Message):
    __slots__ = ("name", "values", "indices", "dense_shape", "transform", "temperature", "top_k", "tail", "position_mask", "sample")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    DENSE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    TRANSFORM_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    POSITION_MASK_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    values: Tensor
    indices: Tensor
    dense_shape: _containers.RepeatedScalarFieldContainer[int]
    transform: Transform
    temperature: float
    top_k: int
    tail: Tensor
    position_mask: Tensor
    sample: int
    def __init__(self, name: _Optional[str] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., indices: _Optional[_Union[Tensor, _Mapping]] = ..., dense_shape: _Optional[_Iterable[int]] = ..., transform: _Optional[_Union[Transform, str]] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., tail: _Optional[_Union[Tensor, _Mapping]] = ..., position_mask: _Optional[_Union[Tensor, _Mapping]] = ..., sample: _Optional[int] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("request_id", "teacher_id", "model_name", "model_version", "outputs", "batch_size", "queue_ms", "compute_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEACHER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    teacher_id: str
    model_name: str
    model_version: str
    outputs: _containers.RepeatedCompositeFieldContainer[Output]
    batch_size: int
    queue_ms: float
    compute_ms: float
    def __init__(self, request_id: _Optional[str] = ..., teacher_id: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., outputs: _Optional[_Iterable[_Union[Output, _Mapping]]] = ..., batch_size: _Optional[int] = ..., queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("teacher_id", "model_name", "model_version", "inputs", "outputs", "max_batch_size", "device", "precision", "server_version", "max_message_bytes", "local_socket", "host_id")
    TEACHER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_SOCKET_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    teacher_id: str
    model_name: str
    model_version: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    max_batch_size: int
    device: str
    precision: str
    server_version: str
    max_message_bytes: int
    local_socket: str
    host_id: str
    def __init__(self, teacher_id: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., max_batch_size: _Optional[int] = ..., device: _Optional[str] = ..., precision: _Optional[str] = ..., server_version: _Optional[str] = ..., max_message_bytes: _Optional[int] = ..., local_socket: _Optional[str] = ..., host_id: _Optional[str] = ...) -> None: ...
