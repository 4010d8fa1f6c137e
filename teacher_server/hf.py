"""Hugging Face causal LMs as teachers: a local model directory, loaded with transformers.

``edistill teacher serve --model DIR`` where ``DIR`` holds ``config.json`` and
safetensors weights (what ``save_pretrained`` writes). Decisions:

* **Local files only**: ``AutoModelForCausalLM.from_pretrained(DIR,
  local_files_only=True)`` with ``HF_HUB_OFFLINE=1`` set for the process, so a
  teacher never reaches the network. ``trust_remote_code`` (code shipped in
  the directory) only with an explicit ``--trust-remote-code``.
* **Signature**: inputs ``input_ids`` and ``attention_mask``, both int64
  ``(B, L)`` with a free L; output ``logits`` ``(B, L, V)`` (float32 on the
  wire unless the request asks for another dtype). The model runs with
  ``use_cache=False`` (teacher-forced KD is one forward pass, no generation).
* **Precision**: ``--precision fp16/bf16`` runs under autocast as for every
  teacher; the weights load in float32.
* **Mixed lengths**: :class:`SequenceInfo` on the :class:`LoadedModel` tells
  the batcher to merge requests of different L (right-padded, mask 0) and
  the servicer to check token values: an id >= V, a mask whose shape differs
  from the ids, a mask with values other than 0/1, or L above the model's
  ``max_position_embeddings`` is INVALID_ARGUMENT naming what is wrong.

transformers is an optional extra: ``pip install edistill[hf]``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from teacher_server.errors import ConfigError, InvalidRequest, ModelLoadError
from teacher_server.model import _WARMUP_FREE_DIM, LoadedModel, _device, _first_line
from teacher_server.signature import TensorSpec

__all__ = ["CausalLMLogits", "SequenceInfo", "is_hf_dir", "load_hf_model"]

log = logging.getLogger(__name__)

IDS, MASK = "input_ids", "attention_mask"


def is_hf_dir(path: str) -> bool:
    """True for a directory holding a ``config.json`` (a Hugging Face model directory)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


class CausalLMLogits(torch.nn.Module):
    """``(input_ids, attention_mask) -> logits (B, L, V)`` of a transformers causal LM (no KV cache).

    Also what a student passes to :class:`~student_client.InProcessTeacher` to
    run the same model in its own process: it is called with the batch's
    ``input_ids`` and ``attention_mask`` by name.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


@dataclass(frozen=True)
class SequenceInfo:
    """What the batcher and servicer know of a sequence model's inputs."""

    vocab_size: int
    max_positions: int | None  # None: the config states no limit
    ids: str = IDS
    mask: str = MASK

    def check(self, names: Sequence[str], tensors: Sequence[torch.Tensor], max_batch_tokens: int | None) -> None:
        """Raise :class:`InvalidRequest` naming what is wrong with one request's token inputs."""
        by_name = dict(zip(names, tensors))
        ids = by_name[self.ids]
        n, length = ids.shape[0], ids.shape[1]
        mask = by_name.get(self.mask)
        if mask is not None and tuple(mask.shape) != tuple(ids.shape):
            raise InvalidRequest(f"input {self.mask!r}: shape {list(mask.shape)} differs from input {self.ids!r} "
                                 f"{list(ids.shape)}; the mask has one entry per token")
        if self.max_positions is not None and length > self.max_positions:
            raise InvalidRequest(f"input {self.ids!r}: sequence length {length} exceeds the model's maximum of "
                                 f"{self.max_positions} positions (max_position_embeddings); send shorter sequences")
        if max_batch_tokens and n * length > max_batch_tokens:
            raise InvalidRequest(f"input {self.ids!r}: {n} x {length} = {n * length} tokens exceed this teacher's "
                                 f"max_batch_tokens {max_batch_tokens}; split the batch")
        if ids.numel():
            low, high = torch.aminmax(ids)
            if int(low) < 0 or int(high) >= self.vocab_size:
                bad = int(high) if int(high) >= self.vocab_size else int(low)
                where = [int(i) for i in (ids == bad).nonzero()[0]]
                raise InvalidRequest(f"input {self.ids!r}: token id {bad} at {where} is outside the model's "
                                     f"vocabulary [0, {self.vocab_size}); check the tokenizer matches the teacher")
        if mask is not None and mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
            raise InvalidRequest(f"input {self.mask!r}: values must be 0 or 1")


def _import_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the network from a teacher
    try:
        import transformers
    except ImportError as exc:
        raise ModelLoadError("serving a Hugging Face model directory needs transformers: "
                             "pip install 'edistill[hf]'") from exc
    return transformers


def load_hf_model(path: str, *, device: str = "cpu", precision: str = "fp32",
                  trust_remote_code: bool = False) -> LoadedModel:
    """Load the causal LM in directory ``path`` (config.json + safetensors) and warm it up.

    Raises:
        ModelLoadError: transformers missing, an unreadable directory, a config
            that is not a causal LM, or code in the directory without
            ``trust_remote_code``.
    """
    t0 = time.perf_counter()
    dev = _device(device)
    transformers = _import_transformers()
    try:
        module = transformers.AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code, dtype=torch.float32)
    except Exception as exc:  # ValueError (unknown architecture), OSError (no weights), ...
        hint = ("; it ships its own model code: pass --trust-remote-code if you trust it"
                if "trust_remote_code" in str(exc) else "")
        raise ModelLoadError(f"{path}: cannot load a causal LM with transformers ({type(exc).__name__}: "
                             f"{_first_line(exc)}){hint}") from exc
    config = module.config
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab <= 0:
        raise ModelLoadError(f"{path}: config.json states no vocab_size")
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    seq = SequenceInfo(vocab, int(max_pos) if max_pos else None)
    inputs = (TensorSpec(IDS, torch.int64, (-1,)), TensorSpec(MASK, torch.int64, (-1,)))
    model = SequenceModel(CausalLMLogits(module).to(dev).eval(), inputs, path, "hf", dev, precision)
    model.sequence = seq
    model.warm_up()
    model.load_s = time.perf_counter() - t0
    return model


class SequenceModel(LoadedModel):
    """A :class:`LoadedModel` whose warm-up feeds real tokens and a full mask (its outputs' L is then free)."""

    def example_batch(self, batch_size: int = 2, free_dim: int = _WARMUP_FREE_DIM) -> list[torch.Tensor]:
        """Token ids below the vocabulary size and an all-ones mask, ``(batch_size, free_dim)``."""
        gen = torch.Generator().manual_seed(0)
        vocab = self.sequence.vocab_size if self.sequence else 2
        ids = torch.randint(0, vocab, (batch_size, free_dim), generator=gen)
        return [ids if s.name == IDS else torch.ones_like(ids) for s in self.inputs]


def check_options(options: Mapping[str, object]) -> None:
    """Refuse factory/file options given with a model directory (their meaning would be lost)."""
    given = [k for k, v in options.items() if v]
    if given:
        raise ConfigError(f"{', '.join(given)} apply to factory or file models, not to a Hugging Face "
                          "model directory")
