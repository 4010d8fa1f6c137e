"""Per-token soft labels on the wire: bytes per token, fidelity, served vs in-process tokens/s.

Three measurements, one JSON line each, then a summary line:

* ``bytes``: the serialized ``Output`` of a real teacher answer (what the
  servicer builds: :func:`protos.outputs.token_answer` + the codec) per sent
  token, at V = 32,000 and V = 128,256, for dense fp32, dense fp16, top-k
  k in {16, 64, 256} (compact indices: uint16 up to 65,536, int32 above;
  fp16 log-probs; fp16 tail; the position bitmask) and sampled (S draws,
  uint16/int32 ids). Random logits: the sizes do not depend on the values.
* ``fidelity``: on the trained stdlib teacher's real outputs over held-out
  text (``--model DIR``, else the LM demo's teacher is trained first), the
  mean per token of KL(full || reconstruction) and of the total variation.
  Reconstructions: fp16 log-probs renormalised; top-k with its tail spread
  evenly over the V - k other tokens; sampled: the empirical distribution
  count / S (its KL is infinite wherever a token was not drawn: reported as
  null, TV beside it; the loss reads it as an unbiased estimate, not a copy).
* ``throughput``: teacher tokens/s on the same batches of mixed lengths,
  top-64 log-probs with tail, answered by a served teacher (one
  ``teacher_server`` process, through a ``TeacherPool``, ``--window``
  batches in flight) and by the same model in this process
  (``InProcessTeacher``), rounds interleaved; ``ratio`` = served / in-process.

Run: ``python bench/lm_wire.py [--model DIR] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench import _common  # noqa: E402
from bench._common import emit, machine, median  # noqa: E402


def _bytes_per_token(V: int, B: int = 4, L: int = 64, pad: float = 0.1) -> dict[str, float]:
    import torch

    from protos import codec
    from protos import outputs as shared
    from protos.edistill.v1 import teacher_pb2 as pb

    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, V, generator=g)
    positions = torch.ones(B, L, dtype=torch.bool)
    positions[:, int(L * (1 - pad)):] = False  # 10 % padding, not sent
    sent = int(positions.sum())
    out: dict[str, float] = {}
    for dtype, name in ((torch.float32, "dense_fp32"), (torch.float16, "dense_fp16")):
        o = pb.Output(name="logits")
        codec.encode(torch.log_softmax(x, -1).to(dtype), o.values)
        o.dense_shape.extend(x.shape)
        out[name] = len(o.SerializeToString()) / (B * L)  # dense sends every position
    for what, kw in [(f"top{k}", {"top_k": k, "tail": True}) for k in (16, 64, 256)] + [("sampled12", {"sample": 12})]:
        a = shared.token_answer(x, "logits", pb.LOG_PROBS, 1.0, dtype=torch.float16, positions=positions,
                                compact=True, generator=torch.Generator().manual_seed(1), **kw)
        o = pb.Output(name="logits")
        for t, field in ((a.values, o.values), (a.indices, o.indices), (a.tail, o.tail)):
            if t is not None:
                codec.encode(t, field)
        codec.encode(shared.pack_positions(a.positions), o.position_mask)
        o.dense_shape.extend(x.shape)
        out[what] = len(o.SerializeToString()) / sent
    return out


def topk_reconstruction(log_values, indices, log_tail, vocab: int):
    """``(P, V)`` probabilities from a top-k answer with tail: the k stored ones at their token ids, the tail
    mass spread evenly over the other ``V - k`` tokens (``log_values``/``indices``: ``(P, k)``, ``log_tail``:
    ``(P,)``; computed in their dtype)."""
    k = indices.shape[-1]
    q = (log_tail.exp() / max(vocab - k, 1))[:, None].expand(-1, vocab).clone()
    return q.scatter_(-1, indices, log_values.exp())


def _kl_tv(p_log, q) -> tuple[float | None, float]:
    import torch

    p = p_log.exp()
    with torch.no_grad():
        inf = bool(((q == 0) & (p > 0)).any())
        kl = None if inf else float((p * (p_log - q.clamp_min(1e-45).log())).sum(-1).mean())
        return kl, float(0.5 * (p - q).abs().sum(-1).mean())


def _fidelity(model_dir: pathlib.Path, heldout) -> dict[str, dict]:
    import torch

    from protos import outputs as shared
    from protos.edistill.v1 import teacher_pb2 as pb
    from teacher_server.hf import load_hf_model

    model = load_hf_model(str(model_dir))
    V = model.sequence.vocab_size
    rows = []
    with torch.inference_mode():
        for b in heldout:
            logits = model.module(b["input_ids"], b["attention_mask"])
            rows.append(logits[b["attention_mask"].bool()])  # (P, V) real positions
    x = torch.cat(rows)  # (N, V)
    full = torch.log_softmax(x.float(), -1)
    res: dict[str, dict] = {}
    half = full.half().float()
    res["dense_fp16"] = _kl_tv(full, torch.softmax(half, -1))
    for k in (16, 64, 256):
        a = shared.token_answer(x[None], "logits", pb.LOG_PROBS, 1.0, top_k=min(k, V), tail=True, dtype=torch.float16)
        q = topk_reconstruction(a.values.float(), a.indices, a.tail.float(), V)
        res[f"top{k}"] = _kl_tv(full, q / q.sum(-1, keepdim=True))
    a = shared.token_answer(x[None], "logits", pb.LOG_PROBS, 1.0, sample=12, generator=torch.Generator().manual_seed(0))
    q = torch.zeros_like(full).scatter_add_(-1, a.indices, torch.full(a.indices.shape, 1 / 12))
    res["sampled12"] = _kl_tv(full, q)
    return {m: {"kl": kl, "tv": tv, "tokens": int(x.shape[0]), "vocab": V} for m, (kl, tv) in res.items()}


def _throughput(model_dir: pathlib.Path, batches, rounds: int, window: int) -> dict:
    import torch

    from student_client import InProcessTeacher, OutputSpec, SourceRequest, TeacherPool
    from teacher_server.hf import load_hf_model
    from teacher_server.process import TeacherProcess

    spec = OutputSpec("logits", "log_probs", 1.0, top_k=64, dtype="float16", tail=True, mask="attention_mask")
    inputs = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in batches]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    local = InProcessTeacher(load_hf_model(str(model_dir)).module, [spec])
    served_s, local_s = [], []
    threads = str(torch.get_num_threads())
    with TeacherProcess(str(model_dir), "--max-queue-delay-ms", "1", "--torch-threads", threads,
                        ready_timeout_s=120.0) as proc, TeacherPool([proc.address], [spec]) as pool:
        pool.wait_for_teachers(1, timeout_s=60.0)
        pool.submit(SourceRequest(inputs[0], batch_id=-1)).result()  # connection and warm-up
        local.submit(SourceRequest(inputs[0], batch_id=-1)).result()
        for r in range(rounds):
            for mode in (("served", "local") if r % 2 == 0 else ("local", "served")):
                t0 = time.perf_counter()
                if mode == "local":
                    for i, x in enumerate(inputs):
                        local.submit(SourceRequest(x, batch_id=i)).result()
                    local_s.append(time.perf_counter() - t0)
                    continue
                pending = []
                for i, x in enumerate(inputs):
                    pending.append(pool.submit(SourceRequest(x, batch_id=(r, i))))
                    if len(pending) >= window:
                        pending.pop(0).result()
                for f in pending:
                    f.result()
                served_s.append(time.perf_counter() - t0)
    served, inproc = tokens / median(served_s), tokens / median(local_s)
    return {"tokens_per_round": tokens, "batches": len(batches), "served_tokens_per_s": served,
            "inprocess_tokens_per_s": inproc, "ratio": served / inproc, "rounds": rounds, "window": window}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="the LM teacher's directory (default: train the demo's teacher)")
    p.add_argument("--rounds", type=int, default=3, help="throughput rounds per mode (default 3)")
    p.add_argument("--window", type=int, default=2, help="batches in flight to the served teacher (default 2)")
    p.add_argument("--batches", type=int, default=12, help="mixed-length batches per round (default 12)")
    _common.add_env_args(p)
    args = p.parse_args(argv)
    # The same OpenMP and malloc settings as every benchmark (docs/performance.md): with libgomp's
    # default, the in-process baseline spins at barriers while the server (two OpenMP teams) cannot.
    _common.reexec_with_env(args.omp_wait_policy)
    emit({"bench": "lm_wire", "machine": machine()})

    summary: dict = {"bench": "lm_wire", "summary": True}
    for V in (32000, 128256):
        b = _bytes_per_token(V)
        emit({"measure": "bytes_per_token", "vocab": V, **b})
        summary[f"bytes_per_token_V{V}"] = b
    from student_client._demo_lm import LMDemoConfig, TokenChunks, batch_plan, corpus, run_lm_demo, sequences

    cfg = LMDemoConfig()
    if args.model is None:
        work = pathlib.Path(tempfile.mkdtemp(prefix="edistill-lm-wire-"))
        run_lm_demo(work, LMDemoConfig(modes=(), seeds=()), report=lambda s: None)
        model_dir = work / "teacher"
    else:
        model_dir = pathlib.Path(args.model)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    _, held_texts = corpus()
    held = TokenChunks(sequences(tok, held_texts[:cfg.train_files // 8], cfg, seed=1))
    batches = [TokenChunks.collate([held[i] for i in idx])
               for idx in batch_plan(len(held), cfg.batch_size, max(args.batches, 8), seed=2)]
    fid = _fidelity(model_dir, batches[:8])
    emit({"measure": "fidelity", **fid})
    summary["fidelity"] = fid
    thr = _throughput(model_dir, batches[:args.batches], args.rounds, args.window)
    emit({"measure": "throughput", **thr})
    summary["throughput_ratio"] = thr["ratio"]
    summary["top64_V32000_bytes_per_token"] = summary["bytes_per_token_V32000"]["top64"]
    summary["dense_fp32_over_top64_V32000"] = (summary["bytes_per_token_V32000"]["dense_fp32"]
                                               / summary["bytes_per_token_V32000"]["top64"])
    emit(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
