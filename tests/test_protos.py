"""Tensor codec round-trips, malformed messages, and the generated-code staleness check."""

from __future__ import annotations

import os
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from protos import codec
from protos.edistill.v1 import teacher_pb2 as pb
from tests.helpers.teacher_proc import REPO_ROOT

TORCH_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool,
                torch.uint16]


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(0, 200, shape, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5), (0, 4), (2, 3, 4), ()], ids=["2d", "empty", "3d", "scalar"])
def test_torch_roundtrip(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = _sample(dtype, shape)
    msg = codec.encode(t, name="x")
    assert msg.name == "x" and list(msg.shape) == list(shape)
    assert len(msg.data) == t.numel() * t.element_size()
    back = codec.to_torch(msg)
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_non_contiguous_torch_roundtrip(dtype: torch.dtype) -> None:
    base = _sample(dtype, (6, 8))
    for view in (base.t(), base[:, ::2], base[1::2, 1:5]):
        assert not view.is_contiguous()
        back = codec.to_torch(codec.encode(view))
        assert torch.equal(back, view.contiguous())


@pytest.mark.parametrize("np_dtype", ["float32", "float16", "int64", "int32", "uint8", "bool", ">f4", ">i8"])
def test_numpy_roundtrip(np_dtype: str) -> None:
    arr = (np.arange(24).reshape(4, 6) % 3).astype(np_dtype)[:, ::2]  # non-contiguous
    back = codec.to_numpy(codec.encode(arr))
    np.testing.assert_array_equal(back, arr)
    assert back.dtype == arr.dtype.newbyteorder("<") or back.dtype == arr.dtype


def test_bfloat16_numpy_view_is_raw_bits() -> None:
    t = torch.tensor([1.0, -2.5], dtype=torch.bfloat16)
    raw = codec.to_numpy(codec.encode(t))
    assert raw.dtype == np.dtype("<u2")
    assert np.array_equal(raw, t.view(torch.int16).numpy().view(np.uint16))


def _bf16_bits(v: float) -> int:
    """bfloat16 of an exactly representable float: the upper half of its IEEE float32 bits."""
    return struct.unpack("<I", struct.pack("<f", v))[0] >> 16


# Every wire dtype pinned by bytes built without the codec (struct / bytes) and by its
# number in teacher.proto, so a mistake made alike in encode and decode (an enum
# renumbered, a byte order, a signedness, a bool encoding) fails here although every
# round trip above still passes. Values: negative, multi-byte and top-of-range ones.
_WIRE_FIXTURES = {
    "float32": (1, torch.float32, [1.0, -2.5], struct.pack("<2f", 1.0, -2.5)),
    "float16": (2, torch.float16, [1.0, -2.5], struct.pack("<2e", 1.0, -2.5)),
    "bfloat16": (3, torch.bfloat16, [1.0, -2.5], struct.pack("<2H", _bf16_bits(1.0), _bf16_bits(-2.5))),
    "int64": (4, torch.int64, [-3, 1 << 40], struct.pack("<2q", -3, 1 << 40)),
    "int32": (5, torch.int32, [-2, 7, 2**31 - 1], struct.pack("<3i", -2, 7, 2**31 - 1)),
    "uint8": (6, torch.uint8, [0, 7, 255], bytes([0, 7, 255])),
    "bool": (7, torch.bool, [True, False, True], bytes([1, 0, 1])),
    "uint16": (8, torch.uint16, [0, 513, 65535], struct.pack("<3H", 0, 513, 65535)),
}


@pytest.mark.parametrize("name", list(_WIRE_FIXTURES))
def test_wire_bytes_match_fixtures_built_by_hand(name: str) -> None:
    number, dtype, values, raw = _WIRE_FIXTURES[name]
    t = torch.tensor(values, dtype=dtype)
    msg = codec.encode(t)
    assert (msg.dtype, list(msg.shape), msg.data) == (number, [len(values)], raw)
    if dtype != torch.bfloat16:  # numpy has no bfloat16
        assert codec.encode(t.numpy()).data == raw
    by_hand = pb.Tensor(dtype=number, shape=[len(values)], data=raw)
    back = codec.to_torch(by_hand)
    assert back.dtype == dtype and back.tolist() == values
    if dtype != torch.bfloat16:
        assert codec.to_numpy(by_hand).tolist() == values


def test_decode_views_the_message_bytes_read_only() -> None:
    # upb hands out a fresh ``bytes`` per ``msg.data`` access; the codec adds
    # no copy on top of it: the array's memory is owned by a bytes object.
    msg = codec.encode(np.arange(16, dtype=np.float32))
    arr = codec.to_numpy(msg)
    assert not arr.flags.writeable
    base = arr
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, bytes) and base == msg.data
    assert torch.equal(codec.to_torch(msg), torch.arange(16.0))


def _msg(dtype: int, shape: list[int], nbytes: int) -> pb.Tensor:
    return pb.Tensor(name="bad", dtype=dtype, shape=shape, data=b"\0" * nbytes)


@pytest.mark.parametrize(
    "msg, needle",
    [
        (_msg(pb.FLOAT32, [2, 3], 23), "needs 24 bytes, got 23"),  # truncated
        (_msg(pb.FLOAT32, [2, 3], 25), "needs 24 bytes, got 25"),  # trailing garbage
        (_msg(pb.DATA_TYPE_UNSPECIFIED, [1], 4), "unsupported dtype"),
        (_msg(99, [1], 4), "unsupported dtype"),
        (_msg(pb.INT64, [-1, 2], 0), "negative dimension"),
        (_msg(pb.UINT8, [1 << 40, 1 << 30], 4), "needs"),  # huge declared shape, tiny data
    ],
    ids=["truncated", "too-long", "unspecified-dtype", "unknown-dtype", "negative-dim", "huge-shape"],
)
def test_malformed_messages_raise_codec_error(msg: pb.Tensor, needle: str) -> None:
    for decode in (codec.to_numpy, codec.to_torch):
        with pytest.raises(codec.CodecError, match=needle) as info:
            decode(msg)
        assert "'bad'" in str(info.value)  # names the tensor


def test_max_elements_limit() -> None:
    with pytest.raises(codec.CodecError, match="more than the limit"):
        codec.to_numpy(_msg(pb.UINT8, [10, 10], 100), max_elements=99)


@pytest.mark.parametrize("value", [np.zeros(2, np.float64), torch.zeros(2, dtype=torch.float64), [1.0, 2.0]],
                         ids=["np-float64", "torch-float64", "list"])
def test_unsupported_values_raise_codec_error(value) -> None:
    with pytest.raises(codec.CodecError):
        codec.encode(value)


def test_generated_code_is_up_to_date() -> None:
    proc = subprocess.run([sys.executable, "-m", "protos.generate", "--check"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- codec: sparse tensors, warning scope --------------------------------------


@pytest.mark.parametrize("make", [lambda t: t.to_sparse(), lambda t: t.to_sparse_csr()], ids=["coo", "csr"])
def test_encoding_a_sparse_tensor_is_a_codec_error(make) -> None:
    import torch

    with pytest.raises(codec.CodecError, match="to_dense"):
        codec.encode(make(torch.eye(3)), name="sparse")


def _python(code: str) -> subprocess.CompletedProcess:
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONWARNINGS="default")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_codec_does_not_hide_torchs_not_writable_warning_from_user_code() -> None:
    # Importing the codec used to silence this torch warning for the whole process.
    proc = _python("import protos.codec, numpy as np, torch\n"
                   "torch.from_numpy(np.frombuffer(b'abcd', np.uint8))\n")
    assert proc.returncode == 0, proc.stderr
    assert "not writable" in proc.stderr, proc.stderr


def test_codec_decode_itself_does_not_warn() -> None:
    proc = _python("import numpy as np\nfrom protos import codec\n"
                   "m = codec.encode(np.ones((2, 3), np.float32))\n"
                   "assert codec.to_torch(m).sum().item() == 6\n")
    assert proc.returncode == 0, proc.stderr
    assert "not writable" not in proc.stderr, proc.stderr


# ---- local transport framing (protos/localwire.py)


def _chunks(data: bytes, size: int) -> list[memoryview]:
    return [memoryview(data)[i:i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("chunk", [1, 3, 7, 4096], ids=lambda n: f"reads_of_{n}")
def test_frame_buffer_split_returns_every_frame_once_whatever_the_read_sizes(chunk: int) -> None:
    from protos.localwire import FrameBuffer, encode_frame

    payloads = [b"", b"a", os.urandom(300), b"xyz" * 50, os.urandom(17)]
    stream = b"".join(encode_frame(p) for p in payloads)
    fb = FrameBuffer(1 << 20)
    got = []
    for piece in _chunks(stream, chunk):
        got += [bytes(f) for f in fb.split(piece)]  # frames are parsed (copied) before the next read
    assert got == payloads


def test_frame_buffer_split_rejects_an_oversized_frame() -> None:
    from protos.localwire import FrameBuffer, FrameError, encode_frame

    with pytest.raises(FrameError, match="over the limit of 8"):
        FrameBuffer(8).split(memoryview(encode_frame(b"0123456789")))


def test_frame_parts_make_the_same_frame_as_encode_frame() -> None:
    from protos.localwire import encode_frame, frame_parts

    assert b"".join(frame_parts(b"head", b"", b"tail")) == encode_frame(b"headtail")
    assert b"".join(frame_parts()) == encode_frame(b"")


def test_local_status_names_are_grpcs_status_numbers() -> None:
    import grpc

    from protos.localwire import STATUS_NAMES, STATUS_NUMBERS

    assert STATUS_NAMES == {code.value[0]: code.name for code in grpc.StatusCode}
    assert all(STATUS_NAMES[n] == name for name, n in STATUS_NUMBERS.items())


# ---- the one dtype map (protos/codec.py)


def test_torch_dtype_maps_cover_every_wire_dtype_both_ways() -> None:
    torch_of_wire, wire_of_torch = codec.torch_dtype_maps()
    assert codec.torch_dtype_maps() == (torch_of_wire, wire_of_torch)  # built once
    assert codec.torch_dtype_maps()[0] is torch_of_wire
    assert set(torch_of_wire) == set(codec.DTYPE_NAMES.values())
    assert {wire_of_torch[t] for t in TORCH_DTYPES} == set(codec.DTYPE_NAMES.values())
    for wire, dtype in torch_of_wire.items():
        assert wire_of_torch[dtype] == wire
        assert codec.dtype_name(wire) == str(dtype).removeprefix("torch.")
    # numpy carries every wire dtype but bfloat16, under the same names
    assert {codec.DTYPE_NAMES[name] for name in codec.WIRE_OF_NP} == set(codec.DTYPE_NAMES.values()) - {pb.BFLOAT16}
    assert all(codec.WIRE_OF_NP[name] == codec.DTYPE_NAMES[name] for name in codec.WIRE_OF_NP)


def test_teacher_and_student_use_the_codecs_dtype_maps() -> None:
    from student_client import wire
    from teacher_server import signature

    assert (signature.TORCH_OF_WIRE, signature.WIRE_OF_TORCH) == codec.torch_dtype_maps()
    assert signature.WIRE_OF_TORCH is codec.torch_dtype_maps()[1]
    assert wire._WIRE_OF_NP is codec.WIRE_OF_NP
    assert wire.torch_wire_dtype(torch.zeros(1, dtype=torch.bfloat16)) == pb.BFLOAT16
    assert wire._torch_wire() is codec.torch_dtype_maps()[1]


def test_old_style_messages_parse_with_the_per_token_fields_unset() -> None:
    """Fields 1-5 of OutputRequest and 1-7 of Output as an older peer writes them, byte by byte."""
    from protos.codec import varint

    name = b"logits"
    old_request = (b"\x0a" + varint(len(name)) + name + b"\x10\x02" + b"\x1d" + np.float32(2.0).tobytes()
                   + b"\x20\x05" + b"\x28\x02")
    req = pb.OutputRequest.FromString(old_request)
    assert (req.name, req.transform, req.temperature, req.top_k, req.dtype) == ("logits", pb.LOG_PROBS, 2.0, 5,
                                                                                  pb.FLOAT16)
    assert (req.sample, req.seed, req.tail, req.mask, req.compact_indices) == (0, 0, False, "", False)
    values = codec.encode(np.zeros((2, 5), np.float32)).SerializeToString()
    indices = codec.encode(np.zeros((2, 5), np.int64)).SerializeToString()
    old_output = (b"\x0a" + varint(len(name)) + name + b"\x12" + varint(len(values)) + values
                  + b"\x1a" + varint(len(indices)) + indices + b"\x22\x02\x02\x0a" + b"\x38\x05")
    out = pb.Output.FromString(old_output)
    assert list(out.dense_shape) == [2, 10] and out.top_k == 5 and out.indices.dtype == pb.INT64
    assert not out.HasField("tail") and not out.HasField("position_mask") and out.sample == 0
    assert pb.UINT16 == 8 and codec.dtype_name(pb.UINT16) == "uint16"  # appended, old values unchanged
