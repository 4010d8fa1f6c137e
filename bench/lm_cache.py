"""Cache size per token for a language-model teacher, and what the stored top-k keeps of the teacher.

A small Llama teacher is trained here (nothing downloaded): a byte-level BPE
tokenizer (``tokenizers``, ``--vocab`` tokens) and the model are trained on
Python's standard-library source files, for ``--steps`` steps. Its per-token
answers on held-out windows (right-padded, mixed lengths) are recorded with
:func:`student_client.record` as ``OutputSpec("logits", "log_probs",
top_k=64, tail=True, mask="attention_mask", dtype="float16")`` in both token
codecs, and read back through :class:`student_client.CachedTeacher`.

Printed per codec:

* ``bytes_per_token``: every shard file's size (headers, keys, positions
  included) over the answered tokens;
* ``kl_full_vs_reconstruction``: mean over answered tokens of
  ``KL(p ‖ q̂)``, p the teacher's full softmax and q̂ the reconstruction from
  the cache (the k stored probabilities, the tail mass spread evenly over the
  other V − k tokens), in nats;
* ``topk_mass``: the mean probability the top-k holds.

    python bench/lm_cache.py [--vocab 32000] [--steps 300] [--k 64]
"""

from __future__ import annotations

import argparse
import math
import pathlib
import random
import sys
import sysconfig
import tempfile

import _common
from _common import emit

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from student_client import CachedTeacher, InProcessTeacher, OutputSpec, SourceRequest, record  # noqa: E402


def corpus(max_bytes: int) -> list[str]:
    """Standard-library source files, in a fixed order, up to ``max_bytes``."""
    files = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts, total = [], 0
    for f in files:
        text = f.read_text(errors="replace")
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return texts


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def train_teacher(ids: torch.Tensor, vocab: int, steps: int, length: int, batch: int):
    import transformers

    from teacher_server.hf import CausalLMLogits

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=length)
    torch.manual_seed(0)
    model = CausalLMLogits(transformers.LlamaForCausalLM(cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    loss = None
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - length - 1, (batch,), generator=gen)
        x = torch.stack([ids[s:s + length] for s in starts.tolist()])
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), float(loss)


class Windows(torch.utils.data.Dataset):
    """Held-out windows of random lengths (right-padded by :func:`collate`)."""

    def __init__(self, ids: torch.Tensor, n: int, length: int) -> None:
        rng = random.Random(1)
        self.items = []
        for _ in range(n):
            size = rng.randint(length // 4, length)
            start = rng.randrange(0, len(ids) - size)
            self.items.append(ids[start:start + size])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(seqs):
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.int64)
    mask = torch.zeros(len(seqs), L, dtype=torch.int64)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    return {"input_ids": ids, "attention_mask": mask}


def fidelity(model, data: Windows, cache: CachedTeacher, k: int, vocab: int) -> tuple[float, float]:
    """Mean KL(p ‖ q̂) over answered tokens and the mean top-k mass."""
    kl_sum, mass_sum, n = 0.0, 0.0, 0
    for start in range(0, len(data), 16):
        keys = list(range(start, min(start + 16, len(data))))
        batch = collate([data[i] for i in keys])
        with torch.inference_mode():
            logp = torch.log_softmax(model(**batch).double(), -1)  # (B, L, V)
        answer = cache.submit(SourceRequest(batch, 0, keys)).result()["logits"]
        m = answer.mask
        p_log = logp[m]  # (P, V)
        vals = answer.values[m].double()  # (P, k) log-probs
        idx = answer.indices[m]
        tail = answer.tail[m].double()  # (P,) log of the mass outside
        q_log = (tail - math.log(vocab - k))[:, None].expand_as(p_log).clone()
        q_log.scatter_(1, idx, vals)
        kl_sum += float((p_log.exp() * (p_log - q_log)).sum())
        mass_sum += float(p_log.gather(1, idx).exp().sum())
        n += int(m.sum())
    return kl_sum / n, mass_sum / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--windows", type=int, default=96, help="held-out sequences recorded")
    p.add_argument("--corpus-bytes", type=int, default=4_000_000)
    _common.add_env_args(p)
    opts = p.parse_args(argv)
    _common.reexec_with_env(opts.omp_wait_policy)
    texts = corpus(opts.corpus_bytes)
    tok = train_tokenizer(texts, opts.vocab)
    vocab = tok.get_vocab_size()
    ids = torch.tensor([t for e in tok.encode_batch(texts) for t in e.ids], dtype=torch.int64)
    split = int(0.9 * len(ids))
    model, train_loss = train_teacher(ids[:split], vocab, opts.steps, opts.length, batch=16)
    data = Windows(ids[split:], opts.windows, opts.length)
    emit({"config": {"bench": "lm_cache", **vars(opts), "vocab_size": vocab, "corpus_tokens": len(ids),
                     "teacher_train_loss": round(train_loss, 3), **_common.machine()}})
    spec = OutputSpec("logits", "log_probs", top_k=opts.k, tail=True, mask="attention_mask", dtype="float16")
    work = pathlib.Path(tempfile.mkdtemp(prefix="edistill-lm-cache-"))
    answered = sum(len(s) for s in data.items)
    results = {}
    for codec in ("exact", "compact"):
        out = work / codec
        record(DataLoader(data, batch_size=16, collate_fn=collate), InProcessTeacher(model, [spec]), out,
               teacher_input=lambda b: b, token_codec=codec)
        size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        kl, mass = fidelity(model, data, CachedTeacher(out), opts.k, vocab)
        results[codec] = {"bytes_per_token": round(size / answered, 1), "kl_full_vs_reconstruction": round(kl, 5),
                          "topk_mass": round(mass, 4)}
        emit({"codec": codec, "answered_tokens": answered, "shard_bytes": size, **results[codec]})
    emit({"summary": True, "vocab_size": vocab, "k": opts.k, "answered_tokens": answered, **results,
          "target_bytes_per_token": 150})
    return 0


if __name__ == "__main__":
    sys.exit(main())
