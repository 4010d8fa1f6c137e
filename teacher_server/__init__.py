"""edistill teacher server: load a model, batch requests dynamically, serve over gRPC.

Typical use is the CLI (``edistill teacher serve --model ...``); the same
pieces are available as a library::

    model = load_model("teacher_server.zoo:resnet18_cifar")
    config = TeacherConfig(model_name="r18", max_batch_size=128)
    run(config, model)                      # blocks until SIGTERM, then drains
"""

from teacher_server.batcher import BatchRecord, BatcherStats, DynamicBatcher
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
from teacher_server.inprocess import BackgroundTeacher
from teacher_server.model import LoadedModel, load_model, name_outputs, save_exported, save_torchscript
from teacher_server.server import SERVICE_NAME, Hook, TeacherServer, create_server, run, serve
from teacher_server.signature import TensorSpec, parse_input_spec

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
