"""The chunked, LM-head-fused losses equal the naive full-logit ones in value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from compress.distillation import chunked_logit_loss, divergence, hidden_state_loss
from compress.distillation.losses import _chunk_loss_and_grad


def _naive(h_s, w_s, h_t, w_t, labels, kind, temperature, beta, top_k):
    s, t = h_s @ w_s.t(), h_t @ w_t.t()
    kd = divergence(s, t, kind, temperature, beta, top_k) / h_s.shape[0]
    ce = F.cross_entropy(s, labels) if labels is not None else torch.zeros(())
    return kd, ce


@pytest.mark.parametrize("kind, beta, temperature, top_k, with_ce", [
    ("forward_kl", 0.5, 1.0, None, False),
    ("reverse_kl", 0.5, 2.0, None, True),
    ("jsd", 0.3, 1.0, None, False),
    ("forward_kl", 0.5, 1.0, 7, True),
])
def test_chunked_equals_naive(kind, beta, temperature, top_k, with_ce):
    g = torch.Generator().manual_seed(0)
    n, ds, dt, v = 37, 12, 16, 50
    h_s = torch.randn(n, ds, generator=g, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(v, ds, generator=g, dtype=torch.float64, requires_grad=True)
    h_t, w_t = torch.randn(n, dt, generator=g, dtype=torch.float64), torch.randn(v, dt, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (n,), generator=g) if with_ce else None
    loss, kd, ce = chunked_logit_loss(h_s, w_s, h_t, w_t, labels, kind=kind, temperature=temperature, beta=beta,
                                      top_k=top_k, chunk_tokens=8, kd_weight=0.7, ce_weight=0.3)
    grads = torch.autograd.grad(3 * loss, (h_s, w_s))
    kd_ref, ce_ref = _naive(h_s, w_s, h_t, w_t, labels, kind, temperature, beta, top_k)
    loss_ref = 0.7 * kd_ref + 0.3 * ce_ref
    grads_ref = torch.autograd.grad(3 * loss_ref, (h_s, w_s))
    torch.testing.assert_close(loss, loss_ref.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd, kd_ref.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce, ce_ref.float(), rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# (kind, beta): jsd with beta 0 and 1 falls back to the two KLs.
KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0)]


def _inputs(n=23, ds=6, dt=9, v=40, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h_s = (1.5 * torch.randn(n, ds, generator=g, dtype=dtype)).requires_grad_()
    w_s = torch.randn(v, ds, generator=g, dtype=dtype).requires_grad_()
    h_t, w_t = 1.5 * torch.randn(n, dt, generator=g, dtype=dtype), torch.randn(v, dt, generator=g, dtype=dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    return h_s, w_s, h_t, w_t, labels


@pytest.mark.parametrize("with_ce", [False, True], ids=["kd", "kd+ce"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("top_k", [None, 5])
@pytest.mark.parametrize("kind, beta", KINDS)
def test_analytic_gradients_equal_autograd_of_naive_loss(kind, beta, top_k, temperature, with_ce):
    """Loss, kd, ce and the gradients of the hidden states and of the LM head equal torch.autograd through the
    full-logit divergence() + F.cross_entropy, for chunk sizes of one token, one not dividing N, N, and more."""
    h_s, w_s, h_t, w_t, labels = _inputs()
    labels = labels if with_ce else None
    n = h_s.shape[0]
    s, t = h_s @ w_s.t(), h_t @ w_t.t()
    kd_ref = divergence(s, t, kind, temperature, beta, top_k) / n  # computes in fp32, differentiable back to fp64
    ce_ref = F.cross_entropy(s, labels) if with_ce else torch.zeros(())
    loss_ref = 0.7 * kd_ref + 0.3 * ce_ref
    grads_ref = torch.autograd.grad(loss_ref, (h_s, w_s))
    for chunk in (1, 7, n, 64):
        loss, kd, ce = chunked_logit_loss(h_s, w_s, h_t, w_t, labels, kind=kind, temperature=temperature, beta=beta,
                                          top_k=top_k, chunk_tokens=chunk, kd_weight=0.7, ce_weight=0.3)
        grads = torch.autograd.grad(loss, (h_s, w_s))
        torch.testing.assert_close(kd, kd_ref.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ce, ce_ref.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss, loss_ref.float(), rtol=1e-5, atol=1e-6)
        for name, a, b in zip(("hidden", "head"), grads, grads_ref):
            assert a.dtype == torch.float64
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"d/d{name}, chunk {chunk}: {m}")


@pytest.mark.parametrize("with_ce", [False, True], ids=["kd", "kd+ce"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("top_k", [None, 5])
@pytest.mark.parametrize("kind, beta", KINDS)
def test_chunk_gradient_is_the_exact_derivative_in_float64(kind, beta, top_k, temperature, with_ce):
    """In float64 (which the chunk function keeps, unlike divergence()), the analytic d(loss)/d(logits) equals
    autograd through the function's own loss values to ~1e-12: exact formulas, not just fp32-close ones."""
    h_s, w_s, h_t, w_t, labels = _inputs(n=9)
    if kind == "jsd" and beta in (0.0, 1.0):  # _FusedHeadLoss resolves this before calling the chunk function
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    h = h_s.detach().requires_grad_()
    kd, ce, g = _chunk_loss_and_grad(h, w_s.detach(), h_t @ w_t.t(), labels if with_ce else None, kind, temperature,
                                     beta, top_k, 0.7, 0.3)
    assert kd.dtype == ce.dtype == g.dtype == torch.float64
    (ref,) = torch.autograd.grad(0.7 * kd + 0.3 * ce, h)
    torch.testing.assert_close(g @ w_s.detach(), ref, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        s = h_s @ w_s.t()
        torch.testing.assert_close(float(kd), float(divergence(s, h_t @ w_t.t(), kind, temperature, beta, top_k)),
                                   rtol=1e-5, atol=1e-6)
        if with_ce:
            torch.testing.assert_close(ce, F.cross_entropy(s, labels, reduction="sum"), rtol=1e-12, atol=1e-12)


def test_ignored_labels_and_no_grad_and_bf16():
    h_s, w_s, h_t, w_t, labels = _inputs(dtype=torch.float32)
    labels[::3] = -100  # F.cross_entropy's ignore_index: skipped in the sum, still counted in N (as before)
    loss, kd, ce = chunked_logit_loss(h_s, w_s, h_t, w_t, labels, kind="jsd", top_k=5, chunk_tokens=5)
    s = h_s @ w_s.t()
    ce_ref = F.cross_entropy(s, labels, reduction="sum") / s.shape[0]
    loss_ref = divergence(s, h_t @ w_t.t(), "jsd", top_k=5) / s.shape[0] + ce_ref
    torch.testing.assert_close(ce, ce_ref)
    ref_h, ref_w = torch.autograd.grad(loss_ref, (h_s, w_s))
    for a, b in zip(torch.autograd.grad(loss, (h_s, w_s)), (ref_h, ref_w)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # no gradient wanted: same values, none computed
        loss_ng, _, _ = chunked_logit_loss(h_s, w_s, h_t, w_t, labels, kind="jsd", top_k=5, chunk_tokens=5)
    assert not loss_ng.requires_grad
    torch.testing.assert_close(loss_ng, loss.detach())
    hb, wb = h_s.detach().bfloat16().requires_grad_(), w_s.detach().bfloat16().requires_grad_()
    loss_b, kd_b, _ = chunked_logit_loss(hb, wb, h_t.bfloat16(), w_t.bfloat16(), labels, kind="jsd", top_k=5,
                                         chunk_tokens=5)
    assert loss_b.dtype == kd_b.dtype == torch.float32
    gh, gw = torch.autograd.grad(loss_b, (hb, wb))
    assert gh.dtype == gw.dtype == torch.bfloat16
    torch.testing.assert_close(gh.float(), ref_h, rtol=0.05, atol=0.02)
    torch.testing.assert_close(gw.float(), ref_w, rtol=0.05, atol=0.02)


def test_lm_only_needs_no_teacher():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(10, 4, generator=g, requires_grad=True)
    w = torch.randn(20, 4, generator=g, requires_grad=True)
    labels = torch.randint(0, 20, (10,), generator=g)
    loss, kd, ce = chunked_logit_loss(h, w, None, None, labels, chunk_tokens=3)
    ref = F.cross_entropy(h @ w.t(), labels)
    torch.testing.assert_close(loss, ref)
    assert float(kd) == 0.0
    torch.testing.assert_close(torch.autograd.grad(loss, h)[0], torch.autograd.grad(ref, h)[0])
    with pytest.raises(ValueError, match="nothing to compute"):
        chunked_logit_loss(h, w, None, None, None)


def test_divergence_properties():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    p_t, p_s = F.softmax(t, -1), F.softmax(s, -1)
    forward = (p_t * (p_t.log() - p_s.log())).sum()
    torch.testing.assert_close(divergence(s, t, "forward_kl"), forward)
    torch.testing.assert_close(divergence(s, t, "jsd", beta=0.0), forward)
    torch.testing.assert_close(divergence(s, t, "jsd", beta=1.0), divergence(s, t, "reverse_kl"))
    torch.testing.assert_close(divergence(s, t, "jsd", beta=0.5), divergence(t, s, "jsd", beta=0.5))  # symmetric
    assert float(divergence(t, t, "forward_kl")) == pytest.approx(0.0, abs=1e-6)
    assert float(divergence(s, t, "jsd", beta=0.5)) <= 11 ** 0 * 5 * 0.6932  # JSD <= ln 2 per token


def test_hidden_state_losses():
    a = torch.randn(2, 3, 8)
    assert float(hidden_state_loss(a, 3 * a, "cosine")) == pytest.approx(0.0, abs=1e-6)
    assert float(hidden_state_loss(a, a, "mse")) == 0.0
    with pytest.raises(ValueError, match="unknown hidden-state loss"):
        hidden_state_loss(a, a, "l1")
