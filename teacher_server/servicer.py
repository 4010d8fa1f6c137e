"""The ``edistill.v1.Teacher`` gRPC servicer: validate, batch, encode.

Validation happens per request before it reaches the batcher, so a bad
request is answered INVALID_ARGUMENT on its own while the requests around
it are batched and answered normally.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Protocol, Sequence

import grpc
import torch

from protos import codec, localwire
from protos.outputs import pack_positions
from protos.edistill.v1 import teacher_pb2 as pb
from protos.edistill.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.batcher import DynamicBatcher
from teacher_server.config import TeacherConfig
from teacher_server.errors import InvalidRequest, RequestError
from teacher_server.model import LoadedModel
from teacher_server.signature import WIRE_OF_TORCH
from teacher_server.transforms import plan_outputs

__all__ = ["SERVER_VERSION", "TeacherServicer", "TensorLike", "peer_limit_message", "validate_inputs"]

log = logging.getLogger(__name__)

try:
    from importlib.metadata import version as _dist_version

    SERVER_VERSION = _dist_version("edistill")
except Exception:  # running from a source tree without metadata
    SERVER_VERSION = "0+unknown"


class TensorLike(Protocol):
    """What :func:`validate_inputs` reads of an input message (``pb.Tensor``, ``local_pb2.SharedTensor``)."""

    name: str
    dtype: int
    shape: Sequence[int]


def peer_limit_message(held: int, limit: int) -> str:
    """RESOURCE_EXHAUSTED details when one connection has ``limit`` requests in flight (gRPC and local)."""
    return (f"this connection already has {held} requests queued at this teacher "
            f"(max_queued_per_peer {limit}); wait for answers before sending more")


def _decode_wire(msg: pb.Tensor, label: str) -> torch.Tensor:
    """The gRPC path's decode: a zero-copy view of the message's bytes.

    The codec checks byte length against shape x itemsize (truncated data)
    and raises ``CodecError``, which :func:`validate_inputs` answers as
    INVALID_ARGUMENT.
    """
    return codec.to_torch(msg, what=label)


def validate_inputs(
    tensors: Sequence[TensorLike],
    model: LoadedModel,
    max_batch_size: int,
    max_elements: int | None = None,
    decode: Callable[[Any, str], torch.Tensor] = _decode_wire,
) -> tuple[list[torch.Tensor], int]:
    """Check a request's inputs against the signature; zero-copy decode them.

    Shared by the gRPC path (``pb.Tensor``, bytes in the message) and the
    local transport (``SharedTensor``, bytes in shared memory): the checks on
    name, dtype, shape and batch size only read ``name``/``dtype``/``shape``,
    so both paths answer a bad request with the same message.

    Args:
        tensors: the request's input messages (anything with ``name``,
            ``dtype`` and ``shape``).
        decode: ``decode(msg, label) -> tensor`` for one input whose dtype and
            shape already passed; raises :class:`InvalidRequest` (or
            ``codec.CodecError``) naming ``label`` when the bytes do not fit.

    Returns the input tensors in signature order (read-only views of the
    request's bytes) and the batch size.

    Raises:
        InvalidRequest: naming the input and what is wrong.
    """
    specs = model.inputs
    if len(tensors) != len(specs):
        raise InvalidRequest(f"expected {len(specs)} input(s) ({', '.join(model.input_names)}), got {len(tensors)}")
    if len(specs) == 1 and not tensors[0].name:
        ordered = [tensors[0]]  # a single unnamed input is the model's only input
    else:
        by_name = {}
        for t in tensors:
            if t.name not in model.input_names:
                raise InvalidRequest(f"unknown input {t.name!r}; this model takes {', '.join(model.input_names)}")
            if t.name in by_name:
                raise InvalidRequest(f"input {t.name!r} given twice")
            by_name[t.name] = t
        ordered = [by_name[s.name] for s in specs]
    out = []
    batch = None
    for spec, msg in zip(specs, ordered):
        label = f"input {spec.name!r}"
        want = WIRE_OF_TORCH[spec.dtype]
        if msg.dtype != want:
            raise InvalidRequest(f"{label}: dtype {codec.dtype_name(msg.dtype)}, expected {spec.dtype_name}")
        if len(msg.shape) == 0:
            raise InvalidRequest(f"{label}: shape is empty; expected {spec.describe_shape()}")
        n = msg.shape[0]
        if max_elements is not None and math.prod(msg.shape) > max_elements:
            # Checked before the shape is used for anything (a huge declared shape with tiny data).
            raise InvalidRequest(f"{label}: shape {list(msg.shape)} has more than this teacher's "
                                 f"max_tensor_elements {max_elements}; send smaller batches")
        bad = spec.mismatch(list(msg.shape[1:]))
        if bad:
            raise InvalidRequest(f"{label}: shape {list(msg.shape)}: {bad}")
        if batch is None:
            batch = n
        elif n != batch:
            raise InvalidRequest(f"{label}: batch dimension {n} differs from {batch} of input {specs[0].name!r}")
        if n < 1:
            raise InvalidRequest(f"{label}: batch is empty")
        if n > max_batch_size:
            raise InvalidRequest(f"{label}: batch of {n} exceeds this teacher's max_batch_size {max_batch_size}; "
                                 "split it into smaller requests")
        try:
            out.append(decode(msg, label))
        except codec.CodecError as exc:
            raise InvalidRequest(str(exc)) from None
    assert batch is not None
    return out, batch


class TeacherServicer(pb_grpc.TeacherServicer):
    """Implements ``Predict`` and ``Describe`` on top of a :class:`DynamicBatcher`."""

    def __init__(self, config: TeacherConfig, model: LoadedModel, batcher: DynamicBatcher, teacher_id: str) -> None:
        self.config = config
        self.model = model
        self.batcher = batcher
        self.teacher_id = teacher_id
        # Requests queued or computing per client connection (peer "ipv4:host:port").
        # Event-loop thread only, like the batcher's queue.
        self._per_peer: dict[str, int] = {}
        # Same-host transport, reported by Describe: the socket's absolute
        # path (set by TeacherServer when its LocalListener is up, "" when
        # off) and this machine's identity (students compare it with theirs).
        self.local_socket = ""
        self.host_id = localwire.host_id()

    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        """Per-connection limit around :meth:`_predict` (SECURITY.md: limits)."""
        peer = context.peer()
        held = self._per_peer.get(peer, 0)
        if held >= self.config.max_queued_per_peer:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                peer_limit_message(held, self.config.max_queued_per_peer))
        self._per_peer[peer] = held + 1
        try:
            return await self._predict(request, context)
        finally:
            left = self._per_peer[peer] - 1
            if left:
                self._per_peer[peer] = left
            else:
                del self._per_peer[peer]

    async def _predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        # A request whose deadline already passed is not computed. One that
        # expires while queued is cancelled by grpc.aio, which cancels its
        # batcher future, and the batcher skips it (tests/test_security_limits.py).
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the request was queued")
        try:
            return await self.predict(request.request_id, request.inputs, request.outputs)
        except RequestError as exc:
            await context.abort(exc.code, str(exc))

    async def predict(
        self,
        request_id: str,
        inputs: Sequence[TensorLike],
        outputs: Sequence[pb.OutputRequest],
        *,
        decode: Callable[[Any, str], torch.Tensor] = _decode_wire,
        method: str = "Predict",
    ) -> pb.PredictResponse:
        """Validate, batch and answer one request: the part shared by gRPC ``Predict`` and the local transport.

        Both paths therefore give identical answers (request id echoed,
        teacher id, model name and version, batch size, queue and compute
        times, outputs) and identical errors.

        Args:
            inputs: input messages; ``decode`` turns one into a tensor (see
                :func:`validate_inputs`).
            method: names the path in log lines.

        Raises:
            RequestError: what to answer instead (its ``code`` and message).
        """
        try:
            tensors, n = validate_inputs(inputs, self.model, self.config.max_batch_size,
                                         self.config.max_tensor_elements, decode)
            if self.model.sequence is not None:  # token ids, mask shape, length, token budget
                self.model.sequence.check(self.model.input_names, tensors, self.config.max_batch_tokens)
            plans = plan_outputs(outputs, self.model.outputs, self.model.inputs)
            result = await self.batcher.submit(tensors, plans, n)
        except RequestError as exc:
            # Client faults and overload are answered, not logged: a flood of
            # them must not become a flood of log lines. request_id is the
            # client's text, hence %r (no forged log lines).
            if exc.code not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
                log.warning("%s %r: %s: %s", method, request_id[:64], exc.code.name, exc)
            raise
        resp = pb.PredictResponse(
            request_id=request_id,
            teacher_id=self.teacher_id,
            model_name=self.config.model_name,
            model_version=self.config.model_version,
            batch_size=result.batch_size,
            queue_ms=result.queue_ms,
            compute_ms=result.compute_ms,
        )
        for ov in result.outputs:
            out = resp.outputs.add(name=ov.plan.name, transform=ov.plan.transform,
                                   temperature=ov.plan.temperature, top_k=ov.plan.top_k, sample=ov.plan.sample)
            if ov.values is not None:  # None for a sampled answer: the draws are the answer
                codec.encode(ov.values, out.values)  # built in place, one copy
            if ov.indices is not None:
                codec.encode(ov.indices, out.indices)
            if ov.tail is not None:
                codec.encode(ov.tail, out.tail)
            if ov.positions is not None:  # (n, L) bool -> (n, ceil(L/8)) bits: which positions P are
                codec.encode(pack_positions(ov.positions), out.position_mask)
            out.dense_shape.extend(ov.dense_shape)
        return resp

    async def Describe(self, request: pb.DescribeRequest, context: grpc.aio.ServicerContext) -> pb.DescribeResponse:
        """Model name and version, teacher id, input signature, output names and limits (no secrets)."""
        resp = pb.DescribeResponse(
            teacher_id=self.teacher_id,
            model_name=self.config.model_name,
            model_version=self.config.model_version,
            max_batch_size=self.config.max_batch_size,
            device=str(self.model.device),
            precision=self.config.precision,
            server_version=SERVER_VERSION,
            max_message_bytes=self.config.max_message_bytes,
            local_socket=self.local_socket,
            host_id=self.host_id,
        )
        for spec in self.model.inputs:
            spec.to_proto(resp.inputs.add())
        for spec in self.model.outputs:
            spec.to_proto(resp.outputs.add())
        return resp
