"""Token-level distillation of language models: forward KL, reverse KL and generalized JSD, masked.

At every valid position of a ``(B, L, V)`` sequence, with student logits ``s``
and the teacher's distribution ``q`` (both at temperature T)::

    p = softmax(s / T)
    forward_kl:  KL(q ‖ p) = Σ_v q_v (log q_v − log p_v)            (Hinton KD per token; "word-level KD")
    reverse_kl:  KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)            (mode seeking, MiniLLM)
    jsd (β):     β·KL(q ‖ m) + (1 − β)·KL(p ‖ m),  m = β·q + (1 − β)·p

``jsd`` is the generalized Jensen-Shannon divergence of GKD (Agarwal et al.
2024, "On-Policy Distillation of Language Models", arXiv:2306.13649) as TRL's
``GKDTrainer.generalized_jsd_loss`` defines it: ``beta=0`` is the forward KL
and ``beta=1`` the reverse KL (both exactly, as special cases, since the
mixture form vanishes at the ends), ``beta=0.5`` the symmetric JSD. As in
TRL, logits are divided by T and the result is not rescaled by T².

The loss is the mean over valid positions: those where ``mask`` (e.g. the
attention mask) is nonzero, ``labels`` is not ``ignore_index`` and the
teacher answered (``TopK.mask``/``Sampled.mask``); 0 when there are none.
``labels`` and ``mask`` are aligned with the logits' positions (no shift).

Teachers
--------
* **dense** (a ``(B, L, V)`` :class:`~student_client.outputs.Dense` or plain
  tensor: raw logits, probs or log-probs): the formulas above over V.
* **top-k** (:class:`~student_client.outputs.TopK`, log-probs or probs at T):
  over ``k + 1`` bins, the kept tokens plus one "everything else" bucket
  whose teacher mass is the answer's ``tail`` (``OutputSpec(tail=True)``;
  else ``1 − Σ q_k``) and whose student mass is ``Σ_{j∉K} p_j``. Merging
  tokens never increases a divergence (data processing), the bins keep the
  teacher's confidence, and with k = V it is the full-vocabulary value.
  Raw top-k logits know no tail: they are renormalised over the k (tail 0).
* **sampled** (:class:`~student_client.outputs.Sampled`, Random-Sampling KD,
  Anshumann et al. 2025, arXiv:2503.16870): the teacher's empirical
  distribution ``q̂_j = count_j / S`` over its S draws (unbiased for q: the
  gradient of the forward KL is unbiased), with the undrawn tokens as one
  bucket of teacher mass 0. Reverse KL is infinite there, so a sampled
  teacher takes ``forward_kl`` or ``jsd`` with ``beta < 1``.

Memory: valid positions are processed in chunks of at most ``chunk_tokens``
positions (default: 4M / V, i.e. 32 at V = 128k), each under activation
checkpointing, so only one chunk's float32 ``(n, V)`` work exists at a time
and backward keeps nothing per chunk but its indices; the gradient of the
student logits is the one ``(B, L, V)`` tensor autograd needs anyway.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from ..outputs import Dense, OutputSpec, Sampled, TeacherValue, TopK
from .base import OneOutputLoss, student_output, teacher_answer
from .response import _check_temperature, _resolve

__all__ = ["DIVERGENCES", "SequenceKDLoss", "sequence_kd_loss"]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
_CHUNK_ELEMENTS = 1 << 22  # float32 elements of one chunk's (n, V) work


def _check(divergence: str, beta: float, temperature: float) -> None:
    if divergence not in DIVERGENCES:
        raise ConfigError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise ConfigError(f"beta must be a number in [0, 1], got {beta!r}")
    _check_temperature(temperature)


def _kind(divergence: str, beta: float) -> str:
    """``jsd`` at beta 0 / 1 is exactly the forward / reverse KL (TRL's special cases)."""
    if divergence == "jsd" and beta in (0, 1):
        return "forward_kl" if beta == 0 else "reverse_kl"
    return divergence


def _divergence(log_q: torch.Tensor, log_p: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """Per-row divergence over the last dim; ``-inf`` entries are zero mass (0·log 0 = 0). (n, bins) -> (n,)."""
    q_pos, p_pos = log_q > float("-inf"), log_p > float("-inf")
    lq = torch.where(q_pos, log_q, torch.zeros_like(log_q))  # finite stand-ins: no NaN gradients
    lp = torch.where(p_pos, log_p, torch.zeros_like(log_p))
    q, p = lq.exp() * q_pos, lp.exp() * p_pos
    if kind == "forward_kl":
        return (q * (lq - lp)).sum(-1)
    if kind == "reverse_kl":
        return (p * (lp - lq)).sum(-1)
    # m = β q + (1 − β) p, where zero mass stays zero (a huge negative stand-in keeps gradients finite)
    log_m = torch.logaddexp(torch.where(q_pos, log_q, torch.full_like(log_q, -1e30)) + math.log(beta),
                            torch.where(p_pos, log_p, torch.full_like(log_p, -1e30)) + math.log1p(-beta))
    log_m = torch.where(q_pos | p_pos, log_m, torch.zeros_like(log_m))
    return beta * (q * (lq - log_m)).sum(-1) + (1.0 - beta) * (p * (lp - log_m)).sum(-1)


def _rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The rows ``idx`` of ``t`` flattened to (B·L, ...)."""
    return t.reshape(-1, *t.shape[2:]).index_select(0, idx.to(t.device))


def _bins(log_p: torch.Tensor, log_q_kept: torch.Tensor, ids: torch.Tensor,
          log_q_tail: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher, student) log-masses over the kept ids plus the rest bucket (if any token is left)."""
    log_p_kept = log_p.gather(-1, ids)  # (n, k)
    if ids.shape[-1] >= log_p.shape[-1] and log_q_tail is None:
        return log_q_kept, log_p_kept
    log_p_tail = log_p.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)  # (n, 1)
    if log_q_tail is None:
        log_q_tail = torch.full_like(log_p_tail, float("-inf"))
    return torch.cat([log_q_kept, log_q_tail.reshape(-1, 1)], -1), torch.cat([log_p_kept, log_p_tail], -1)


def _chunk_sum(s_flat, idx, teacher_rows, form: str, transform: str, T: float, kind: str, beta: float,
               num_samples: int) -> torch.Tensor:
    """Σ over the positions ``idx`` of one chunk; everything (n, V) is made and dropped in here."""
    log_p = F.log_softmax(s_flat.index_select(0, idx).float() / T, dim=-1)  # (n, V)
    if form == "dense":
        t = teacher_rows[0].float()
        log_q = (F.log_softmax(t / T, dim=-1) if transform == "raw" else t.log() if transform == "probs" else t)
        return _divergence(log_q, log_p, kind, beta).sum()
    ids = teacher_rows[1]
    if form == "sampled":
        same = ids.unsqueeze(-1) == ids.unsqueeze(-2)  # (n, S, S)
        count = same.sum(-1)  # (n, S) draws of each slot's token
        first = ~torch.tril(same, diagonal=-1).any(-1)  # the first slot of each distinct token
        log_q = torch.where(first, (count.float() / num_samples).log(), torch.full_like(log_p[:, :1], float("-inf")))
        lq, lp = _bins(log_p, log_q, ids, torch.full_like(log_p[:, 0], float("-inf")))  # undrawn: teacher mass 0
        lp = torch.cat([torch.where(first, lp[:, :-1], torch.full_like(lq[:, :-1], float("-inf"))), lp[:, -1:]], -1)
        return _divergence(lq, lp, kind, beta).sum()
    v = teacher_rows[0].float()
    tail = teacher_rows[2]
    if transform == "raw":
        log_q, log_q_tail = F.log_softmax(v / T, dim=-1), None  # renormalised over the k: tail unknown, 0
        lq, lp = _bins(log_p, log_q, ids, None)
    else:
        log_q = v.log() if transform == "probs" else v
        if tail is not None:
            log_q_tail = tail.float()
        else:
            log_q_tail = torch.log((1.0 - log_q.exp().sum(-1)).clamp(min=0.0))
        if ids.shape[-1] >= log_p.shape[-1]:
            log_q_tail = None  # k = V: nothing outside, the bucket is empty
        lq, lp = _bins(log_p, log_q, ids, log_q_tail)
    return _divergence(lq, lp, kind, beta).sum()


def sequence_kd_loss(student_logits: torch.Tensor, teacher: TeacherValue | torch.Tensor, *,
                     labels: torch.Tensor | None = None, mask: torch.Tensor | None = None, ignore_index: int = -100,
                     temperature: float | None = 1.0, divergence: str = "forward_kl", beta: float = 0.5,
                     chunk_tokens: int | None = None) -> torch.Tensor:
    """Mean per-token divergence between student and teacher over the valid positions (module docstring).

    Args:
        student_logits: ``(B, L, V)`` raw student logits.
        teacher: a dense ``(B, L, V)`` answer (Dense or plain tensor of raw
            logits), a per-token :class:`TopK` or a :class:`Sampled`.
        labels: ``(B, L)``; positions labelled ``ignore_index`` do not count.
        mask: ``(B, L)``; positions where it is 0 do not count.
        temperature: T; ``None`` takes the answer's own. Probs/log-probs and
            draws are fixed at the teacher's T: another T is a ConfigError.
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        beta: the JSD's interpolation (0 = forward KL, 1 = reverse KL).
        chunk_tokens: positions per chunk (default: 4M elements / V).

    Raises:
        ConfigError: bad settings or shapes, a divergence the answer cannot
            give (reverse KL of a sampled or raw top-k teacher), or another T.
    """
    if student_logits.dim() != 3:
        raise ConfigError(f"student_logits must be (B, L, V), got shape {tuple(student_logits.shape)}")
    B, L, V = student_logits.shape
    if isinstance(teacher, Sampled):
        transform, T = "sampled", float(teacher.temperature if temperature is None else temperature)
        if temperature is not None and not math.isclose(teacher.temperature, temperature, rel_tol=1e-6):
            raise ConfigError(f"the teacher's tokens were drawn at temperature {teacher.temperature}, the loss uses "
                              f"{temperature}; request them at the loss's temperature, or pass temperature=None")
    else:
        transform, T = _resolve(teacher, temperature, None)
    _check(divergence, beta, T)
    kind = _kind(divergence, float(beta))
    shape = tuple(teacher.dense_shape) if isinstance(teacher, (TopK, Sampled)) else tuple(teacher.shape)
    if shape != (B, L, V):
        raise ConfigError(f"teacher shape {shape} != student logits shape {(B, L, V)}")
    if kind == "reverse_kl" and isinstance(teacher, Sampled):
        raise ConfigError("reverse KL needs the teacher's probability of every token the student predicts; a "
                          "sampled teacher gives only its draws: use forward_kl or jsd with beta < 1, or top_k")
    if kind == "reverse_kl" and isinstance(teacher, TopK) and transform == "raw":
        raise ConfigError("reverse KL of raw top-k logits: the teacher's tail mass is unknown; request "
                          "transform='log_probs' top-k (with tail=True)")
    valid = torch.ones(B, L, dtype=torch.bool, device=student_logits.device)
    for what, m in (("mask", mask), ("labels", labels), ("teacher mask", getattr(teacher, "mask", None))):
        if m is None:
            continue
        if tuple(m.shape) != (B, L):
            raise ConfigError(f"{what} of shape {tuple(m.shape)} does not match the logits' positions {(B, L)}")
        m = m.to(student_logits.device)
        valid &= (m != ignore_index) if what == "labels" else m.bool()
    idx = valid.reshape(-1).nonzero().squeeze(1)  # (N,) flat positions that count
    n_valid = idx.numel()
    if n_valid == 0:
        return student_logits.sum() * 0.0  # no valid token: 0, with a gradient path
    if isinstance(teacher, Sampled):
        form, parts = "sampled", (None, teacher.indices, None)
    elif isinstance(teacher, TopK):
        form, parts = "topk", (teacher.values, teacher.indices, teacher.tail)
    else:
        form, parts = "dense", (teacher.as_subclass(torch.Tensor) if isinstance(teacher, Dense) else teacher,)
    step = chunk_tokens or max(1, _CHUNK_ELEMENTS // max(V, 1))
    s_flat = student_logits.reshape(B * L, V)
    total = student_logits.new_zeros((), dtype=torch.float32)
    for a in range(0, n_valid, step):
        chunk = idx[a:a + step]
        rows = tuple(None if t is None else _rows(t.detach(), chunk).to(student_logits.device) for t in parts)
        if form != "dense" and rows[1] is not None:
            rows = (rows[0], rows[1].long(), rows[2])
        args = (s_flat, chunk, rows, form, transform, T, kind, float(beta), getattr(teacher, "num_samples", 0))
        if torch.is_grad_enabled() and student_logits.requires_grad:
            total = total + checkpoint(_chunk_sum, *args, use_reentrant=False)
        else:
            total = total + _chunk_sum(*args)
    return total / n_valid


class SequenceKDLoss(OneOutputLoss):
    """:func:`sequence_kd_loss` as a :class:`~student_client.losses.Loss`: it requests the per-token answer it reads.

    Args:
        temperature: T (the teacher answers at T; logits divided by T, no T²).
        top_k: k > 0 for a top-k teacher with the tail bucket; 0 with
            ``sample=0`` for the dense answer (V floats per token on the wire).
        sample: draws per position (Random-Sampling KD) instead of top-k.
        seed: the draws' seed.
        divergence, beta: as in :func:`sequence_kd_loss`.
        output: the teacher output's name; ``mask``: the input whose 0
            entries are positions not sent (top-k/sampled only).
        dtype: the values' dtype on the wire.
        ignore_index: positions labelled so do not count.
        student_output: the key of the student's logits in a dict of outputs.

    Example (a transformers student, labels -100 at padding)::

        kd = SequenceKDLoss(top_k=64, divergence="forward_kl")
        with DistillReader(loader, registry=url, service="lm", outputs=kd) as reader:
            for batch, teacher in reader:
                logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = kd(logits, teacher, labels=batch["labels"])
    """

    def __init__(self, temperature: float = 1.0, top_k: int = 64, sample: int = 0, seed: int = 0,
                 divergence: str = "forward_kl", beta: float = 0.5, output: str = "logits",
                 mask: str = "attention_mask", dtype: str = "float16", ignore_index: int = -100,
                 student_output: str | None = None) -> None:
        _check(divergence, beta, temperature)
        sparse = bool(top_k or sample)
        super().__init__(OutputSpec(output, "log_probs", float(temperature), top_k, dtype if sparse else "float32",
                                    sample=sample, seed=seed, tail=bool(top_k), mask=mask if sparse else ""),
                         student_output)
        self.temperature = float(temperature)
        self.divergence = divergence
        self.beta = float(beta)
        self.ignore_index = int(ignore_index)

    def forward(self, student: torch.Tensor | Mapping[str, torch.Tensor], teacher: Any,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean divergence over the positions the labels keep and the teacher answered."""
        return sequence_kd_loss(student_output(student, self.student_output, self),
                                teacher_answer(teacher, self._spec.name, self), labels=labels,
                                ignore_index=self.ignore_index, temperature=self.temperature,
                                divergence=self.divergence, beta=self.beta)

    def extra_repr(self) -> str:
        """Settings shown in ``repr(module)``."""
        s = self._spec
        return (f"temperature={self.temperature}, top_k={s.top_k}, sample={s.sample}, "
                f"divergence={self.divergence!r}, beta={self.beta}, output={s.name!r}")
