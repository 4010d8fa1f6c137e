"""Per-token answers of a language-model teacher in the cache: answered positions only, exact or compact."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

transformers = pytest.importorskip("transformers")  # the test extra installs it

from student_client import (CachedTeacher, CacheMismatchError, InProcessTeacher, OutputSpec,  # noqa: E402
                            SourceRequest, record)
from student_client.cache._tokens import QUANT_STEP  # noqa: E402
from student_client.outputs import Sampled  # noqa: E402
from teacher_server.hf import CausalLMLogits  # noqa: E402
from tests.helpers.hf_models import tiny_llama  # noqa: E402

V, N = 300, 24


class Texts(Dataset):
    """Token sequences of lengths 5..16, right-padded by the collate function."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.seqs = [torch.randint(0, V, (int(n),), generator=g) for n in torch.randint(5, 17, (N,), generator=g)]

    def __len__(self) -> int:
        return N

    def __getitem__(self, i):
        return self.seqs[i]


def collate(seqs):
    """Right-padded ``input_ids`` and its ``attention_mask``."""
    from torch.nn.utils.rnn import pad_sequence

    return {"input_ids": pad_sequence(seqs, batch_first=True),
            "attention_mask": pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True)}


@pytest.fixture(scope="module")
def lm():
    return CausalLMLogits(tiny_llama(V)).eval()


def named(batch):
    """The dict batch is the model's named inputs."""
    return batch


TOPK = OutputSpec("logits", "log_probs", top_k=8, tail=True, mask="attention_mask", dtype="float16")


def ask(source, batch, keys):
    return source.submit(SourceRequest(batch, 0, keys)).result()["logits"]


@pytest.mark.parametrize("spec", [TOPK, OutputSpec("logits", "probs", temperature=2.0, sample=4, seed=1,
                                                   mask="attention_mask")], ids=["topk-tail", "sampled"])
def test_exact_codec_answers_as_the_live_teacher_in_a_new_batch_composition(tmp_path, lm, spec):
    data = Texts()
    record(DataLoader(data, batch_size=8, collate_fn=collate), InProcessTeacher(lm, [spec]), tmp_path,
           teacher_input=named)
    cache = CachedTeacher(tmp_path)
    keys = [3, 17, 0, 9, 22]  # other neighbours, so another padded length than when recorded
    batch = collate([data[k] for k in keys])
    got = ask(cache, batch, keys)
    want = ask(InProcessTeacher(lm, [spec]), batch, keys)
    assert type(got) is type(want) and got.dense_shape == want.dense_shape and torch.equal(got.mask, want.mask)
    if isinstance(want, Sampled):  # the draws were made for the recorded batch: same positions, as recorded
        assert got.indices.shape == want.indices.shape and got.temperature == want.temperature
        recorded = list(range(8))  # the first batch exactly as recorded: the cache gives back the very draws
        batch = collate([data[k] for k in recorded])
        got, want = ask(cache, batch, recorded), ask(InProcessTeacher(lm, [spec]), batch, recorded)
        assert torch.equal(got.mask, want.mask) and torch.equal(got.indices, want.indices)
        return
    m = want.mask
    # per position the recorded answer; a causal LM's answer at a real position does not depend on padding
    assert torch.allclose(got.values[m].float(), want.values[m].float(), atol=2e-3)
    assert (got.indices[m] == want.indices[m]).float().mean() > 0.99
    assert torch.allclose(got.tail[m].float(), want.tail[m].float(), atol=2e-3)
    assert not got.values[~m].any() and got.values.dtype == torch.float16


def test_compact_codec_is_within_its_quantisation_step(tmp_path, lm):
    data = Texts()
    exact, compact = tmp_path / "exact", tmp_path / "compact"
    for d, codec in ((exact, "exact"), (compact, "compact")):
        record(DataLoader(data, batch_size=8, collate_fn=collate), InProcessTeacher(lm, [TOPK]), d, token_codec=codec,
               teacher_input=named)
    keys = list(range(8))
    batch = collate([data[k] for k in keys])
    a, b = ask(CachedTeacher(exact), batch, keys), ask(CachedTeacher(compact), batch, keys)
    m = a.mask
    dense_a = a.dense()[m].float()
    dense_b = b.dense()[m].float()
    kept = torch.isfinite(dense_a)
    assert torch.equal(kept, torch.isfinite(dense_b))  # the same token ids per position
    err = (dense_a[kept] - dense_b[kept]).abs().max().item()
    assert err <= QUANT_STEP / 2 + 1e-2  # half a step, plus fp16 rounding of the values
    assert torch.equal(a.mask, b.mask)


def test_a_changed_mask_is_named(tmp_path, lm):
    data = Texts()
    record(DataLoader(data, batch_size=8, collate_fn=collate), InProcessTeacher(lm, [TOPK]), tmp_path,
           teacher_input=named)
    batch = collate([data[2], data[5]])
    batch["attention_mask"][0, 1] = 0  # a position the recording answered is masked now
    with pytest.raises(CacheMismatchError, match="sample 2 of output 'logits' was recorded with answers at"):
        ask(CachedTeacher(tmp_path), batch, [2, 5])
