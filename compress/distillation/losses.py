"""Distillation losses that never materialize full-vocabulary logits for a whole batch.

The logit losses take *final hidden states* and the two LM-head weight matrices, and compute logits, softmaxes,
the divergence and its analytic gradient one chunk of tokens at a time, in the forward pass: peak memory is one
chunk of ``[chunk_tokens, vocab]`` fp32 tensors, whatever the batch, sequence length or vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..models.logits import LogitTransform

LOGIT_LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")
HIDDEN_LOSSES = ("cosine", "mse")


def _active(transform: LogitTransform | None) -> LogitTransform | None:
    """``None`` for no transform or the identity, so that the loss code can branch on ``is None`` alone."""
    if transform is None:
        return None
    if not isinstance(transform, LogitTransform):
        raise TypeError(f"expected a LogitTransform or None, got {type(transform).__name__}")
    return None if transform.is_identity else transform


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    top_k: int | None = None,
    skew: float = 0.1,
) -> torch.Tensor:
    """Summed over tokens: the per-token divergence between teacher and student distributions.

    ``forward_kl`` is KL(teacher || student) (Minitron), ``reverse_kl`` KL(student || teacher), and ``jsd`` the
    generalized Jensen-Shannon divergence with mixture ``M = beta * teacher + (1 - beta) * student``:
    ``beta * KL(teacher || M) + (1 - beta) * KL(student || M)`` (``beta`` 0 and 1 fall back to the two KLs,
    TRL's GKD convention). DistiLLM's skew divergences mix a little of the other distribution into the
    reference, which bounds the loss and its gradient where one side has no mass: ``skew_forward_kl`` is
    ``KL(teacher || skew * teacher + (1 - skew) * student)``, ``skew_reverse_kl`` is
    ``KL(student || skew * student + (1 - skew) * teacher)`` (``skew`` 0 gives the plain KLs). With
    ``top_k``, the teacher keeps only its ``k`` largest logits (renormalized) and
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
    elif kind in ("skew_forward_kl", "skew_reverse_kl"):
        p_logp, q_logp = (t_logp, s_logp) if kind == "skew_forward_kl" else (s_logp, t_logp)
        m_logp = _mix(p_logp, q_logp, skew)
        per_token = (p_logp.exp() * (p_logp - m_logp)).sum(-1)
    else:
        raise ValueError(f"unknown divergence {kind!r}; choose one of {LOGIT_LOSSES}")
    return per_token.sum() * temperature**2


def _mix(p_logp: torch.Tensor, q_logp: torch.Tensor, skew: float) -> torch.Tensor:
    """``log(skew * p + (1 - skew) * q)`` from log-probabilities, without leaving log space."""
    if skew == 0.0:
        return q_logp
    return torch.logaddexp(p_logp + math.log(skew), q_logp + math.log1p(-skew))


def _chunk_loss_and_grad(
    h_chunk: torch.Tensor,
    w_s: torch.Tensor,
    t_logits: torch.Tensor | None,
    labels: torch.Tensor | None,
    kind: str,
    temperature: float,
    beta: float,
    top_k: int | None,
    kd_weight: float,
    ce_weight: float,
    need_grad: bool = True,
    s_transform: LogitTransform | None = None,
    t_transform: LogitTransform | None = None,
    skew: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One chunk of tokens: ``(kd_sum, ce_sum, d(kd_weight * kd_sum + ce_weight * ce_sum)/d(student logits))``.

    Pure tensor code (no autograd call, no ``.item()``, branches only on the Python arguments), so that
    ``torch.compile`` captures it as one graph. ``kind`` must already be resolved (``jsd`` with ``beta`` 0 or 1
    mapped to the KLs, as :func:`divergence` does); ``t_logits=None`` turns the divergence off and
    ``labels=None`` the cross-entropy. The values equal :func:`divergence` and ``F.cross_entropy(reduction="sum")``
    (``ignore_index=-100`` included); the gradient is analytic. Per token, with ``s = logits / T`` and ``g`` the
    gradient w.r.t. the (possibly top-k gathered) student log-probabilities, the log-softmax backward
    ``g - softmax(s) * sum(g)`` gives d/ds, and d/dlogits is ``T`` times that (the divergence is scaled by ``T**2``):

    - forward KL ``sum t_p (t_logp - s_logp)``: ``g = -t_p``
    - reverse KL ``sum s_p (s_logp - t_logp)``: ``g = s_p (s_logp - t_logp + 1)``
    - JSD, ``M = beta t_p + (1 - beta) s_p``: ``g = (1 - beta) s_p (s_logp - m_logp)``
    - skew forward KL ``sum t_p (t_logp - m_logp)``, ``M = a t_p + (1 - a) s_p``: ``g = -(1 - a) t_p s_p / M``
    - skew reverse KL ``sum s_p (s_logp - m_logp)``, ``M = a s_p + (1 - a) t_p``:
      ``g = s_p (s_logp - m_logp + 1 - a s_p / M)``
    - cross-entropy: ``softmax(logits) - onehot(label)``

    ``s_transform`` / ``t_transform`` (:class:`LogitTransform`, ``None`` or identity for none) turn the raw
    ``h_chunk @ w_s.T`` and ``t_logits`` into the logits the two models produce; the student's feeds both the
    divergence and the cross-entropy. The gradient is taken w.r.t. the *raw* student logits, so it is multiplied by
    the transform's derivative ``scale * (1 - tanh(scale * raw / c) ** 2) = scale * (1 - (logits / c) ** 2)``
    (just ``scale`` without a soft-cap). No transform adds no op.

    Math runs in fp32 (fp64 for fp64 inputs); the gradient comes back in the hidden states' dtype.
    """
    compute = torch.promote_types(h_chunk.dtype, torch.float32)
    logits: torch.Tensor | None  # set to None below once no longer needed
    logits = (h_chunk @ w_s.t()).to(compute)
    if s_transform is not None:
        logits = s_transform.apply(logits)
    kd = ce = logits.new_zeros(())
    grad = None
    s_logp = None
    if t_logits is not None:
        s_logp = F.log_softmax(logits / temperature, dim=-1)
        t = t_logits.to(compute)
        if t_transform is not None:
            t = t_transform.apply(t)
        t = t / temperature
        idx = None
        if top_k is not None:
            t, idx = t.topk(top_k, dim=-1)
            s_sel = s_logp.gather(-1, idx)
        else:
            s_sel = s_logp
        t_logp = F.log_softmax(t, dim=-1)
        del t, t_logits
        # ``del``s keep the eager path's peak at a few [chunk, vocab] tensors (the compiled one plans its own).
        if kind == "forward_kl":
            t_p = t_logp.exp()
            kd = (t_p * (t_logp - s_sel)).sum()
            g = -t_p
            del t_p
        elif kind == "reverse_kl":
            s_p = s_sel.exp()
            diff = s_sel - t_logp
            kd = (s_p * diff).sum()
            g = s_p * (diff + 1)
            del s_p, diff
        elif kind == "jsd":
            m_logp = torch.logsumexp(torch.stack([t_logp + math.log(beta), s_sel + math.log(1 - beta)]), dim=0)
            kl_t = (t_logp.exp() * (t_logp - m_logp)).sum()
            s_p = s_sel.exp()
            s_minus_m = s_sel - m_logp
            del m_logp
            kd = beta * kl_t + (1 - beta) * (s_p * s_minus_m).sum()
            g = (1 - beta) * s_p * s_minus_m
            del s_p, s_minus_m
        elif kind == "skew_forward_kl":
            m_logp = _mix(t_logp, s_sel, skew)
            kd = (t_logp.exp() * (t_logp - m_logp)).sum()
            g = -(1 - skew) * torch.exp(t_logp + s_sel - m_logp)
            del m_logp
        elif kind == "skew_reverse_kl":
            m_logp = _mix(s_sel, t_logp, skew)
            s_p = s_sel.exp()
            s_minus_m = s_sel - m_logp
            kd = (s_p * s_minus_m).sum()
            g = s_p * (s_minus_m + 1 - skew * s_minus_m.exp())
            del m_logp, s_p, s_minus_m
        else:
            raise ValueError(f"unknown divergence {kind!r}; choose one of {LOGIT_LOSSES}")
        del t_logp, s_sel
        kd = kd * temperature**2
        if need_grad:
            g_sum = g.sum(-1, keepdim=True)
            if idx is not None:  # g lives on the teacher's top-k support; the log-softmax spans the vocabulary
                g = torch.zeros_like(s_logp).scatter(-1, idx, g)
            grad = (kd_weight * temperature) * (g - s_logp.exp() * g_sum)
            del g
    if labels is not None:
        logp = s_logp if s_logp is not None and temperature == 1.0 else F.log_softmax(logits, dim=-1)
        if s_transform is None or s_transform.softcap is None:
            logits = None  # only the soft-cap's derivative needs the logits again
        valid = labels != -100  # F.cross_entropy's default ignore_index
        safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(-1)
        ce = -(logp.gather(-1, safe).squeeze(-1) * valid).sum()
        if need_grad:
            w = (valid.to(compute) * ce_weight).unsqueeze(-1)
            g_ce = (logp.exp() * w).scatter_add(-1, safe, -w)
            grad = g_ce if grad is None else grad + g_ce
    if grad is not None and s_transform is not None:  # chain rule through the transform, back to the raw logits
        if s_transform.softcap is not None:
            # d(c tanh(u / c))/du = 1 - tanh(u / c)**2 = 1 - (logits / c)**2, in place: logits is not needed again
            assert logits is not None  # kept above when there is a soft-cap
            grad = grad.mul_(logits.div_(s_transform.softcap).square_().neg_().add_(1))
        if s_transform.scale != 1.0:
            grad = grad.mul_(s_transform.scale)
    del logits
    if grad is not None:
        grad = grad.to(h_chunk.dtype)
    return kd, ce, grad


_COMPILED: dict[str, object] = {}


def _compiled_chunk_fn():
    """``torch.compile`` of :func:`_chunk_loss_and_grad`, made once per process. Dynamo guards on the Python
    arguments (loss kind, top_k, which of teacher/labels are present) and on shapes; shapes are left to automatic
    dynamic, so a last partial chunk, and a different one next batch, cost one recompile in all, not one each."""
    fn = _COMPILED.get("chunk")
    if fn is None:
        fn = _COMPILED["chunk"] = torch.compile(_chunk_loss_and_grad)
    return fn


class _FusedHeadLoss(torch.autograd.Function):
    """Loss and its gradient computed together, chunk by chunk, in the forward pass.

    For each chunk of tokens: student logits (one matmul), teacher logits (one matmul, no grad), the loss and its
    analytic gradient w.r.t. that chunk's logits (:func:`_chunk_loss_and_grad`, optionally ``torch.compile``-d),
    which two more matmuls turn into the gradients of the hidden states and of the LM head. Backward only scales
    them. So every logit tensor lives for one chunk, and nothing is recomputed (activation checkpointing would run
    both LM heads twice). Returns the weighted loss sum (differentiable) and the kd and ce sums (for logging).
    """

    @staticmethod
    def forward(
        ctx,
        h_s,
        w_s,
        h_t,
        w_t,
        labels,
        kind,
        temperature,
        beta,
        top_k,
        kd_weight,
        ce_weight,
        chunk_tokens,
        compiled=False,
        s_transform=None,
        t_transform=None,
        skew=0.1,
    ):
        n = h_s.shape[0]
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        compute = torch.promote_types(h_s.dtype, torch.float32)
        grad_h = torch.zeros_like(h_s) if needs_grad else None
        grad_w = torch.zeros_like(w_s, dtype=torch.promote_types(w_s.dtype, torch.float32)) if needs_grad else None
        kd_total = torch.zeros((), dtype=compute, device=h_s.device)
        ce_total = torch.zeros((), dtype=compute, device=h_s.device)
        want_kd = h_t is not None and kd_weight != 0
        want_ce = labels is not None and ce_weight > 0
        if kind == "jsd" and beta in (0.0, 1.0):
            kind = "forward_kl" if beta == 0.0 else "reverse_kl"
        if want_kd and kind not in LOGIT_LOSSES:
            raise ValueError(f"unknown divergence {kind!r}; choose one of {LOGIT_LOSSES}")
        s_transform = _active(s_transform)
        t_transform = _active(t_transform) if want_kd else None
        chunk_fn = _compiled_chunk_fn() if compiled else _chunk_loss_and_grad
        for start in range(0, n, chunk_tokens):
            sl = slice(start, start + chunk_tokens)
            h_chunk = h_s[sl]
            t_logits = h_t[sl] @ w_t.t() if want_kd else None
            kd, ce, g = chunk_fn(
                h_chunk,
                w_s,
                t_logits,
                labels[sl] if want_ce else None,
                kind,
                temperature,
                beta,
                top_k,
                kd_weight,
                ce_weight,
                needs_grad,
                s_transform,
                t_transform,
                skew,
            )
            del t_logits
            if needs_grad:
                grad_h[sl] = g @ w_s
                grad_w += (g.t() @ h_chunk).to(grad_w.dtype)
                del g
            kd_total += kd
            ce_total += ce
        kd_total, ce_total = kd_total.float(), ce_total.float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w_s.dtype
        ctx.mark_non_differentiable(kd_total, ce_total)
        return kd_weight * kd_total + ce_weight * ce_total, kd_total, ce_total

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        grad_h, grad_w = ctx.saved_tensors
        # In place: these buffers belong to this call alone, and a second [vocab, width] copy is what we avoid.
        out_h = None if grad_h is None else grad_h.mul_(grad_loss.to(grad_h.dtype))
        out_w = None if grad_w is None else grad_w.mul_(grad_loss.to(grad_w.dtype)).to(ctx.w_dtype)
        return out_h, out_w, None, None, None, None, None, None, None, None, None, None, None, None, None, None


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
    compiled: bool = False,
    student_transform: LogitTransform | None = None,
    teacher_transform: LogitTransform | None = None,
    skew: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``kd_weight × mean divergence + ce_weight × mean cross-entropy`` from final hidden states, fused with the
    LM heads and computed ``chunk_tokens`` at a time (see :class:`_FusedHeadLoss`).

    ``student_hidden`` ``[N, Ds]`` and ``teacher_hidden`` ``[N, Dt]`` are flattened token positions;
    ``*_head`` are the LM-head weights ``[V, D]``. ``teacher_hidden=None`` gives plain language-model
    fine-tuning (cross-entropy against ``labels`` only); ``labels=None`` turns cross-entropy off.
    ``compiled=True`` runs the per-chunk loss-and-gradient function through ``torch.compile`` (compiled once per
    process and configuration; needs a working inductor backend, e.g. a C++ compiler on CPU).
    ``student_transform`` / ``teacher_transform`` (:class:`LogitTransform`) are what each model does to its raw
    LM-head output (Gemma-2/3 soft-capping, Granite's logit scaling); the student's applies to the divergence and
    to the cross-entropy, and the gradient goes through it. ``None`` or the identity costs nothing.
    ``skew``: the mixture weight of the skew divergences (see :func:`divergence`).
    Returns ``(loss, kd, ce)``: the differentiable loss, and the two detached means for logging.
    """
    if teacher_hidden is None:
        kd_weight = 0.0
    if labels is None:
        ce_weight = 0.0
    if kd_weight == 0 and ce_weight == 0:
        raise ValueError("chunked_logit_loss has nothing to compute: no teacher and no labels")
    n = student_hidden.shape[0]
    loss, kd, ce = _FusedHeadLoss.apply(
        student_hidden,
        student_head,
        teacher_hidden,
        teacher_head,
        labels,
        kind,
        temperature,
        beta,
        top_k,
        kd_weight,
        ce_weight,
        chunk_tokens,
        compiled,
        _active(student_transform),
        _active(teacher_transform),
        float(skew),
    )
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
