"""Cache size per token for a language-model teacher, and what the stored top-k keeps of the teacher.

A small Llama teacher is trained here (nothing downloaded), with the LM demo's
parts (:mod:`student_client._demo_lm`): a byte-level BPE tokenizer
(``--vocab`` tokens) and the model (``--hidden``, ``--layers``) are trained on
Python's standard-library source files for ``--steps`` steps. Its per-token
answers on windows of held-out files (right-padded, mixed lengths) are
recorded with :func:`student_client.record` as ``OutputSpec("logits",
"log_probs", top_k=64, tail=True, mask="attention_mask", dtype="float16")``
in both token codecs, and read back through
:class:`student_client.CachedTeacher`.

Printed per codec:

* ``bytes_per_token``: every shard file's size (headers, keys, positions
  included) over the answered tokens;
* ``kl_full_vs_reconstruction``: mean over answered tokens of
  ``KL(p ‖ q̂)``, p the teacher's full softmax and q̂ the reconstruction from
  the cache (the k stored probabilities, the tail mass spread evenly over the
  other V − k tokens), in nats;
* ``topk_mass``: the mean probability the top-k holds.

    python bench/lm_cache.py [--vocab 32000] [--steps 300] [--k 64] [--hidden 128] [--layers 2]
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench import _common  # noqa: E402
from bench._common import emit  # noqa: E402
from bench.lm_wire import topk_reconstruction  # noqa: E402


def train_texts(max_bytes: int) -> tuple[list[str], list[str]]:
    """The LM demo's (train, held-out) standard-library files, the training ones cut after ``max_bytes``."""
    from student_client._demo_lm import corpus

    train, held = corpus()
    total = 0
    for n, text in enumerate(train, 1):
        total += len(text)
        if total >= max_bytes:
            return train[:n], held
    return train, held


def fidelity(model, batches: list[dict], cache, k: int, vocab: int) -> tuple[float, float]:
    """Mean KL(p ‖ q̂) over answered tokens and the mean top-k mass (``batches``: ``TokenChunks.collate``'s)."""
    import torch

    from student_client import SourceRequest
    from student_client._demo_lm import teacher_inputs

    kl_sum, mass_sum, n = 0.0, 0.0, 0
    for b in batches:
        batch = teacher_inputs(b)
        with torch.inference_mode():
            logp = torch.log_softmax(model(**batch).double(), -1)  # (B, L, V)
        answer = cache.submit(SourceRequest(batch, 0, b["index"].tolist())).result()["logits"]
        m = answer.mask
        p_log = logp[m]  # (P, V)
        idx = answer.indices[m]  # (P, k)
        q = topk_reconstruction(answer.values[m].double(), idx, answer.tail[m].double(), vocab)  # (P, V)
        kl_sum += float((p_log.exp() * (p_log - q.log())).sum())
        mass_sum += float(p_log.gather(1, idx).exp().sum())
        n += int(m.sum())
    return kl_sum / n, mass_sum / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128, help="the teacher's width")
    p.add_argument("--layers", type=int, default=2, help="the teacher's layers")
    p.add_argument("--length", type=int, default=128, help="longest window (the shortest: a quarter)")
    p.add_argument("--windows", type=int, default=96, help="held-out sequences recorded")
    p.add_argument("--corpus-bytes", type=int, default=4_000_000, help="training text (from the LM demo's files)")
    _common.add_env_args(p)
    opts = p.parse_args(argv)
    _common.reexec_with_env(opts.omp_wait_policy)
    from torch.utils.data import DataLoader

    from student_client import CachedTeacher, InProcessTeacher, OutputSpec, record
    from student_client._demo_lm import (LMDemoConfig, TokenChunks, batch_plan, llama, perplexity, sequences,
                                         teacher_inputs, train_lm, train_tokenizer)
    from teacher_server.hf import CausalLMLogits

    train, held = train_texts(opts.corpus_bytes)
    tok = train_tokenizer(train, opts.vocab)
    vocab = tok.get_vocab_size()
    cut = LMDemoConfig(seq_min=opts.length // 4, seq_max=opts.length)
    chunks = TokenChunks(sequences(tok, train, cut, seed=0))
    loader = DataLoader(chunks, batch_sampler=batch_plan(len(chunks), 16, opts.steps, seed=0),
                        collate_fn=TokenChunks.collate)
    lm = train_lm(llama(vocab, opts.hidden, opts.layers, opts.length, seed=0), loader, opts.steps, lr=3e-3)
    data = TokenChunks(sequences(tok, held, cut, seed=1)[:opts.windows])
    held_batches = list(DataLoader(data, batch_size=16, collate_fn=TokenChunks.collate))  # as recorded
    heldout_nll = math.log(perplexity(lm, held_batches))
    model = CausalLMLogits(lm).eval()
    emit({"config": {"bench": "lm_cache", **vars(opts), "vocab_size": vocab, "train_chunks": len(chunks),
                     "teacher_heldout_nll": round(heldout_nll, 3), **_common.machine()}})
    spec = OutputSpec("logits", "log_probs", top_k=opts.k, tail=True, mask="attention_mask", dtype="float16")
    work = pathlib.Path(tempfile.mkdtemp(prefix="edistill-lm-cache-"))
    answered = sum(len(seq) for seq in data.seqs)
    results = {}
    for codec in ("exact", "compact"):
        out = work / codec
        record(DataLoader(data, batch_size=16, collate_fn=TokenChunks.collate), InProcessTeacher(model, [spec]), out,
               teacher_input=teacher_inputs, token_codec=codec)
        size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        kl, mass = fidelity(model, held_batches, CachedTeacher(out), opts.k, vocab)
        results[codec] = {"bytes_per_token": round(size / answered, 1), "kl_full_vs_reconstruction": round(kl, 5),
                          "topk_mass": round(mass, 4)}
        emit({"codec": codec, "answered_tokens": answered, "shard_bytes": size, **results[codec]})
    emit({"summary": True, "vocab_size": vocab, "k": opts.k, "answered_tokens": answered, **results,
          "target_bytes_per_token": 150})
    return 0


if __name__ == "__main__":
    sys.exit(main())
