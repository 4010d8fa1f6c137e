"""The teacher side of the same-host transport, for tests: a raw client and in-process teachers.

``RawLocalClient`` is written here against the protocol (protos/edistill/v1/local.proto),
not with the student's implementation: a Unix socket, LocalHello, LocalRequest
frames whose tensor bytes live in memfds passed with SCM_RIGHTS. The fixtures
(``runtime_dir``, ``latency_teacher``, ``two_input_teacher``, ``client``) are
imported by the test modules that use them.
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket

import grpc
import numpy as np
import pytest
import torch
from torch import nn

from protos import codec, localwire
from protos.edistill.v1 import local_pb2
from protos.edistill.v1 import teacher_pb2 as pb
from protos.edistill.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server import BackgroundTeacher, LoadedModel, TeacherConfig, zoo
from teacher_server import local as local_mod
from teacher_server.signature import TensorSpec

__all__ = ["INVALID_ARGUMENT", "LOCAL_ONLY", "OK", "TIMEOUT_S", "RawLocalClient", "TwoInputs", "Wide", "client",
           "describe", "grpc_predict", "ids_input", "ids_of", "latency_teacher", "memfd", "open_fds", "runtime_dir",
           "serving", "two_input_teacher"]

#: ``pytestmark`` of the modules testing the local transport.
LOCAL_ONLY = [
    pytest.mark.skipif(not hasattr(os, "memfd_create") or not hasattr(socket, "SO_PEERCRED"),
                       reason="the local transport is Linux-only (memfd, SO_PEERCRED)"),
    # teacher_server.local ignores torch's "not writable" warning with a filter
    # added at import, which pytest's per-test warning capture does not keep.
    pytest.mark.filterwarnings("ignore:The given buffer is not writable:UserWarning"),
]

TIMEOUT_S = 30.0
OK = grpc.StatusCode.OK.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
WIRE = {np.dtype("float32"): pb.FLOAT32, np.dtype("float16"): pb.FLOAT16, np.dtype("int64"): pb.INT64}


# ------------------------------------------------------------------ raw client


class RawLocalClient:
    """A minimal student side of local.proto, for tests: one blocking Unix socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT_S)
        self.sock.connect(path)
        self.frames = localwire.FrameBuffer(1 << 30)
        self._ready: collections.deque[bytes] = collections.deque()
        self._next_call = 0

    def __enter__(self) -> "RawLocalClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send_frame(self, payload: bytes, fds=()) -> None:
        socket.send_fds(self.sock, [localwire.encode_frame(payload)], list(fds))

    def recv_frame(self) -> bytes | None:
        """The next frame's payload, or None at EOF."""
        while not self._ready:
            data = self.sock.recv(1 << 20)
            if not data:
                return None
            self.frames.feed(data)
            self._ready.extend(self.frames.frames())  # drain the generator: it compacts its buffer at the end
        return self._ready.popleft()

    def hello(self, *, version: int = 1, token: str = "") -> local_pb2.LocalWelcome:
        self.send_frame(local_pb2.LocalHello(version=version, token=token).SerializeToString())
        frame = self.recv_frame()
        assert frame is not None, "teacher closed the connection instead of answering LocalHello"
        return local_pb2.LocalWelcome.FromString(frame)

    def send_request(self, arrays: dict[str, np.ndarray], *, request_id: str = "", outputs=(), timeout_s: float = 0.0,
                     offset: int = 0, separate_fds: bool = False, tamper=None, extra_fds: int = 0) -> int:
        """Put ``arrays`` in memfd(s) and send one LocalRequest; return its call id.

        ``offset``: where the first tensor starts in its memfd. ``tamper(req)``
        may edit the request (bad shapes, offsets) before it is sent.
        ``extra_fds``: that many more memfds, not counted in fd_count.
        """
        self._next_call += 1
        call_id = self._next_call
        req = local_pb2.LocalRequest(call_id=call_id, request_id=request_id, outputs=list(outputs),
                                     timeout_s=timeout_s)
        fds = []
        try:
            if separate_fds:
                for i, (name, arr) in enumerate(arrays.items()):
                    fds.append(memfd(b"\x00" * offset + arr.tobytes()))
                    req.inputs.add(name=name, dtype=WIRE[arr.dtype], shape=arr.shape, fd_index=i, offset=offset)
            else:
                blob = bytearray(b"\x00" * offset)
                for name, arr in arrays.items():
                    blob += b"\x00" * (-len(blob) % 64)  # 64-byte aligned, like a tensor storage
                    req.inputs.add(name=name, dtype=WIRE[arr.dtype], shape=arr.shape, fd_index=0, offset=len(blob))
                    blob += arr.tobytes()
                fds.append(memfd(bytes(blob)))
            req.fd_count = len(fds)
            fds += [memfd(b"extra") for _ in range(extra_fds)]
            if tamper is not None:
                tamper(req)
            self.send_frame(req.SerializeToString(), fds)
        finally:
            for fd in fds:  # the teacher got its own copies
                os.close(fd)
        return call_id

    def recv_reply(self) -> local_pb2.LocalReply:
        frame = self.recv_frame()
        assert frame is not None, "teacher closed the connection instead of replying"
        return local_pb2.LocalReply.FromString(frame)

    def predict(self, arrays: dict[str, np.ndarray], **kwargs) -> local_pb2.LocalReply:
        call_id = self.send_request(arrays, **kwargs)
        reply = self.recv_reply()
        assert reply.call_id == call_id
        return reply

    def at_eof(self) -> bool:
        """True once the teacher has closed this connection, skipping frames sent before (waits up to TIMEOUT_S)."""
        try:
            while self.recv_frame() is not None:
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass
        return True  # a connection left open ends in socket.timeout instead


def memfd(data: bytes) -> int:
    fd = os.memfd_create("edistill-test")
    os.write(fd, data)
    return fd


def ids_input(ids, features: int = 4) -> dict[str, np.ndarray]:
    """Latency-teacher input: column 0 of each row is its id."""
    x = np.zeros((len(ids), features), np.float32)
    x[:, 0] = ids
    return {"input": x}


def ids_of(reply: local_pb2.LocalReply) -> list[float]:
    return codec.to_numpy(reply.response.outputs[0].values)[:, 0].tolist()


def open_fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# --------------------------------------------------------------------- models


class TwoInputs(nn.Module):
    """x (B, 8) float32 and ids (B, 3) int64 -> logits (B, 5)."""

    edistill_inputs = [TensorSpec("x", torch.float32, (8,)), TensorSpec("ids", torch.int64, (3,))]

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + ids.sum(-1, keepdim=True).float()  # (B, 5)


class Wide(nn.Module):
    """x (B, 4) -> (B, 200_000): 800 KB of output per row, far more than a socket buffer holds."""

    edistill_inputs = [TensorSpec("input", torch.float32, (4,))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] + torch.arange(200_000, dtype=torch.float32)  # (B, 200_000)


@pytest.fixture(scope="module")
def runtime_dir(tmp_path_factory) -> str:
    """EDISTILL_RUNTIME_DIR for this module's teachers: a fresh directory (created by the teacher)."""
    path = str(tmp_path_factory.mktemp("rt") / "edistill")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(local_mod.RUNTIME_DIR_ENV, path)
        yield path


@contextlib.contextmanager
def serving(model: nn.Module, **config):
    config.setdefault("max_queue_delay_ms", 20)
    config.setdefault("max_batch_size", 16)
    with BackgroundTeacher(TeacherConfig(model_name="m", model_version="3", **config),
                           LoadedModel.from_module(model)) as teacher:
        yield teacher


@pytest.fixture(scope="module")
def latency_teacher(runtime_dir):
    """Latency teacher (20 ms per forward) that waits up to 20 ms to fill a batch of <= 16."""
    with serving(zoo.latency(delay_ms=20), metrics_port=0) as teacher:
        yield teacher


@pytest.fixture(scope="module")
def two_input_teacher(runtime_dir):
    with serving(TwoInputs(), max_queue_delay_ms=1) as teacher:
        yield teacher


@pytest.fixture
def client(latency_teacher):
    with RawLocalClient(latency_teacher.server.local_socket) as c:
        assert c.hello().code == OK
        yield c


def describe(address: str, metadata=None) -> pb.DescribeResponse:
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.TeacherStub(ch).Describe(pb.DescribeRequest(), timeout=TIMEOUT_S, metadata=metadata)


def grpc_predict(address: str, arrays: dict[str, np.ndarray], request_id: str = "") -> pb.PredictResponse:
    req = pb.PredictRequest(request_id=request_id)
    for name, arr in arrays.items():
        codec.encode(arr, req.inputs.add(), name=name)
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.TeacherStub(ch).Predict(req, timeout=TIMEOUT_S)
