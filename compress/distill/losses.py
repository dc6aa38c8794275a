"""Distillation losses that never materialize full-vocabulary logits for a whole batch.

The logit losses take *final hidden states* and the two LM-head weight matrices, and compute logits, softmaxes
and the divergence one chunk of tokens at a time. Each chunk runs under activation checkpointing, so the
backward pass recomputes that chunk's logits instead of keeping them: peak memory is one chunk of
``[chunk_tokens, vocab]`` fp32 tensors, whatever the batch, sequence length or vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOGIT_LOSSES = ("forward_kl", "reverse_kl", "jsd")
HIDDEN_LOSSES = ("cosine", "mse")


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward_kl",
               temperature: float = 1.0, beta: float = 0.5, top_k: int | None = None) -> torch.Tensor:
    """Summed over tokens: the per-token divergence between teacher and student distributions.

    ``forward_kl`` is KL(teacher || student) (Minitron), ``reverse_kl`` KL(student || teacher), and ``jsd`` the
    generalized Jensen-Shannon divergence with mixture ``M = beta * teacher + (1 - beta) * student``:
    ``beta * KL(teacher || M) + (1 - beta) * KL(student || M)`` (``beta`` 0 and 1 fall back to the two KLs,
    TRL's GKD convention). With ``top_k``, the teacher keeps only its ``k`` largest logits (renormalized) and
    the student is compared on that support. Logits are divided by ``temperature``; the result is scaled by
    ``temperature ** 2`` so gradients keep their size.
    """
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    s_logp = F.log_softmax(s, dim=-1)
    if top_k is not None:
        t_top, idx = t.topk(top_k, dim=-1)
        t_logp = F.log_softmax(t_top, dim=-1)
        s_logp = s_logp.gather(-1, idx)
    else:
        t_logp = F.log_softmax(t, dim=-1)
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    if kind == "forward_kl":
        per_token = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    elif kind == "reverse_kl":
        per_token = (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    elif kind == "jsd":
        m_logp = torch.logsumexp(torch.stack([t_logp + math.log(beta), s_logp + math.log(1 - beta)]), dim=0)
        kl_t = (t_logp.exp() * (t_logp - m_logp)).sum(-1)
        kl_s = (s_logp.exp() * (s_logp - m_logp)).sum(-1)
        per_token = beta * kl_t + (1 - beta) * kl_s
    else:
        raise ValueError(f"unknown divergence {kind!r}; choose one of {LOGIT_LOSSES}")
    return per_token.sum() * temperature**2


def _chunk_terms(h_s, w_s, h_t, w_t, labels, kind, temperature, beta, top_k, want_ce):
    s_logits = h_s @ w_s.t()
    if h_t is None:  # language-modelling loss only
        kd = s_logits.new_zeros((), dtype=torch.float32)
    else:
        with torch.no_grad():
            t_logits = h_t @ w_t.t()
        kd = divergence(s_logits, t_logits, kind, temperature, beta, top_k)
    ce = F.cross_entropy(s_logits.float(), labels, reduction="sum") if want_ce else kd.new_zeros(())
    return kd, ce


def chunked_logit_loss(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_head: torch.Tensor | None,
    labels: torch.Tensor | None = None,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    top_k: int | None = None,
    chunk_tokens: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-token divergence (and cross-entropy against ``labels``, if given) from final hidden states.

    ``student_hidden`` ``[N, Ds]`` and ``teacher_hidden`` ``[N, Dt]`` are flattened token positions;
    ``*_head`` are the LM-head weights ``[V, D]``. Returns ``(kd, ce)`` — ``ce`` is 0 without labels, ``kd`` is
    0 without a teacher (``teacher_hidden=None``: plain language-model fine-tuning).
    """
    n = student_hidden.shape[0]
    kd_total = student_hidden.new_zeros((), dtype=torch.float32)
    ce_total = student_hidden.new_zeros((), dtype=torch.float32)
    want_ce = labels is not None
    dummy = labels if want_ce else torch.zeros(n, dtype=torch.long, device=student_hidden.device)
    for start in range(0, n, chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        t_chunk = None if teacher_hidden is None else teacher_hidden[sl]
        args = (student_hidden[sl], student_head, t_chunk, teacher_head, dummy[sl], kind, temperature,
                beta, top_k, want_ce)
        if torch.is_grad_enabled() and (student_hidden.requires_grad or student_head.requires_grad):
            kd, ce = checkpoint(_chunk_terms, *args, use_reentrant=False)
        else:
            kd, ce = _chunk_terms(*args)
        kd_total = kd_total + kd
        ce_total = ce_total + ce
    return kd_total / n, ce_total / n


def hidden_state_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Mean over tokens of ``1 - cos`` or of the squared error averaged over channels (widths must match:
    project the student first when they differ)."""
    s, t = student.float(), teacher.float()
    if kind == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    if kind == "mse":
        return F.mse_loss(s, t)
    raise ValueError(f"unknown hidden-state loss {kind!r}; choose one of {HIDDEN_LOSSES}")
