"""Distil a language model through edistill: per-token soft labels from a pool of teachers.

What this script does (the same as ``edistill demo --lm``, which calls
:func:`student_client._demo_lm.run_lm_demo`):

1. trains a byte-level BPE tokenizer and a small Llama teacher on the Python
   standard library's own source files (no download) and saves the teacher as
   a Hugging Face directory (``config.json`` + ``model.safetensors``);
2. serves it from two teachers registered in an embedded Redis::

       edistill teacher serve --model DIR --service edistill-demo-lm --registry redis://...

3. distils a smaller student four ways, three seeds each: CE only; CE + top-64
   log-probs (with the tail mass) over the service; CE + 12 sampled tokens per
   position over the service (Random-Sampling KD); CE + dense KD from the
   teacher in the student's process. One teacher is SIGKILLed mid-training in
   the first service run; every batch must arrive exactly once;
4. prints held-out perplexity, mean ± std over the seeds.

The training loop of a service run is the plain PyTorch one::

    kd = SequenceKDLoss(temperature=1.0, top_k=64)          # asks for top-64 + tail, masked
    with TeacherPool.from_registry(url, "edistill-demo-lm", kd) as pool, \\
            DistillReader(loader, pool, teacher_input=teacher_inputs) as reader:
        for batch, teacher in reader:
            out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"])
            loss = out.loss + kd(out.logits, teacher, labels=batch["labels"])

Hugging Face ``Trainer`` users plug the reader in with :func:`distill_trainer`
below: the reader wraps the Trainer's own train dataloader (so its sampler,
collator and workers stay), each batch dict gets the teacher's answers under
``"teacher"``, and ``compute_loss`` adds the KD term. (Running a ``Trainer``
needs ``accelerate``, a dependency of transformers' Trainer, not of edistill.)

Run: ``python examples/distill_lm.py [--fast] [--seeds 3] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def distill_trainer(trainer_cls: type, kd: Any, source: Any, teacher_input=None) -> type:
    """A subclass of ``trainer_cls`` (``transformers.Trainer``) that distils through ``source``.

    Args:
        kd: the KD loss (e.g. ``SequenceKDLoss(top_k=64)``); it also says what the source must answer.
        source: a knowledge source (``TeacherPool.from_registry(url, service, kd)``, ``InProcessTeacher``...).
        teacher_input: ``batch -> inputs`` for the teacher (default: ``input_ids`` and ``attention_mask``).

    Usage::

        Trainer = distill_trainer(transformers.Trainer, kd, pool)
        Trainer(model=student, args=TrainingArguments(...), train_dataset=ds, data_collator=collate).train()
    """
    from student_client import DistillReader

    pick = teacher_input or (lambda b: {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})

    class _WithTeacher:
        """The Trainer's dataloader, each batch dict with the teacher's answers under "teacher"."""

        def __init__(self, loader) -> None:
            self.loader = loader

        def __len__(self) -> int:
            return len(self.loader)

        def __getattr__(self, name: str) -> Any:  # sampler, dataset, batch_size... as the Trainer reads them
            return getattr(self.loader, name)

        def __iter__(self):
            with DistillReader(self.loader, source, teacher_input=pick) as reader:
                for batch, teacher in reader:
                    yield {**batch, "teacher": teacher}

    class DistillTrainer(trainer_cls):
        def get_train_dataloader(self):
            return _WithTeacher(super().get_train_dataloader())

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            teacher = inputs.pop("teacher")
            outputs = model(**inputs)
            loss = outputs.loss + kd(outputs.logits, teacher, labels=inputs.get("labels"))
            return (loss, outputs) if return_outputs else loss

    DistillTrainer.__name__ = DistillTrainer.__qualname__ = f"Distill{trainer_cls.__name__}"
    return DistillTrainer


def main(argv: list[str] | None = None) -> int:
    from student_client._demo_lm import cmd_lm_demo

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fast", action="store_true", help="tiny models, a few steps (smoke test)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per student (default 3)")
    p.add_argument("--teachers", type=int, default=2, help="teacher processes (default 2)")
    p.add_argument("--out", default=None, help="work directory (default: a temp dir)")
    return cmd_lm_demo(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
