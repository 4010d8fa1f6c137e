"""Unit tests of DistillReader with a fake knowledge source, and of InProcessTeacher.

The fake source answers on a background thread in a shuffled (seeded) order,
so in-order delivery, the window bound and exactly-once are tested against
out-of-order completion.
"""

from __future__ import annotations

import inspect
import random
import threading
from concurrent.futures import Future

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from student_client import (
    ConfigError,
    DistillReader,
    InProcessTeacher,
    KnowledgeSource,
    OutputSpec,
    SourceRequest,
    StudentError,
    TeacherRequestError,
    TopK,
)
from student_client.inputs import default_teacher_input, make_input_fn
from student_client.transfer import move_outputs, should_pin
from tests.helpers import datasets


class ShuffledSource(KnowledgeSource):
    """Resolves futures from a thread in a seeded random order; echoes the sent ids as 'logits'."""

    def __init__(self, seed: int = 0, fail_batch: int | None = None) -> None:
        self.rng = random.Random(seed)
        self.fail_batch = fail_batch
        self.lock = threading.Condition()
        self.pending: list[tuple[Future, dict]] = []
        self.submitted: list[str] = []
        self.max_pending = 0
        self.cancelled = 0
        self.closed = False
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def submit(self, request):
        inputs, batch_id = request.inputs, request.batch_id
        fut: Future = Future()
        with self.lock:
            self.submitted.append(batch_id)
            self.pending.append((fut, dict(inputs)))
            live = sum(1 for f, _ in self.pending if not f.done())
            self.max_pending = max(self.max_pending, live)
            self.lock.notify()
        fut.add_done_callback(self._count_cancel)
        return fut

    def _count_cancel(self, fut):
        if fut.cancelled():
            with self.lock:
                self.cancelled += 1

    def _run(self):
        while True:
            with self.lock:
                while not self.stop and not self.pending:
                    self.lock.wait()
                if self.stop:
                    return
                if len(self.pending) < 2:
                    self.lock.wait(0.005)  # let a second batch arrive, so answers come out of order
                fut, inputs = self.pending.pop(self.rng.randrange(len(self.pending)))
            if fut.done():
                continue
            x = next(iter(inputs.values()))
            ids = torch.as_tensor(x)[:, 0].float()
            if self.fail_batch is not None and int(ids[0]) == self.fail_batch:
                fut.set_exception(TeacherRequestError("bad batch", code="INVALID_ARGUMENT"))
            else:
                try:
                    fut.set_result({"logits": ids.unsqueeze(1).repeat(1, 3)})
                except Exception:  # cancelled meanwhile
                    pass

    def close(self):
        self.closed = True
        with self.lock:
            self.stop = True
            self.lock.notify_all()
        self.thread.join(5)


def IdDataset(n: int) -> datasets.IdDataset:
    """Labels i % 3 (several samples per class in a small batch)."""
    return datasets.IdDataset(n, num_classes=3)


def ids_of(batch) -> list[int]:
    return batch[0][:, 0].long().tolist()


@pytest.fixture
def source():
    s = ShuffledSource(seed=1234)
    yield s
    s.close()


def test_batches_arrive_in_order_exactly_once_with_their_own_outputs(source):
    loader = DataLoader(IdDataset(103), batch_size=8)
    with DistillReader(loader, source=source, window=5) as reader:
        seen = []
        for batch, out in reader:
            ids = ids_of(batch)
            assert out["logits"][:, 0].long().tolist() == ids  # outputs belong to this batch
            seen.extend(ids)
    assert seen == list(range(103))
    assert 1 < source.max_pending <= 5
    assert not source.closed  # a caller's source is the caller's to close


def test_each_iter_is_a_new_epoch(source):
    loader = DataLoader(IdDataset(20), batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(0))
    with DistillReader(loader, source=source, window=3) as reader:
        epochs = [sorted(i for b, _ in reader for i in ids_of(b)) for _ in range(3)]
        st = reader.stats()
    assert epochs == [list(range(20))] * 3
    assert st.epochs == 3 and st.batches == 12 and st.wait_s >= 0.0


class HoldSource(KnowledgeSource):
    """Answers the first ``answer`` batches at once and holds the rest."""

    def __init__(self, answer: int) -> None:
        self.answer, self.futures = answer, []

    def submit(self, request):
        inputs = request.inputs
        fut: Future = Future()
        if len(self.futures) < self.answer:
            fut.set_result({"logits": next(iter(inputs.values()))})
        self.futures.append(fut)
        return fut

    def close(self):
        pass


def test_break_mid_epoch_cancels_in_flight_batches():
    src = HoldSource(answer=3)
    reader = DistillReader(DataLoader(IdDataset(100), batch_size=4), source=src, window=6)
    for i, _ in enumerate(reader):
        if i == 2:
            break
    # `break` released the epoch; its held batches were cancelled without close()
    assert len(src.futures) == 3 + 5  # the window never ran ahead further
    assert all(f.cancelled() for f in src.futures[3:])
    reader.close()


def test_new_iter_closes_an_unfinished_epoch(source):
    loader = DataLoader(IdDataset(40), batch_size=4)
    with DistillReader(loader, source=source, window=4) as reader:
        it = iter(reader)
        next(it)
        assert [ids_of(b)[0] for b, _ in reader] == list(range(0, 40, 4))
        with pytest.raises(StopIteration):
            next(it)


def test_source_error_surfaces_and_later_batches_are_cancelled():
    src = ShuffledSource(seed=7, fail_batch=12)
    try:
        loader = DataLoader(IdDataset(64), batch_size=4)
        reader = DistillReader(loader, source=src, window=4)
        got = []
        with pytest.raises(TeacherRequestError, match="bad batch"):
            for b, _ in reader:
                got.extend(ids_of(b))
        assert got == list(range(12))
        reader.close()
        with src.lock:
            assert all(f.done() for f, _ in src.pending)
    finally:
        src.close()


def test_works_with_a_multiprocess_dataloader_and_an_in_process_teacher():
    class Echo(torch.nn.Module):
        def forward(self, x):  # (B, 4) -> (B, 3) logits whose column 0 is the id
            return x[:, :1] + torch.tensor([0.0, 0.5, 0.25])

    loader = DataLoader(IdDataset(64), batch_size=8, num_workers=2, shuffle=True,
                        generator=torch.Generator().manual_seed(3))
    teacher = InProcessTeacher(Echo(), [OutputSpec("logits"), ])
    with DistillReader(loader, source=teacher, window=4) as reader:
        seen = []
        for (x, y), out in reader:
            assert torch.equal(out["logits"][:, 0], x[:, 0])
            assert torch.equal(y, x[:, 0].long() % 3)
            seen.extend(x[:, 0].long().tolist())
    assert sorted(seen) == list(range(64))


def test_in_process_teacher_applies_output_specs_like_a_server():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 7)
    x = torch.randn(3, 5)
    specs = [OutputSpec("logits", "log_probs", temperature=2.0, top_k=3, dtype="float16")]
    out = InProcessTeacher(model, specs).submit(SourceRequest({"": x}, 0)).result()["logits"]
    assert isinstance(out, TopK) and out.dense_shape == (3, 7) and out.values.dtype == torch.float16
    ref = torch.log_softmax(model(x).detach() / 2.0, dim=-1)
    v, i = ref.topk(3, dim=-1)
    assert torch.equal(out.indices, i) and torch.allclose(out.values.float(), v, atol=1e-2)
    dense = out.dense()
    assert dense.shape == (3, 7) and torch.isinf(dense).sum() == 3 * 4


def test_in_process_teacher_unknown_output_fails_the_future():
    fut = InProcessTeacher(torch.nn.Identity(), ["probs_out"]).submit(SourceRequest({"": torch.zeros(2, 2)}, 0))
    with pytest.raises(StudentError, match="no output 'probs_out'"):
        fut.result()


@pytest.mark.parametrize("batch, expected", [
    ((torch.ones(2, 3), torch.zeros(2)), {"": torch.ones(2, 3)}),
    ([torch.ones(2, 3), torch.zeros(2)], {"": torch.ones(2, 3)}),
    ({"input": torch.ones(2, 3), "label": torch.zeros(2)}, {"": torch.ones(2, 3)}),
    (torch.ones(2, 3), {"": torch.ones(2, 3)}),
])
def test_default_teacher_input_forms(batch, expected):
    got = make_input_fn(None)(batch)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_ndarray_batch_and_named_inputs():
    arr = np.ones((2, 3), np.float32)
    assert make_input_fn(None)(arr)[""] is arr
    fn = make_input_fn(lambda b: {"image": b["img"], "mask": b["m"]})
    got = fn({"img": torch.ones(2, 3), "m": torch.zeros(2, 3), "y": 1})
    assert set(got) == {"image", "mask"}


@pytest.mark.parametrize("batch, match", [
    ({"image": torch.ones(1)}, "without an 'input' key"),
    ((), "empty"),
    ("text", "cannot tell"),
])
def test_default_teacher_input_explains_what_to_do(batch, match):
    with pytest.raises(ConfigError, match=match):
        default_teacher_input(batch)


def test_custom_teacher_input_must_return_tensors():
    with pytest.raises(ConfigError, match="teacher_input returned"):
        make_input_fn(lambda b: "nope")(torch.ones(1))


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "exactly one of"),
    (dict(teachers=["a:1"], source="x"), "exactly one of"),
    (dict(teachers=["a:1"], window=0), "window"),
    (dict(teachers=[]), "non-empty"),
    (dict(teachers="a:1"), "non-empty"),
    (dict(teachers=["a:1"], service="svc"), "service= only"),
    (dict(source=InProcessTeacher(torch.nn.Identity()), outputs=["x"]), "outputs="),
    (dict(teachers=["a:1"], device="nodevice"), "invalid device"),
    (dict(registry="redis://127.0.0.1:1/0"), "service="),
])
def test_reader_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DistillReader([], **kwargs)


def test_the_reader_signature_is_small_and_source_first():
    params = list(inspect.signature(DistillReader).parameters)
    assert params == ["loader", "source", "teachers", "registry", "service", "outputs", "window", "teacher_input",
                      "sample_keys", "device", "progress", "log_every"]


@pytest.mark.parametrize("name, value, where", [
    ("timeout_s", 3, "PoolConfig(timeout_s=...)"),
    ("wait_timeout_s", 3, "PoolConfig(wait_timeout_s=...)"),
    ("pool_config", None, "config=PoolConfig(...)"),
    ("registry_poll_s", 0.5, "TeacherPool.from_registry(url, service, outputs, poll_s=...)"),
    ("channel_factory", None, "TeacherPool(teachers, outputs, channel_factory=...)"),
    ("stub_factory", None, "TeacherPool(teachers, outputs, stub_factory=...)"),
    ("credentials", None, "credentials=TeacherCredentials(...)"),
    ("auth_token", "t", "TeacherCredentials(auth_token=...)"),
    ("auth_token_file", "f", "TeacherCredentials(auth_token_file=...)"),
    ("tls_ca", "ca.pem", "TeacherCredentials(tls_ca=...)"),
    ("tls_cert", "c.pem", "TeacherCredentials(tls_cert=...)"),
    ("tls_key", "k.pem", "TeacherCredentials(tls_key=...)"),
    ("tls_server_name", "teacher", "TeacherCredentials(tls_server_name=...)"),
])
def test_a_moved_keyword_argument_names_its_new_place(name, value, where):
    with pytest.raises(ConfigError) as info:
        DistillReader([], teachers=["127.0.0.1:1"], **{name: value})
    assert f"no longer takes {name}=" in str(info.value) and where in str(info.value)


def test_closed_reader_refuses_new_epochs(source):
    reader = DistillReader([torch.zeros(1, 4)], source=source)
    reader.close()
    with pytest.raises(ConfigError, match="closed"):
        iter(reader)


def test_device_move_keeps_structure_and_skips_pinning_off_cuda(source):
    out = {"logits": torch.ones(2, 3), "top": TopK(torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long), (2, 3))}
    moved = move_outputs(out, torch.device("meta"))
    assert moved["logits"].device.type == "meta" and moved["top"].values.device.type == "meta"
    assert moved["top"].indices.device.type == "meta" and moved["top"].dense_shape == (2, 3)
    assert not should_pin(torch.device("cpu")) and not should_pin(torch.device("meta"))
    loader = [(torch.arange(4.0).reshape(1, 4), 0)]
    with DistillReader(loader, source=source, device="meta") as reader:
        (_, out), = list(reader)
    assert out["logits"].device.type == "meta"


def test_pinning_is_chosen_only_for_cuda_with_a_runtime(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert should_pin(torch.device("cuda:0")) and not should_pin(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not should_pin(torch.device("cuda:0"))


def test_dataloader_workers_do_not_fork_a_process_running_grpc():
    # Forking while the pool's gRPC threads hold an internal lock can abort a
    # worker (seen in CI); the reader moves default-fork loaders to forkserver
    # and leaves an explicit choice alone.
    src = InProcessTeacher(lambda x: x)
    forked = DataLoader(IdDataset(8), batch_size=4, num_workers=1)
    DistillReader(forked, source=src)
    assert forked.multiprocessing_context is not None
    assert forked.multiprocessing_context.get_start_method() == "forkserver"
    chosen = DataLoader(IdDataset(8), batch_size=4, num_workers=1, multiprocessing_context="spawn")
    DistillReader(chosen, source=src)
    assert chosen.multiprocessing_context.get_start_method() == "spawn"
    inline = DataLoader(IdDataset(8), batch_size=4)
    DistillReader(inline, source=src)
    assert inline.multiprocessing_context is None
