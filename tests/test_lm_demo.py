"""The LM path end to end, tiny: stdlib corpus, BPE, a Llama teacher served by 2 processes (one SIGKILLed).

The quality run (3 seeds, default sizes) is ``edistill demo --lm`` / examples/distill_lm.py, not a test.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from student_client import InProcessTeacher, SequenceKDLoss  # noqa: E402
from student_client._demo_lm import (LMDemoConfig, TokenChunks, batch_plan, corpus, format_report,  # noqa: E402
                                     llama, run_lm_demo, sequences, train_tokenizer)
from teacher_server.hf import CausalLMLogits  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_tiny_lm_demo_through_two_teachers_one_sigkilled(tmp_path) -> None:
    lines: list[str] = []
    result = run_lm_demo(tmp_path, LMDemoConfig.tiny(), report=lines.append)
    assert set(result.ppl) == {"ce", "topk_service", "sampled_service", "dense_inprocess"}
    assert all(math.isfinite(v[0]) and v[0] > 1 for v in result.ppl.values())
    assert result.killed == 1 and result.lost == 0 and result.duplicated == 0
    assert any("SIGKILLed teacher" in line for line in lines)
    assert (tmp_path / "teacher" / "config.json").is_file() and (tmp_path / "teacher" / "tokenizer.json").is_file()
    assert "batches lost: 0, duplicated: 0" in format_report(result)


def test_a_trainer_subclass_distils_through_the_reader() -> None:
    spec = importlib.util.spec_from_file_location("distill_lm", REPO / "examples" / "distill_lm.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    cfg = LMDemoConfig.tiny()
    train, _ = corpus()
    tok = train_tokenizer(train[:4], cfg.vocab_size)
    data = TokenChunks(sequences(tok, train[:4], cfg, seed=0))
    V = tok.get_vocab_size()
    teacher = llama(V, 32, 1, cfg.seq_max, seed=1).eval()
    student = llama(V, 16, 1, cfg.seq_max, seed=2)
    kd = SequenceKDLoss(top_k=8)

    def collate(items):
        batch = TokenChunks.collate(items)
        del batch["index"]  # what a Trainer's collator gives: model inputs only
        return batch

    class Base:  # stands in for transformers.Trainer's two methods the subclass builds on
        def get_train_dataloader(self):
            return torch.utils.data.DataLoader(data, batch_sampler=batch_plan(len(data), 4, 3, seed=0),
                                               collate_fn=collate)

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):  # pragma: no cover - overridden
            raise AssertionError("DistillTrainer.compute_loss must override this")

    with InProcessTeacher(CausalLMLogits(teacher), kd) as source:
        trainer_cls = example.distill_trainer(Base, kd, source)
        assert trainer_cls.__name__ == "DistillBase"
        trainer = trainer_cls()
        loader = trainer.get_train_dataloader()
        assert len(loader) == 3
        losses = []
        for inputs in loader:
            assert set(inputs) == {"input_ids", "attention_mask", "labels", "teacher"}
            ce = student(**{k: v for k, v in inputs.items() if k != "teacher"}).loss
            loss = trainer.compute_loss(student, dict(inputs))
            loss.backward()
            assert loss.item() > ce.item()  # CE plus a positive KD term
            losses.append(loss.item())
    assert len(losses) == 3
    assert issubclass(example.distill_trainer(transformers.Trainer, kd, None), transformers.Trainer)
