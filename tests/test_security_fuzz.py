"""Property-based fuzzing of a real teacher process (hypothesis).

2,400 requests in all against one ``python -m teacher_server serve`` subprocess:

* 1,400 generated PredictRequests: random dtypes (valid and unknown enum
  values), shapes (empty, zero, negative, huge declared shapes with tiny data),
  data truncated / oversized / exact with NaN and Inf, random input names and
  output wishes (unknown names, NaN/negative temperatures, huge top-k);
* 1,000 raw byte strings sent through a generic unary call with no
  serializer: mutations of a good request (bit flips, truncation, splices)
  and plain garbage.

Every request must end with a clean gRPC status (never a dropped
connection or UNKNOWN), the server must answer a good request afterwards,
and its resident memory must grow by less than 50 MB over the run.

Hypothesis runs derandomized (the same examples on every CI run) with no
per-example deadline; example counts are set below.
"""

from __future__ import annotations

import collections
import struct

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import codec
from protos.edistill.v1 import teacher_pb2 as pb
from tests.helpers.teacher_proc import TeacherProcess

STRUCTURED_EXAMPLES = 1400
RAW_EXAMPLES = 1000
FEATURES = 8
RSS_GROWTH_LIMIT_MB = 50

_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.function_scoped_fixture])

# Clean answers to a hostile request: the sender's fault (INVALID_ARGUMENT,
# also for bytes that are not a PredictRequest), or a limit (RESOURCE_EXHAUSTED).
_CLEAN = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise AssertionError("no VmRSS in /proc status")


class _Fuzz:
    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20),
                                                               ("grpc.max_send_message_length", 64 << 20)])
        self.raw = self.channel.unary_unary("/edistill.v1.Teacher/Predict", request_serializer=None,
                                            response_deserializer=None)
        self.codes: collections.Counter = collections.Counter()
        self.sent = 0
        self.sent_by_phase: collections.Counter = collections.Counter()  # "structured" / "raw" / "warmup"

    def send(self, payload: bytes, *, raw: bool, phase: str) -> None:
        self.sent += 1
        self.sent_by_phase[phase] += 1
        try:
            body = self.raw(payload, timeout=10)
        except grpc.RpcError as exc:
            code = exc.code()
            self.codes[code.name] += 1
            assert code in _CLEAN, f"{code.name}: {exc.details()}"
            assert exc.details(), f"{code.name} without a message"
            return
        self.codes["OK"] += 1
        resp = pb.PredictResponse.FromString(body)
        assert resp.teacher_id


def _good_request(n: int = 2) -> pb.PredictRequest:
    req = pb.PredictRequest(request_id="good")
    codec.encode(np.ones((n, FEATURES), np.float32), req.inputs.add(name="input"))
    return req


GOOD = _good_request().SerializeToString()


@pytest.fixture(scope="module")
def teacher():
    with TeacherProcess("teacher_server.zoo:mlp", "--model-kwargs", f'{{"in_features": {FEATURES}}}',
                        "--max-batch-size", "16", "--max-tensor-elements", "100000",
                        "--max-queue-delay-ms", "0") as t:
        fuzz = _Fuzz(t.address)
        for _ in range(20):  # warm up allocator and channel before the baseline
            fuzz.send(GOOD, raw=False, phase="warmup")
        t.fuzz = fuzz
        t.rss_start_mb = _rss_mb(t.pid)
        yield t
        fuzz.channel.close()


# ------------------------------------------------------------- strategies

_special_floats = st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e38, -1e-45])
_dims = st.one_of(st.integers(-3, 20), st.sampled_from([FEATURES, 1 << 31, 1 << 40, (1 << 63) - 1]))


@st.composite
def tensors(draw) -> pb.Tensor:
    dtype = draw(st.one_of(st.sampled_from([1, 1, 1, 2, 3, 4, 5, 6, 7, 0]), st.integers(8, 1000)))
    shape = draw(st.one_of(st.just([draw(st.integers(0, 20)), FEATURES]), st.lists(_dims, max_size=5)))
    mode = draw(st.sampled_from(["exact", "exact_special", "truncated", "oversized", "tiny", "empty"]))
    itemsize = {1: 4, 2: 2, 3: 2, 4: 8, 5: 4, 6: 1, 7: 1}.get(dtype, 4)
    count = 1
    for d in shape:
        count *= max(d, 0)
    exact = count * itemsize if count * itemsize <= 1 << 20 else 64
    if mode == "exact":
        data = draw(st.binary(min_size=min(exact, 256), max_size=min(exact, 256))) * (exact // 256 + 1)
        data = data[:exact]
    elif mode == "exact_special" and dtype == 1:
        vals = draw(st.lists(_special_floats, min_size=1, max_size=8))
        data = (struct.pack(f"<{len(vals)}f", *vals) * (exact // (4 * len(vals)) + 1))[:exact]
    elif mode == "truncated":
        data = b"\0" * max(exact - draw(st.integers(1, 64)), 0)
    elif mode == "oversized":
        data = b"\x7f" * (exact + draw(st.integers(1, 4096)))
    elif mode == "tiny":
        data = b"\1\2\3"
    else:
        data = b""
    name = draw(st.one_of(st.just("input"), st.just(""), st.text(max_size=12)))
    return pb.Tensor(name=name, dtype=dtype, shape=shape, data=data)


@st.composite
def output_requests(draw) -> pb.OutputRequest:
    return pb.OutputRequest(
        name=draw(st.one_of(st.just("logits"), st.just(""), st.text(max_size=8))),
        transform=draw(st.one_of(st.sampled_from([0, 1, 2]), st.integers(3, 99))),
        temperature=draw(st.one_of(st.floats(width=32), _special_floats)),
        top_k=draw(st.one_of(st.integers(0, 12), st.sampled_from([(1 << 32) - 1, 1 << 20]))),
        dtype=draw(st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(4, 50))),
    )


requests = st.builds(
    lambda rid, ins, outs: pb.PredictRequest(request_id=rid, inputs=ins, outputs=outs),
    st.text(max_size=40), st.lists(tensors(), max_size=3), st.lists(output_requests(), max_size=3))


@st.composite
def raw_payloads(draw) -> bytes:
    kind = draw(st.sampled_from(["flip", "truncate", "splice", "garbage", "huge_varint"]))
    if kind == "garbage":
        return draw(st.binary(max_size=512))
    if kind == "huge_varint":  # field 2 (inputs), length-delimited, declared far beyond the message
        return b"\x12\xff\xff\xff\xff\x0f" + draw(st.binary(max_size=32))
    base = bytearray(GOOD)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(base) - 1))
            base[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(base)
    if kind == "truncate":
        return bytes(base[:draw(st.integers(0, len(base) - 1))])
    i = draw(st.integers(0, len(base)))
    return bytes(base[:i]) + draw(st.binary(max_size=64)) + bytes(base[i:])


# ------------------------------------------------------------------ tests


@settings(max_examples=STRUCTURED_EXAMPLES, **_SETTINGS)
@given(req=requests)
def test_generated_requests_get_clean_statuses(teacher, req):
    teacher.fuzz.send(req.SerializeToString(), raw=False, phase="structured")


@settings(max_examples=RAW_EXAMPLES, **_SETTINGS)
@given(payload=raw_payloads())
def test_mutated_and_garbage_bytes_get_clean_statuses(teacher, payload):
    teacher.fuzz.send(payload, raw=True, phase="raw")


def test_server_survives_the_fuzzing_with_bounded_memory(teacher):
    fuzz = teacher.fuzz
    # Order-independent: run here whichever fuzzing test did not run before
    # this one (e.g. `pytest -k bounded_memory`, or a different test order).
    # @given functions can be called directly with their fixture arguments.
    if not fuzz.sent_by_phase["structured"]:
        test_generated_requests_get_clean_statuses(teacher)
    if not fuzz.sent_by_phase["raw"]:
        test_mutated_and_garbage_bytes_get_clean_statuses(teacher)
    assert fuzz.sent >= 2000 + 20, f"only {fuzz.sent} requests were sent: {dict(fuzz.sent_by_phase)}"
    assert teacher.returncode is None, teacher.stderr_text()[-2000:]
    resp = pb.PredictResponse.FromString(fuzz.raw(GOOD, timeout=10))
    assert resp.outputs[0].name == "logits" and list(resp.outputs[0].values.shape) == [2, 10]
    growth = _rss_mb(teacher.pid) - teacher.rss_start_mb
    print(f"fuzz: {fuzz.sent} requests, codes {dict(fuzz.codes)}, teacher RSS growth {growth:.1f} MB")
    assert growth < RSS_GROWTH_LIMIT_MB, f"teacher RSS grew by {growth:.1f} MB; codes {dict(fuzz.codes)}"
    # The fuzzing reached the model, the validator and the parser, not just one of them.
    assert fuzz.codes["OK"] > 0 and fuzz.codes["INVALID_ARGUMENT"] > 0, dict(fuzz.codes)
