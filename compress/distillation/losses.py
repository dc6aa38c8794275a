"""Distillation losses that never materialize full-vocabulary logits for a whole batch.

The logit losses take *final hidden states* and the student's LM-head weight matrix, and compute logits,
softmaxes, the divergence and its analytic gradient one chunk of tokens at a time, in the forward pass: peak memory
is one chunk of ``[chunk_tokens, vocab]`` fp32 tensors, whatever the batch, sequence length or vocabulary.

One chunked loss (:class:`_FusedHeadLoss`) serves two sources of the teacher's log-probabilities: the teacher's own
final hidden states and LM head, run chunk by chunk (:func:`chunked_logit_loss`, online distillation), or its
top-k log-probabilities stored by :func:`compress.build_teacher_cache` (:func:`cached_logit_loss`). Both share the
student's side: its logits and logit transform, the divergence on log-probability buckets, and the chain rule back
through the transform to the hidden states and the LM head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F

from ..models.logits import LogitTransform
from ..validate import check_int
from .config import CACHED_LOSSES, HIDDEN_LOSSES, LOGIT_LOSSES

__all__ = [
    "CACHED_LOSSES",
    "HIDDEN_LOSSES",
    "LOGIT_LOSSES",
    "LogitTransform",
    "active_transform",
    "cached_logit_loss",
    "chunked_logit_loss",
    "divergence",
    "hidden_state_loss",
]

# The smallest log-probability a float32 holds as a normal number: where the teacher gives a bucket exactly zero
# mass, reverse KL (which weighs the teacher's log-probability by the student's mass) uses this instead of -inf.
_LOG_TINY = math.log(torch.finfo(torch.float32).tiny)


def active_transform(transform: LogitTransform | None) -> LogitTransform | None:
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


# ----------------------------------------------------------------------------------------------- the student's side


def _student_logits(h: torch.Tensor, w: torch.Tensor, transform: LogitTransform | None) -> torch.Tensor:
    """``transform(h @ w.T)`` in fp32 (fp64 for fp64 inputs): the logits the student produces for one chunk."""
    logits = (h @ w.t()).to(torch.promote_types(h.dtype, torch.float32))
    if transform is not None:
        logits = transform.apply(logits)
    return logits


def _softcap_slope(logits: torch.Tensor, transform: LogitTransform | None, in_place: bool) -> torch.Tensor | None:
    """``d(c tanh(u / c))/du = 1 - tanh(u / c)**2 = 1 - (logits / c)**2`` of a soft-capping transform, from the
    soft-capped ``logits`` (overwritten when ``in_place``: the caller needs them no more); None without a soft-cap."""
    if transform is None or transform.softcap is None:
        return None
    scaled = logits.div_(transform.softcap) if in_place else logits / transform.softcap
    return scaled.square_().neg_().add_(1)


def _to_raw_logits(grad: torch.Tensor, transform: LogitTransform | None, slope: torch.Tensor | None) -> torch.Tensor:
    """The chain rule, in place, from d/d(logits) back to d/d(raw ``h @ w.T``): times the soft-cap's ``slope``
    (:func:`_softcap_slope`) and the transform's ``scale``. No transform adds no op."""
    if transform is not None:
        if slope is not None:
            grad = grad.mul_(slope)
        if transform.scale != 1.0:
            grad = grad.mul_(transform.scale)
    return grad


def _bucket_divergence(
    kind: str, t_logp: torch.Tensor, s_logp: torch.Tensor, beta: float, skew: float, zero_mass: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of the divergence, g)`` between teacher and student log-probabilities over the same buckets (tokens,
    or tokens plus an "everything else" bucket), with ``g = d(divergence)/d(s_logp)``, analytic:

    - forward KL ``sum t_p (t_logp - s_logp)``: ``g = -t_p``
    - reverse KL ``sum s_p (s_logp - t_logp)``: ``g = s_p (s_logp - t_logp + 1)``
    - JSD, ``M = beta t_p + (1 - beta) s_p``: ``g = (1 - beta) s_p (s_logp - m_logp)``
    - skew forward KL ``sum t_p (t_logp - m_logp)``, ``M = a t_p + (1 - a) s_p``: ``g = -(1 - a) t_p s_p / M``
    - skew reverse KL ``sum s_p (s_logp - m_logp)``, ``M = a s_p + (1 - a) t_p``:
      ``g = s_p (s_logp - m_logp + 1 - a s_p / M)``

    ``zero_mass`` (the KLs only): a bucket whose weighting mass is exactly zero contributes 0 (``0 log 0 = 0``)
    instead of ``0 * inf = nan``. ``kind`` must be resolved already (``jsd`` with ``beta`` 0 or 1 mapped to the
    KLs). Pure tensor code, branching only on the Python arguments (``torch.compile`` captures it whole).
    """
    if kind == "forward_kl":
        t_p = t_logp.exp()
        terms = t_p * (t_logp - s_logp)
        if zero_mass:
            terms = torch.where(t_p > 0, terms, terms.new_zeros(()))
        return terms.sum(), -t_p
    if kind == "reverse_kl":
        s_p = s_logp.exp()
        diff = s_logp - t_logp
        terms, g = s_p * diff, s_p * (diff + 1)
        if zero_mass:
            zero = terms.new_zeros(())
            terms, g = torch.where(s_p > 0, terms, zero), torch.where(s_p > 0, g, zero)
        return terms.sum(), g
    if kind == "jsd":
        m_logp = torch.logsumexp(torch.stack([t_logp + math.log(beta), s_logp + math.log(1 - beta)]), dim=0)
        kl_t = (t_logp.exp() * (t_logp - m_logp)).sum()
        s_p = s_logp.exp()
        s_minus_m = s_logp - m_logp
        del m_logp  # ``del``s keep the eager path's peak at a few [chunk, vocab] tensors
        return beta * kl_t + (1 - beta) * (s_p * s_minus_m).sum(), (1 - beta) * s_p * s_minus_m
    if kind == "skew_forward_kl":
        m_logp = _mix(t_logp, s_logp, skew)
        return (t_logp.exp() * (t_logp - m_logp)).sum(), -(1 - skew) * torch.exp(t_logp + s_logp - m_logp)
    if kind == "skew_reverse_kl":
        m_logp = _mix(s_logp, t_logp, skew)
        s_p = s_logp.exp()
        s_minus_m = s_logp - m_logp
        del m_logp
        return (s_p * s_minus_m).sum(), s_p * (s_minus_m + 1 - skew * s_minus_m.exp())
    raise ValueError(f"unknown divergence {kind!r}; choose one of {LOGIT_LOSSES}")


def _cross_entropy_and_grad(
    logp: torch.Tensor, labels: torch.Tensor, ce_weight: float, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(sum of -logp[label], ce_weight * (softmax - onehot(label)))`` over the tokens whose label is not
    ``-100`` (``F.cross_entropy``'s ``ignore_index``), from the student's log-probabilities at temperature 1."""
    valid = labels != -100
    safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(-1)
    ce = -(logp.gather(-1, safe).squeeze(-1) * valid).sum()
    if not need_grad:
        return ce, None
    w = (valid.to(logp.dtype) * ce_weight).unsqueeze(-1)
    return ce, (logp.exp() * w).scatter_add(-1, safe, -w)


# ----------------------------------------------------------------------------------------------- online teacher


def _teacher_log_probs(
    t_logits: torch.Tensor,
    s_logp: torch.Tensor,
    transform: LogitTransform | None,
    temperature: float,
    top_k: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(teacher log-probs, student log-probs on the same support, top-k ids or None)`` from the teacher's raw
    logits of a chunk: transformed, at ``temperature``, and with ``top_k`` renormalized on the teacher's top k."""
    t = t_logits.to(s_logp.dtype)
    if transform is not None:
        t = transform.apply(t)
    t = t / temperature
    if top_k is None:
        return F.log_softmax(t, dim=-1), s_logp, None
    t, idx = t.topk(top_k, dim=-1)
    return F.log_softmax(t, dim=-1), s_logp.gather(-1, idx), idx


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
    gradient w.r.t. the (possibly top-k gathered) student log-probabilities (:func:`_bucket_divergence`), the
    log-softmax backward ``g - softmax(s) * sum(g)`` gives d/ds, and d/dlogits is ``T`` times that (the divergence
    is scaled by ``T**2``); the cross-entropy's is ``softmax(logits) - onehot(label)``.

    ``s_transform`` / ``t_transform`` (:class:`LogitTransform`, ``None`` or identity for none) turn the raw
    ``h_chunk @ w_s.T`` and ``t_logits`` into the logits the two models produce; the student's feeds both the
    divergence and the cross-entropy. The gradient is taken w.r.t. the *raw* student logits, so it is multiplied by
    the transform's derivative ``scale * (1 - tanh(scale * raw / c) ** 2) = scale * (1 - (logits / c) ** 2)``
    (just ``scale`` without a soft-cap). No transform adds no op.

    Math runs in fp32 (fp64 for fp64 inputs); the gradient comes back in the hidden states' dtype.
    """
    logits: torch.Tensor | None  # set to None below once no longer needed
    logits = _student_logits(h_chunk, w_s, s_transform)
    kd = ce = logits.new_zeros(())
    grad = None
    s_logp = None
    if t_logits is not None:
        s_logp = F.log_softmax(logits / temperature, dim=-1)
        t_logp, s_sel, idx = _teacher_log_probs(t_logits, s_logp, t_transform, temperature, top_k)
        del t_logits
        kd, g = _bucket_divergence(kind, t_logp, s_sel, beta, skew)
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
        ce, g_ce = _cross_entropy_and_grad(logp, labels, ce_weight, need_grad)
        del logp
        if g_ce is not None:
            grad = g_ce if grad is None else grad + g_ce
    if grad is not None and s_transform is not None:  # back through the transform, to the raw logits
        assert logits is not None or s_transform.softcap is None  # kept above when there is a soft-cap
        slope = None if logits is None else _softcap_slope(logits, s_transform, in_place=True)
        grad = _to_raw_logits(grad, s_transform, slope)
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


@dataclass(frozen=True)
class _TeacherHeadSource:
    """The teacher's log-probabilities computed chunk by chunk from its final hidden states ``[N, Dt]`` and LM
    head ``[V, Dt]`` (one matmul per chunk, no grad), plus the cross-entropy against ``labels``: online KD."""

    hidden: torch.Tensor | None
    head: torch.Tensor | None
    labels: torch.Tensor | None
    kind: str
    temperature: float
    beta: float
    top_k: int | None
    kd_weight: float
    ce_weight: float
    compiled: bool
    student_transform: LogitTransform | None
    teacher_transform: LogitTransform | None
    skew: float
    #: The fused loss's kd and ce sums come back in float32 (its loss too).
    float32_sums = True

    def chunk(
        self, h_chunk: torch.Tensor, w_s: torch.Tensor, rows: slice, need_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        fn = _compiled_chunk_fn() if self.compiled else _chunk_loss_and_grad
        t_logits = None if self.hidden is None else self.hidden[rows] @ cast(torch.Tensor, self.head).t()
        return fn(
            h_chunk,
            w_s,
            t_logits,
            None if self.labels is None else self.labels[rows],
            self.kind,
            self.temperature,
            self.beta,
            self.top_k,
            self.kd_weight,
            self.ce_weight,
            need_grad,
            self.student_transform,
            self.teacher_transform,
            self.skew,
        )


# ----------------------------------------------------------------------------------------------- cached teacher


def _cached_chunk_loss_and_grad(
    h: torch.Tensor,
    w: torch.Tensor,
    t_logp: torch.Tensor,
    t_idx: torch.Tensor,
    t_rest: torch.Tensor,
    kind: str,
    weight: float,
    need_grad: bool,
    transform: LogitTransform | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One chunk against a cached teacher: ``(kd_sum, 0, d(weight * kd_sum)/d(raw student logits))``; see
    :func:`cached_logit_loss` for the math. Memory: the ``[c, V]`` logits, reused in place for the gradient (plus
    the soft-cap's derivative when there is one, and logsumexp's temporary)."""
    z = _student_logits(h, w, transform)
    slope = _softcap_slope(z, transform, in_place=False) if need_grad else None
    compute = z.dtype
    a, a_r, idx = t_logp.to(compute), t_rest.to(compute), t_idx.long()
    lse = torch.logsumexp(z, dim=-1)
    s = z.gather(-1, idx) - lse.unsqueeze(-1)  # student log q on the teacher's top k
    z.scatter_(-1, idx, float("-inf"))  # z now: the logits outside the top k
    lse_rest = torch.logsumexp(z, dim=-1)
    s_r = lse_rest - lse  # log q_rest (-inf when k == V)
    zero = torch.zeros((), dtype=compute, device=z.device)
    if kind == "reverse_kl":  # weighs log p by the student's mass: a finite penalty where the teacher has none
        a, a_r = a.clamp_min(_LOG_TINY), a_r.clamp_min(_LOG_TINY)
    kd_top, g = _bucket_divergence(kind, a, s, 0.5, 0.0, zero_mass=kind == "forward_kl")
    kd_rest, g_r = _bucket_divergence(kind, a_r, s_r, 0.5, 0.0, zero_mass=True)
    kd = kd_top + kd_rest
    if not need_grad:
        return kd, zero, None
    q, q_r = s.exp(), s_r.exp()
    total = g.sum(-1) + g_r  # G
    # Outside the top k: dL/dz_j = (g_r - q_r G) exp(z_j - lse_rest); inside: g_j - q_j G.
    safe = torch.where(torch.isfinite(lse_rest), lse_rest, zero)
    grad = z.sub_(safe.unsqueeze(-1)).exp_().mul_((weight * (g_r - q_r * total)).unsqueeze(-1))
    grad.scatter_(-1, idx, weight * (g - q * total.unsqueeze(-1)))
    return kd, zero, _to_raw_logits(grad, transform, slope).to(h.dtype)


@dataclass(frozen=True)
class _TeacherCacheSource:
    """The teacher's stored top-k log-probabilities ``[N, k]``, their ids ``[N, k]`` and the log of the rest mass
    ``[N]`` (a teacher cache): the divergence on ``k + 1`` buckets, no cross-entropy."""

    logp: torch.Tensor
    idx: torch.Tensor
    rest: torch.Tensor
    kind: str
    kd_weight: float
    student_transform: LogitTransform | None
    ce_weight = 0.0
    #: The sums stay in the compute dtype (float64 for float64 inputs).
    float32_sums = False

    def chunk(
        self, h_chunk: torch.Tensor, w_s: torch.Tensor, rows: slice, need_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return _cached_chunk_loss_and_grad(
            h_chunk,
            w_s,
            self.logp[rows],
            self.idx[rows],
            self.rest[rows],
            self.kind,
            self.kd_weight,
            need_grad,
            self.student_transform,
        )


# ----------------------------------------------------------------------------------------------- the fused loss


class _FusedHeadLoss(torch.autograd.Function):
    """Loss and its gradient computed together, chunk by chunk, in the forward pass.

    For each chunk of tokens, the teacher source (:class:`_TeacherHeadSource`: the teacher's hidden states and
    head; :class:`_TeacherCacheSource`: a teacher cache) gives the loss sums and their analytic gradient w.r.t.
    that chunk's raw student logits, which two matmuls turn into the gradients of the hidden states and of the LM
    head. Backward only scales them. So every logit tensor lives for one chunk, and nothing is recomputed
    (activation checkpointing would run both LM heads twice). Returns the weighted loss sum (differentiable) and
    the kd and ce sums (for logging).
    """

    @staticmethod
    def forward(ctx, h_s, w_s, teacher, chunk_tokens):
        n = h_s.shape[0]
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        compute = torch.promote_types(h_s.dtype, torch.float32)
        grad_h = torch.zeros_like(h_s) if needs_grad else None
        grad_w = torch.zeros_like(w_s, dtype=torch.promote_types(w_s.dtype, torch.float32)) if needs_grad else None
        kd_total = torch.zeros((), dtype=compute, device=h_s.device)
        ce_total = torch.zeros((), dtype=compute, device=h_s.device)
        for start in range(0, n, chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            h_chunk = h_s[rows]
            kd, ce, g = teacher.chunk(h_chunk, w_s, rows, needs_grad)
            if needs_grad:
                grad_h[rows] = g @ w_s
                grad_w += (g.t() @ h_chunk).to(grad_w.dtype)
                del g
            kd_total += kd
            ce_total += ce
        if teacher.float32_sums:
            kd_total, ce_total = kd_total.float(), ce_total.float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w_s.dtype
        ctx.mark_non_differentiable(kd_total, ce_total)
        return teacher.kd_weight * kd_total + teacher.ce_weight * ce_total, kd_total, ce_total

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        grad_h, grad_w = ctx.saved_tensors
        # In place: these buffers belong to this call alone, and a second [vocab, width] copy is what we avoid.
        out_h = None if grad_h is None else grad_h.mul_(grad_loss.to(grad_h.dtype))
        out_w = None if grad_w is None else grad_w.mul_(grad_loss.to(grad_w.dtype)).to(ctx.w_dtype)
        return out_h, out_w, None, None


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
    want_kd = teacher_hidden is not None and kd_weight != 0
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    if want_kd and kind not in LOGIT_LOSSES:
        raise ValueError(f"unknown divergence {kind!r}; choose one of {LOGIT_LOSSES}")
    teacher = _TeacherHeadSource(
        hidden=teacher_hidden if want_kd else None,
        head=teacher_head if want_kd else None,
        labels=labels if labels is not None and ce_weight > 0 else None,
        kind=kind,
        temperature=temperature,
        beta=beta,
        top_k=top_k,
        kd_weight=kd_weight,
        ce_weight=ce_weight,
        compiled=compiled,
        student_transform=active_transform(student_transform),
        teacher_transform=active_transform(teacher_transform) if want_kd else None,
        skew=float(skew),
    )
    loss, kd, ce = _FusedHeadLoss.apply(student_hidden, student_head, teacher, chunk_tokens)
    n = student_hidden.shape[0]
    return loss / n, kd / n, ce / n


def cached_logit_loss(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    t_logp: torch.Tensor,
    t_idx: torch.Tensor,
    t_rest: torch.Tensor,
    *,
    kind: str = "forward_kl",
    chunk_tokens: int = 1024,
    student_transform: LogitTransform | None = None,
    weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight ×`` the mean over tokens of a divergence between the cached teacher and the student, on the
    ``k + 1`` buckets "each of the teacher's top k tokens" and "everything else"; returns ``(loss, kd)``:
    the differentiable loss and the detached mean divergence for logging.

    Inputs, per token (``N`` flattened positions): ``student_hidden`` ``[N, D]`` (final hidden states) and
    ``student_head`` ``[V, D]`` (LM-head weight), differentiable; the cache's ``t_logp`` ``[N, k]``, ``t_idx``
    ``[N, k]`` (distinct ids per token) and ``t_rest`` ``[N]``
    (:meth:`~compress.distillation.teacher_cache.TeacherCache.lookup`, reshaped). ``student_transform`` is what
    the student's family does to its raw logits (as in :func:`chunked_logit_loss`). Temperature is 1: the cache
    holds the teacher at T = 1.

    The buckets. Teacher: ``p_i = exp(t_logp_i)`` on the top k, ``r = exp(t_rest)`` for the rest. Student, with
    logits ``z``: ``s_i = z_{idx_i} - LSE(z)`` (``q_i = exp(s_i)``) and, computed stably,
    ``s_r = LSE(z outside idx) - LSE(z)`` (``q_r = exp(s_r) = 1 - sum q_i``; the top k masked with ``-inf``).

    - ``forward_kl``: ``sum_i p_i (log p_i - s_i) + r (log r - s_r)``; ``dL/ds_i = -p_i``, ``dL/ds_r = -r``.
    - ``reverse_kl``: ``sum_i q_i (s_i - log p_i) + q_r (s_r - log r)``; ``dL/ds_i = q_i (s_i - log p_i + 1)``,
      ``dL/ds_r = q_r (s_r - log r + 1)``.

    A bucket with zero mass contributes 0 (``0 log 0 = 0``): ``r = 0`` when ``k = V`` (``t_rest = -inf``;
    then ``q_r = 0`` too and both losses equal the full-vocabulary KL). Reverse KL weighs ``log p`` by the
    student's mass, so a teacher log-probability of ``-inf`` is taken as ``log(float32 tiny) ≈ -87.3`` there
    (a large, finite penalty instead of an infinite loss).

    The gradient, analytic, per token. With ``g_i = dL/ds_i``, ``g_r = dL/ds_r`` and ``G = sum_i g_i + g_r``:
    ``ds_i/dz_j = [j = idx_i] - q_j`` and ``ds_r/dz_j = [j outside idx] q_j / q_r - q_j``, so

    - for ``j`` in the top k: ``dL/dz_j = g_j - q_j G``;
    - for ``j`` outside it: ``dL/dz_j = (g_r - q_r G) · exp(z_j - LSE(z outside idx))`` (``q_j / q_r``, in
      ``[0, 1]`` and finite even where ``q_r`` underflows).

    For forward KL with normalized buckets this is ``q - p~``, where ``p~`` spreads the teacher's rest mass
    ``r`` over the tokens outside the top k in the student's own proportions. The transform's derivative then
    takes it back to the raw logits (``scale · (1 - (z / softcap)²)``), and two matmuls to ``student_hidden``
    and ``student_head`` (the chunked loss of :func:`chunked_logit_loss`, :class:`_FusedHeadLoss`).

    Memory: one chunk of ``chunk_tokens`` tokens at a time, a ``[chunk, V]`` float32 tensor reused in place
    for the gradient (a second one with a soft-cap); math in float32 (float64 for float64 inputs, and then the
    loss is float64 too); the gradients come back in the inputs' dtypes.
    """
    if kind not in CACHED_LOSSES:
        raise ValueError(
            f"unknown cached divergence {kind!r}; choose one of {CACHED_LOSSES} (JSD and "
            "temperatures other than 1 need the teacher's full distribution: use chunked_logit_loss)"
        )
    check_int("chunk_tokens", chunk_tokens, 1)
    if student_hidden.dim() != 2 or student_head.dim() != 2 or student_hidden.shape[1] != student_head.shape[1]:
        raise ValueError(
            f"student_hidden [N, D] and student_head [V, D] do not fit: {tuple(student_hidden.shape)} "
            f"and {tuple(student_head.shape)}"
        )
    n = student_hidden.shape[0]
    if t_logp.dim() != 2 or t_logp.shape != t_idx.shape or t_logp.shape[0] != n or tuple(t_rest.shape) != (n,):
        raise ValueError(
            f"the cached teacher should be t_logp [N, k], t_idx [N, k], t_rest [N] with N = {n}, got "
            f"{tuple(t_logp.shape)}, {tuple(t_idx.shape)}, {tuple(t_rest.shape)}"
        )
    if t_logp.shape[1] > student_head.shape[0]:
        raise ValueError(
            f"the cache keeps {t_logp.shape[1]} tokens per position, more than the student's "
            f"vocabulary of {student_head.shape[0]}"
        )
    teacher = _TeacherCacheSource(t_logp, t_idx, t_rest, kind, float(weight), active_transform(student_transform))
    loss, kd, _ = _FusedHeadLoss.apply(student_hidden, student_head, teacher, chunk_tokens)
    return loss / n, kd / n


def hidden_state_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Mean over tokens of ``1 - cos`` or of the squared error averaged over channels (widths must match:
    project the student first when they differ)."""
    s, t = student.float(), teacher.float()
    if kind == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    if kind == "mse":
        return F.mse_loss(s, t)
    raise ValueError(f"unknown hidden-state loss {kind!r}; choose one of {HIDDEN_LOSSES}")
