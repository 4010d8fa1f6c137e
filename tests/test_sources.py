"""The knowledge-source contract: per-sample keys, observe(), composition, typed stats.

Keys are checked against what the dataset itself says each sample is, under
shuffling and DataLoader workers; composites against hand-made answers; the
dispatcher's reading of same-host answers for a chained source against a
real teacher process.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import Future

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from student_client import (
    AnswerMissingError,
    ConfigError,
    DistillReader,
    EnsembleSource,
    FallbackSource,
    InProcessTeacher,
    KnowledgeSource,
    OutputSpec,
    SourceRequest,
    SourceStats,
    TeacherPool,
    TeacherRequestError,
    TopK,
)
from student_client.outputs import dense_answer
from tests.helpers.datasets import IdDataset
from tests.helpers.teacher_proc import TeacherProcess


class RecordingSource(KnowledgeSource):
    """Answers each batch with its own inputs at once; remembers requests and observations."""

    def __init__(self) -> None:
        self.requests: list[SourceRequest] = []
        self.observed: list[tuple[list, torch.Tensor]] = []
        self.closed = False

    def submit(self, request):
        self.requests.append(request)
        fut: Future = Future()
        fut.set_result({"logits": next(iter(request.inputs.values()))})
        return fut

    def observe(self, keys, student_outputs):
        self.observed.append((list(keys), student_outputs))

    def close(self):
        self.closed = True


class MissingSource(KnowledgeSource):
    """Has no answer for any batch (a cache that never saw these samples)."""

    def __init__(self, *, raise_at_submit: bool = False) -> None:
        self.raise_at_submit, self.asked = raise_at_submit, 0

    def submit(self, request):
        self.asked += 1
        error = AnswerMissingError(f"no answer for {request.keys}", keys=request.keys)
        if self.raise_at_submit:
            raise error
        fut: Future = Future()
        fut.set_exception(error)
        return fut

    def close(self):
        pass


# ------------------------------------------------------------------ keys


@pytest.mark.parametrize("workers", [0, 2])
def test_default_keys_are_dataset_indices_under_shuffling(workers):
    data = IdDataset(50)  # sample i carries i in column 0
    loader = DataLoader(data, batch_size=8, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(3))
    source = RecordingSource()
    with DistillReader(loader, source) as reader:
        for epoch in range(2):
            seen = []
            for (x, _), _out in reader:
                assert reader.current_keys == x[:, 0].long().tolist()  # the key is the sample's own index
                seen += reader.current_keys
            assert sorted(seen) == list(range(50)) and seen != list(range(50))  # shuffled, each once
    assert all(r.keys == r.inputs[""][:, 0].long().tolist() for r in source.requests)  # the source got them too


def test_keys_from_a_callable_and_none_for_a_plain_iterable():
    batches = [{"input": torch.full((2, 3), float(i)), "id": [f"s{2 * i}", f"s{2 * i + 1}"]} for i in range(3)]
    source = RecordingSource()
    with DistillReader(batches, source, sample_keys=lambda b: b["id"]) as reader:
        keys = [reader.current_keys for _ in reader]
    assert keys == [["s0", "s1"], ["s2", "s3"], ["s4", "s5"]]
    with DistillReader([torch.zeros(2, 3)], source) as reader:
        list(reader)
        assert reader.current_keys is None
        with pytest.raises(ConfigError, match="pass sample_keys="):
            reader.observe(torch.zeros(2, 3))


def test_an_iterable_dataset_gives_no_default_keys():
    class Stream(IterableDataset):
        def __iter__(self):
            return iter(torch.arange(12.0).reshape(6, 2))

    with DistillReader(DataLoader(Stream(), batch_size=3), RecordingSource()) as reader:
        list(reader)
        assert reader.current_keys is None


def test_keys_of_the_wrong_length_are_a_clear_error():
    with DistillReader([torch.zeros(4, 2)], RecordingSource(), sample_keys=lambda b: [1, 2]) as reader:
        with pytest.raises(ConfigError, match="2 key\\(s\\) for a batch of 4"):
            list(reader)


def test_observe_hands_the_student_outputs_of_each_batch_to_the_source_by_key():
    data = IdDataset(12)
    loader = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    source = RecordingSource()
    with DistillReader(loader, source) as reader:
        for (x, _), _ in reader:
            reader.observe(x[:, 0] * 10)  # a "prediction" that names its sample
    assert len(source.observed) == 3
    for keys, preds in source.observed:
        assert [int(p) // 10 for p in preds] == keys


# ------------------------------------------------------------ composition


def test_fallback_asks_the_next_source_only_for_missing_answers():
    for missing in (MissingSource(), MissingSource(raise_at_submit=True)):
        live = RecordingSource()
        with FallbackSource([missing, live]) as source:
            x = torch.arange(6.0).reshape(3, 2)
            out = source.submit(SourceRequest({"": x}, "b0", [0, 1, 2])).result(timeout=5)
            assert torch.equal(out["logits"], x) and missing.asked == 1 and len(live.requests) == 1
            st = source.stats()
        assert live.closed  # a composite owns its parts
        assert isinstance(st, SourceStats) and st.kind == "fallback" and st.completed == 1
        assert set(st.parts) == {"0:MissingSource", "1:RecordingSource"}


def test_fallback_does_not_hide_a_rejected_request():
    bad = InProcessTeacher(torch.nn.Linear(3, 2))
    live = RecordingSource()
    with FallbackSource([bad, live]) as source:
        error = source.submit(SourceRequest({"": torch.zeros(2, 5)}, "b")).exception(timeout=5)  # wrong width
    assert isinstance(error, TeacherRequestError) and not live.requests


def test_fallback_with_nothing_left_says_what_is_missing():
    with FallbackSource([MissingSource(), MissingSource()]) as source:
        error = source.submit(SourceRequest({"": torch.zeros(1, 2)}, "b", ["k"])).exception(timeout=5)
    assert isinstance(error, AnswerMissingError) and error.keys == ["k"]


class ConstSource(KnowledgeSource):
    def __init__(self, answer):
        self.answer = answer

    def submit(self, request):
        fut: Future = Future()
        fut.set_result({"logits": self.answer})
        return fut

    def close(self):
        pass


def test_ensemble_averages_probabilities_with_weights():
    p1 = torch.tensor([[0.7, 0.2, 0.1]])
    p2 = torch.tensor([[0.1, 0.1, 0.8]])
    members = [(ConstSource(dense_answer(p1, "probs", 2.0)), 3.0), (ConstSource(dense_answer(p2, "probs", 2.0)), 1.0)]
    with EnsembleSource(members) as source:
        out = source.submit(SourceRequest({"": torch.zeros(1, 1)}, "b")).result(timeout=5)["logits"]
    assert torch.allclose(out, torch.tensor([[0.55, 0.175, 0.275]]))  # (3 p1 + p2) / 4, by hand
    assert out.transform == "probs" and out.temperature == 2.0


def test_ensemble_of_log_probs_is_the_log_of_the_mean_probability():
    lp1 = torch.log(torch.tensor([[0.5, 0.5]]))
    lp2 = torch.log(torch.tensor([[0.9, 0.1]]))
    with EnsembleSource([ConstSource(dense_answer(lp1, "log_probs", 1.0)),
                         ConstSource(dense_answer(lp2, "log_probs", 1.0))]) as source:
        out = source.submit(SourceRequest({"": torch.zeros(1, 1)}, "b")).result(timeout=5)["logits"]
    assert torch.allclose(out, torch.log(torch.tensor([[0.7, 0.3]])))


def test_ensemble_of_top_k_probs_densifies_and_keeps_k():
    a = TopK(torch.tensor([[0.6, 0.3]]), torch.tensor([[0, 1]]), (1, 4), "probs", 1.0)
    b = TopK(torch.tensor([[0.5, 0.4]]), torch.tensor([[2, 0]]), (1, 4), "probs", 1.0)
    with EnsembleSource([ConstSource(a), ConstSource(b)]) as source:
        out = source.submit(SourceRequest({"": torch.zeros(1, 1)}, "b")).result(timeout=5)["logits"]
    # mean dense: [0.5, 0.15, 0.25, 0]: the two largest
    assert isinstance(out, TopK) and out.indices.tolist() == [[0, 2]]
    assert torch.allclose(out.values, torch.tensor([[0.5, 0.25]]))


def test_ensemble_refuses_members_that_disagree_on_the_temperature():
    with EnsembleSource([ConstSource(dense_answer(torch.ones(1, 2) / 2, "probs", 1.0)),
                         ConstSource(dense_answer(torch.ones(1, 2) / 2, "probs", 4.0))]) as source:
        error = source.submit(SourceRequest({"": torch.zeros(1, 1)}, "b")).exception(timeout=5)
    assert isinstance(error, ConfigError) and "temperatures" in str(error)


def test_ensemble_leaves_out_a_member_without_an_answer():
    p = dense_answer(torch.tensor([[0.25, 0.75]]), "probs", 1.0)
    with EnsembleSource([MissingSource(), ConstSource(p)]) as source:
        out = source.submit(SourceRequest({"": torch.zeros(1, 1)}, "b")).result(timeout=5)["logits"]
    assert torch.equal(out, p)


@pytest.mark.parametrize("weight", [0, -1.0, math.inf, True])
def test_ensemble_weights_must_be_positive_numbers(weight):
    with pytest.raises(ConfigError, match="weights"):
        EnsembleSource([(RecordingSource(), weight)])


def test_a_chained_pool_future_is_answered_by_the_dispatcher_not_the_tick(monkeypatch):
    """Same-host answers are read by whoever pumps the local hub. A composite never calls
    the pool future's result(): with the dispatcher's tick made 60 s long, its answers
    still arrive (the dispatcher pumps while a future has a done-callback)."""
    from student_client import pool as pool_mod

    features = 4
    with TeacherProcess("teacher_server.zoo:latency", "--model-kwargs",
                        f'{{"delay_ms": 5, "features": {features}}}') as t, \
            TeacherPool([t.address], ["logits"]) as pool:
        for _ in range(100):  # until the pool has switched to the local socket
            pool.submit(SourceRequest({"": torch.zeros(2, features)}, "warm")).result(timeout=30)
            if pool.stats().teachers[t.address].transport == "local":
                break
        assert pool.stats().teachers[t.address].transport == "local"
        monkeypatch.setattr(pool_mod, "_TICK_S", 60.0)
        with FallbackSource([MissingSource(), pool]) as source:
            for i in range(5):
                x = torch.full((3, features), float(i))
                done = threading.Event()
                fut = source.submit(SourceRequest({"": x}, i))
                fut.add_done_callback(lambda _f: done.set())
                assert done.wait(20), "the chained answer waited for the dispatcher's tick"
                assert torch.equal(fut.result()["logits"][:, 0], x[:, 0])


def test_in_process_and_pool_stats_are_typed():
    teacher = InProcessTeacher(torch.nn.Linear(2, 3), [OutputSpec("logits", "probs")])
    teacher.submit(SourceRequest({"": torch.zeros(4, 2)}, 0)).result()
    st = teacher.stats()
    assert isinstance(st, SourceStats) and (st.kind, st.submitted, st.completed, st.failed) == ("in-process", 1, 1, 0)
    assert str(st) == "in-process: 1/1 batches answered, 0 failed"


def test_submit_takes_a_source_request():
    with pytest.raises(ConfigError, match="SourceRequest"):
        InProcessTeacher(torch.nn.Identity()).submit({"": torch.zeros(1, 1)})
