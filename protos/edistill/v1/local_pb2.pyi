from protos.edistill.v1 import teacher_pb2 as _teacher_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LocalHello(_message.Message):
    __slots__ = ("version", "token")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    version: int
    token: str
    def __init__(self, version: _Optional[int] = ..., token: _Optional[str] = ...) -> None: ...

class LocalWelcome(_message.Message):
    __slots__ = ("teacher_id", "version", "code", "details")
    TEACHER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    teacher_id: str
    version: int
    code: int
    details: str
    def __init__(self, teacher_id: _Optional[str] = ..., version: _Optional[int] = ..., code: _Optional[int] = ..., details: _Optional[str] = ...) -> None: ...

class SharedTensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "fd_index", "offset")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    FD_INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: _teacher_pb2.DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    fd_index: int
    offset: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[_teacher_pb2.DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., fd_index: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class LocalRequest(_message.Message):
    __slots__ = ("call_id", "request_id", "inputs", "outputs", "fd_count", "timeout_s")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    FD_COUNT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    request_id: str
    inputs: _containers.RepeatedCompositeFieldContainer[SharedTensor]
    outputs: _containers.RepeatedCompositeFieldContainer[_teacher_pb2.OutputRequest]
    fd_count: int
    timeout_s: float
    def __init__(self, call_id: _Optional[int] = ..., request_id: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[SharedTensor, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[_teacher_pb2.OutputRequest, _Mapping]]] = ..., fd_count: _Optional[int] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class LocalReply(_message.Message):
    __slots__ = ("call_id", "code", "details", "response")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    code: int
    details: str
    response: _teacher_pb2.PredictResponse
    def __init__(self, call_id: _Optional[int] = ..., code: _Optional[int] = ..., details: _Optional[str] = ..., response: _Optional[_Union[_teacher_pb2.PredictResponse, _Mapping]] = ...) -> None: ...
