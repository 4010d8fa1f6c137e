"""edistill teacher server: load a model, batch requests dynamically, serve over gRPC.

Typical use is the CLI (``edistill teacher serve --model ...``); the same
pieces are available as a library::

    model = load_model("teacher_server.zoo:resnet18_cifar")
    config = TeacherConfig(model_name="r18", max_batch_size=128)
    run(config, model)                      # blocks until SIGTERM, then drains
"""

import importlib
from typing import TYPE_CHECKING, Any

from teacher_server.config import DEFAULT_MAX_MESSAGE_BYTES, TeacherConfig
from teacher_server.errors import (
    ConfigError,
    InferenceFailed,
    InvalidRequest,
    ModelLoadError,
    QueueFull,
    RequestError,
    ServerClosing,
    SignatureError,
    TeacherError,
    TeacherUnreachable,
)

# Names that need torch are imported on first use, so light commands such as
# ``python -m teacher_server health ADDR`` (a container healthcheck run every
# few seconds) start without importing torch.
_LAZY = {
    "BackgroundTeacher": "teacher_server.inprocess",
    "BatchRecord": "teacher_server.batcher",
    "BatcherStats": "teacher_server.batcher",
    "DynamicBatcher": "teacher_server.batcher",
    "LoadedModel": "teacher_server.model",
    "load_model": "teacher_server.model",
    "name_outputs": "teacher_server.model",
    "save_exported": "teacher_server.model",
    "save_torchscript": "teacher_server.model",
    "Hook": "teacher_server.server",
    "SERVICE_NAME": "teacher_server.server",
    "TeacherServer": "teacher_server.server",
    "create_server": "teacher_server.server",
    "run": "teacher_server.server",
    "serve": "teacher_server.server",
    "TensorSpec": "teacher_server.signature",
    "parse_input_spec": "teacher_server.signature",
}

if TYPE_CHECKING:
    from teacher_server.batcher import BatchRecord, BatcherStats, DynamicBatcher
    from teacher_server.inprocess import BackgroundTeacher
    from teacher_server.model import LoadedModel, load_model, name_outputs, save_exported, save_torchscript
    from teacher_server.server import SERVICE_NAME, Hook, TeacherServer, create_server, run, serve
    from teacher_server.signature import TensorSpec, parse_input_spec


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'teacher_server' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "BackgroundTeacher",
    "BatchRecord",
    "BatcherStats",
    "ConfigError",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DynamicBatcher",
    "Hook",
    "InferenceFailed",
    "InvalidRequest",
    "LoadedModel",
    "ModelLoadError",
    "QueueFull",
    "RequestError",
    "SERVICE_NAME",
    "ServerClosing",
    "SignatureError",
    "TeacherConfig",
    "TeacherError",
    "TeacherServer",
    "TeacherUnreachable",
    "TensorSpec",
    "create_server",
    "load_model",
    "name_outputs",
    "parse_input_spec",
    "run",
    "save_exported",
    "save_torchscript",
    "serve",
]
