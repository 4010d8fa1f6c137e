"""``edistill demo --lm``: language-model distillation through the service, on Python's own source files.

1. A byte-level BPE tokenizer (``tokenizers``) and a small Llama teacher
   (transformers) are trained on the standard library's ``*.py`` files (every
   machine with Python has them; no download); the teacher is saved as a
   Hugging Face directory.
2. Two teacher processes serve that directory (``python -m teacher_server
   serve --model DIR``) and register in an embedded Redis.
3. A smaller student is trained, for each seed, four ways on the same batches
   from the same initialisation: cross-entropy only; CE + top-k KD over the
   service; CE + sampled KD over the service (Random-Sampling KD); CE + dense
   KD from the teacher in the student's process. In the first service run one
   teacher is SIGKILLed mid-training (a replacement is started); every batch
   is checked to arrive exactly once.
4. Held-out perplexity (files the tokenizer and teacher never saw) per mode,
   mean ± std over the seeds.

Private to :mod:`student_client.demo`; :func:`run_lm_demo` is the entry point
and ``examples/distill_lm.py`` the annotated script around it.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import sysconfig
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from student_client._demo_data import check_epoch
from student_client._demo_fleet import ProcessFleet
from student_client._demo_report import mean_std

log = logging.getLogger(__name__)

SERVICE = "edistill-demo-lm"
MODES = ("ce", "topk_service", "sampled_service", "dense_inprocess")


@dataclass(frozen=True)
class LMDemoConfig:
    """Sizes of the LM demo; the defaults run in about 8 minutes on 2 cores (503 s measured)."""

    vocab_size: int = 1024  # BPE merges learned on the corpus
    seq_min: int = 16  # sequences of mixed lengths: the teacher's batcher pads them together
    seq_max: int = 64
    train_files: int = 120  # stdlib files for training (sorted by name, every 8th held out)
    teacher_hidden: int = 128
    teacher_layers: int = 4
    teacher_steps: int = 3000
    student_hidden: int = 48
    student_layers: int = 2
    student_steps: int = 400
    batch_size: int = 16
    lr: float = 3e-3
    top_k: int = 64
    sample: int = 12  # draws per position for sampled KD (the paper's ~12)
    temperature: float = 1.0
    kd_weight: float = 1.0  # loss = CE + kd_weight * KD
    seeds: tuple[int, ...] = (0, 1, 2)
    teachers: int = 2
    kill_at: float = 0.3  # fraction of the first service run's steps at which one teacher is SIGKILLed
    heldout_batches: int = 24
    modes: tuple[str, ...] = MODES

    @classmethod
    def tiny(cls) -> "LMDemoConfig":
        """A few steps of tiny models: the smoke test's size."""
        return cls(vocab_size=300, seq_min=8, seq_max=24, train_files=12, teacher_hidden=32, teacher_layers=1,
                   teacher_steps=8, student_hidden=16, student_layers=1, student_steps=12, batch_size=4,
                   top_k=8, sample=4, seeds=(0,), heldout_batches=2)


# ------------------------------------------------------------------ data


def corpus() -> tuple[list[str], list[str]]:
    """(train, held-out) texts: the standard library's top-level ``*.py`` files, every 8th held out."""
    files = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = [(f.name, f.read_text(encoding="utf-8", errors="replace")) for f in files]
    return [t for i, (_, t) in enumerate(texts) if i % 8], [t for i, (_, t) in enumerate(texts) if i % 8 == 0]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (no unknown tokens) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def sequences(tok, texts: list[str], cfg: LMDemoConfig, seed: int) -> list[list[int]]:
    """The texts' tokens cut into pieces of random lengths in ``[seq_min, seq_max]``."""
    import random

    rng = random.Random(seed)
    ids = [i for enc in tok.encode_batch(texts) for i in enc.ids]
    out, pos = [], 0
    while pos + cfg.seq_min <= len(ids):
        n = rng.randint(cfg.seq_min, cfg.seq_max)
        out.append(ids[pos:pos + n])
        pos += n
    return out


class TokenChunks:
    """Map-style dataset of token lists; :meth:`collate` right-pads a batch and masks the padding."""

    def __init__(self, seqs: list[list[int]]) -> None:
        self.seqs = seqs

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int):
        return i, self.seqs[i]

    @staticmethod
    def collate(items) -> dict[str, Any]:
        import torch

        longest = max(len(s) for _, s in items)
        ids = torch.zeros(len(items), longest, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for row, (_, s) in enumerate(items):
            ids[row, :len(s)] = torch.tensor(s)
            mask[row, :len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100),
                "index": torch.tensor([i for i, _ in items])}


def teacher_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """What the teacher sees of a batch (the reader's ``teacher_input=``)."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def batch_plan(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` batches of dataset indices, epoch after epoch, shuffled by ``seed``."""
    import random

    rng = random.Random(seed)
    out: list[list[int]] = []
    while len(out) < steps:
        order = list(range(n))
        rng.shuffle(order)
        out += [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    return out[:steps]


# ---------------------------------------------------------------- models


def llama(vocab: int, hidden: int, layers: int, max_pos: int, seed: int):
    """A small transformers Llama causal LM (tied embeddings), initialised from ``seed``."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=max(1, hidden // 16),
                                   num_key_value_heads=max(1, hidden // 16), max_position_embeddings=max_pos,
                                   tie_word_embeddings=True)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def _lm_loss(model, batch) -> Any:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 labels=batch["labels"], use_cache=False)


def train_lm(model, loader, steps: int, lr: float, step_fn: Callable[[Any, Any, Any], Any] | None = None):
    """AdamW with cosine decay over ``steps``; ``step_fn(model, batch, teacher) -> loss`` (default: CE)."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    done = 0
    for item in loader:
        batch, teacher = item if isinstance(item, tuple) else (item, None)
        loss = step_fn(model, batch, teacher) if step_fn else _lm_loss(model, batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        done += 1
        if done >= steps:
            break
    model.eval()
    return model


def perplexity(model, batches: list[dict[str, Any]]) -> float:
    """exp(mean next-token NLL) over every real token of ``batches``."""
    import torch

    total = count = 0.0
    with torch.inference_mode():
        for b in batches:
            n = int((b["labels"][:, 1:] != -100).sum())
            total += float(_lm_loss(model, b).loss) * n
            count += n
    return math.exp(total / count)


# ------------------------------------------------------------------ runs


@dataclass
class LMResult:
    """Perplexities per mode (one per seed), the teacher's, and the fault check."""

    config: dict
    teacher_ppl: float
    ppl: dict[str, list[float]] = field(default_factory=dict)
    lost: int = 0
    duplicated: int = 0
    killed: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, str]:
        """``mode -> "mean ± std"`` of the held-out perplexity."""
        return {m: _mean_std(v) for m, v in self.ppl.items()}


def _mean_std(v: list[float]) -> str:
    return "{:.3f} ± {:.3f}".format(*mean_std(v))


def _fleet(model_dir: pathlib.Path, registry: str, log_dir: pathlib.Path) -> ProcessFleet:
    """Teacher processes serving the model directory, registered in the embedded Redis."""
    return ProcessFleet(str(model_dir), "--name", "stdlib-llama", "--service", SERVICE,
                        "--max-queue-delay-ms", "2", "--max-batch-tokens", "16384",
                        registry=registry, log_dir=log_dir, env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
                        ready_timeout_s=120.0, grace_s=10.0)


def _kd_step(kd, cfg: LMDemoConfig):
    def step(model, batch, teacher):
        out = _lm_loss(model, batch)
        return out.loss + cfg.kd_weight * kd(out.logits, teacher, labels=batch["labels"])
    return step


def run_lm_demo(work_dir: str | pathlib.Path, cfg: LMDemoConfig = LMDemoConfig(),
                report: Callable[[str], None] = print) -> LMResult:
    """Train the teacher, serve it from ``cfg.teachers`` processes, distil the students; return the figures."""
    from torch.utils.data import DataLoader

    from registry import EmbeddedRedis
    from student_client import DistillReader, InProcessTeacher, SequenceKDLoss
    from teacher_server.hf import CausalLMLogits

    t0 = time.perf_counter()
    work = pathlib.Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    train_texts, held_texts = corpus()
    train_texts = train_texts[:cfg.train_files]
    tok = train_tokenizer(train_texts, cfg.vocab_size)
    vocab = tok.get_vocab_size()
    data = TokenChunks(sequences(tok, train_texts, cfg, seed=0))
    held = TokenChunks(sequences(tok, held_texts[:max(2, cfg.train_files // 8)], cfg, seed=1))
    heldout = [TokenChunks.collate([held[i] for i in b])
               for b in batch_plan(len(held), cfg.batch_size, cfg.heldout_batches, seed=1)]
    report(f"corpus: {len(train_texts)} stdlib files, {len(data)} training sequences of "
           f"{cfg.seq_min}-{cfg.seq_max} tokens, BPE vocabulary {vocab}")

    def loader(plan):
        return DataLoader(data, batch_sampler=plan, collate_fn=TokenChunks.collate)

    teacher = llama(vocab, cfg.teacher_hidden, cfg.teacher_layers, cfg.seq_max, seed=1234)
    train_lm(teacher, loader(batch_plan(len(data), cfg.batch_size, cfg.teacher_steps, seed=99)),
             cfg.teacher_steps, cfg.lr)
    model_dir = work / "teacher"
    teacher.save_pretrained(model_dir)
    tok.save(str(model_dir / "tokenizer.json"))
    result = LMResult(asdict(cfg), perplexity(teacher, heldout))
    report(f"teacher: {sum(p.numel() for p in teacher.parameters()):,} parameters, held-out perplexity "
           f"{result.teacher_ppl:.3f}; saved to {model_dir}")
    losses = {"topk_service": SequenceKDLoss(cfg.temperature, top_k=cfg.top_k),
              "sampled_service": SequenceKDLoss(cfg.temperature, top_k=0, sample=cfg.sample),
              "dense_inprocess": SequenceKDLoss(cfg.temperature, top_k=0)}
    needs_service = any(m.endswith("_service") for m in cfg.modes)
    with EmbeddedRedis() as redis:
        fleet = _fleet(model_dir, redis.url, work)
        try:
            if needs_service:
                fleet.start_many(cfg.teachers)
                report(f"{cfg.teachers} teachers serving {model_dir.name}, registered as {SERVICE!r}")
            kill_pending = needs_service
            for seed in cfg.seeds:
                plan = batch_plan(len(data), cfg.batch_size, cfg.student_steps, seed=seed)
                for mode in cfg.modes:
                    student = llama(vocab, cfg.student_hidden, cfg.student_layers, cfg.seq_max, seed=seed)
                    if mode == "ce":
                        train_lm(student, loader(plan), cfg.student_steps, cfg.lr)
                    elif mode == "dense_inprocess":
                        source = InProcessTeacher(CausalLMLogits(teacher), losses[mode])
                        with DistillReader(loader(plan), source, teacher_input=teacher_inputs) as reader:
                            train_lm(student, reader, cfg.student_steps, cfg.lr, _kd_step(losses[mode], cfg))
                    else:
                        lost, dup = _service_run(student, loader(plan), plan, losses[mode], cfg, redis.url, fleet,
                                                 kill_pending, report)
                        result.lost += lost
                        result.duplicated += dup
                        result.killed += kill_pending
                        kill_pending = False
                    ppl = perplexity(student, heldout)
                    result.ppl.setdefault(mode, []).append(ppl)
                    report(f"seed {seed} {mode:16s} held-out perplexity {ppl:.3f}")
        finally:
            fleet.stop_all()
    result.seconds = time.perf_counter() - t0
    return result


def _service_run(student, data_loader, plan, kd, cfg: LMDemoConfig, url: str, fleet: ProcessFleet, kill: bool,
                 report: Callable[[str], None]) -> tuple[int, int]:
    """One student through the teacher pool; SIGKILL a teacher mid-run when ``kill``. Returns (lost, duplicated)."""
    from student_client import DistillReader, TeacherPool

    delivered: list[tuple[int, ...]] = []
    kill_step = max(1, int(cfg.student_steps * cfg.kill_at)) if kill else -1
    step_kd = _kd_step(kd, cfg)
    replacement: list[threading.Thread] = []

    def step(model, batch, teacher):
        delivered.append(tuple(int(i) for i in batch["index"]))
        if len(delivered) == kill_step:
            procs = fleet.snapshot()  # the replacement thread of an earlier kill may be appending
            victim = procs[0] if procs[0].running else procs[-1]
            victim.kill()  # SIGKILL: no deregistration, no drain
            report(f"step {kill_step}: SIGKILLed teacher pid {victim.pid}; starting a replacement")
            t = threading.Thread(target=fleet.start, daemon=True)
            t.start()
            replacement.append(t)
        return step_kd(model, batch, teacher)

    with TeacherPool.from_registry(url, SERVICE, kd) as pool:
        pool.wait_for_teachers(1, timeout_s=120.0)
        with DistillReader(data_loader, pool, teacher_input=teacher_inputs) as reader:
            train_lm(student, reader, cfg.student_steps, cfg.lr, step)
    for t in replacement:
        t.join(timeout=120.0)
    return check_epoch([tuple(b) for b in plan], delivered, complete=True)


def format_report(result: LMResult) -> str:
    """The results table (perplexity mean ± std per mode) and the fault line."""
    lines = [f"teacher held-out perplexity {result.teacher_ppl:.3f}",
             f"{'student':18s} held-out perplexity (mean ± std over {len(next(iter(result.ppl.values())))} seeds)"]
    for mode, text in result.summary().items():
        lines.append(f"{mode:18s} {text}")
    lines.append(f"SIGKILLed teachers: {result.killed}; batches lost: {result.lost}, duplicated: {result.duplicated}; "
                 f"{result.seconds:.0f} s")
    return "\n".join(lines)


def to_json(result: LMResult) -> str:
    """One JSON line of the result (for benchmarks and the README)."""
    return json.dumps({**asdict(result), "summary": result.summary()})


def cmd_lm_demo(args: Any) -> int:
    """``edistill demo --lm [--fast] [--seeds N] [--teachers N] [--out DIR]``; exit 0 if no batch was lost."""
    import tempfile

    if str(getattr(args, "log_level", "INFO")).upper() == "INFO":
        # The failover the demo provokes is in its report; per-request warnings would only interleave.
        for name in ("student_client", "registry", "teacher_server"):
            logging.getLogger(name).setLevel(logging.ERROR)
    cfg = LMDemoConfig.tiny() if args.fast else LMDemoConfig()
    if args.seeds is not None:
        cfg = replace(cfg, seeds=tuple(range(args.seeds)))
    cfg = replace(cfg, teachers=args.teachers)
    out = pathlib.Path(args.out) if args.out else pathlib.Path(tempfile.mkdtemp(prefix="edistill-lm-demo-"))
    result = run_lm_demo(out, cfg)
    (out / "report.json").write_text(to_json(result) + "\n")
    print(format_report(result))
    print(f"report: {out / 'report.json'}")
    return 0 if result.lost == 0 and result.duplicated == 0 else 1
