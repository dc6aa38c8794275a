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


def _chunk_terms(s_logits, t_logits, labels, kind, temperature, beta, top_k, want_ce):
    kd = s_logits.new_zeros((), dtype=torch.float32) if t_logits is None else divergence(
        s_logits, t_logits, kind, temperature, beta, top_k)
    ce = F.cross_entropy(s_logits.float(), labels, reduction="sum") if want_ce else kd.new_zeros(())
    return kd, ce


class _FusedHeadLoss(torch.autograd.Function):
    """Loss and its gradient computed together, chunk by chunk, in the forward pass.

    For each chunk of tokens: student logits (one matmul), teacher logits (one matmul, no grad), the loss, and
    — by a local autograd call on that chunk's logits only — d(loss)/d(logits), which two more matmuls turn into
    the gradients of the hidden states and of the LM head. Backward only scales them. So every logit tensor lives
    for one chunk, and nothing is recomputed (activation checkpointing would run both LM heads twice).
    Returns the weighted loss sum (differentiable) and the kd and ce sums (for logging).
    """

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, labels, kind, temperature, beta, top_k, kd_weight, ce_weight, chunk_tokens):
        n = h_s.shape[0]
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(h_s) if needs_grad else None
        grad_w = torch.zeros_like(w_s, dtype=torch.float32) if needs_grad else None
        kd_total = torch.zeros((), dtype=torch.float32, device=h_s.device)
        ce_total = torch.zeros((), dtype=torch.float32, device=h_s.device)
        want_ce = labels is not None and ce_weight > 0
        for start in range(0, n, chunk_tokens):
            sl = slice(start, start + chunk_tokens)
            h_chunk = h_s[sl]
            t_logits = None if h_t is None or kd_weight == 0 else h_t[sl] @ w_t.t()
            with torch.enable_grad():
                s_logits = (h_chunk @ w_s.t()).detach().requires_grad_(needs_grad)
                kd, ce = _chunk_terms(s_logits, t_logits, labels[sl] if want_ce else None, kind, temperature, beta,
                                      top_k, want_ce)
                if needs_grad:
                    (g,) = torch.autograd.grad(kd_weight * kd + ce_weight * ce, s_logits)
            if needs_grad:
                g = g.to(h_chunk.dtype)
                grad_h[sl] = g @ w_s
                grad_w += (g.t() @ h_chunk).float()
            kd_total += kd.detach()
            ce_total += ce.detach()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w_s.dtype
        ctx.mark_non_differentiable(kd_total, ce_total)
        return kd_weight * kd_total + ce_weight * ce_total, kd_total, ce_total

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        grad_h, grad_w = ctx.saved_tensors
        # In place: these buffers belong to this call alone, and a second [vocab, width] copy is what we avoid.
        out_h = None if grad_h is None else grad_h.mul_(grad_loss.to(grad_h.dtype))
        out_w = None if grad_w is None else grad_w.mul_(grad_loss).to(ctx.w_dtype)
        return out_h, out_w, None, None, None, None, None, None, None, None, None, None


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
    kd_weight: float = 1.0,
    ce_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``kd_weight × mean divergence + ce_weight × mean cross-entropy`` from final hidden states, fused with the
    LM heads and computed ``chunk_tokens`` at a time (see :class:`_FusedHeadLoss`).

    ``student_hidden`` ``[N, Ds]`` and ``teacher_hidden`` ``[N, Dt]`` are flattened token positions;
    ``*_head`` are the LM-head weights ``[V, D]``. ``teacher_hidden=None`` gives plain language-model
    fine-tuning (cross-entropy against ``labels`` only); ``labels=None`` turns cross-entropy off.
    Returns ``(loss, kd, ce)``: the differentiable loss, and the two detached means for logging.
    """
    if teacher_hidden is None:
        kd_weight = 0.0
    if labels is None:
        ce_weight = 0.0
    if kd_weight == 0 and ce_weight == 0:
        raise ValueError("chunked_logit_loss has nothing to compute: no teacher and no labels")
    n = student_hidden.shape[0]
    loss, kd, ce = _FusedHeadLoss.apply(student_hidden, student_head, teacher_hidden, teacher_head, labels, kind,
                                        temperature, beta, top_k, kd_weight, ce_weight, chunk_tokens)
    return loss / n, kd / n, ce / n


def hidden_state_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Mean over tokens of ``1 - cos`` or of the squared error averaged over channels (widths must match:
    project the student first when they differ)."""
    s, t = student.float(), teacher.float()
    if kind == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    if kind == "mse":
        return F.mse_loss(s, t)
    raise ValueError(f"unknown hidden-state loss {kind!r}; choose one of {HIDDEN_LOSSES}")
