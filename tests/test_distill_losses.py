"""The chunked, LM-head-fused losses equal the naive full-logit ones in value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from compress.distill import chunked_logit_loss, divergence, hidden_state_loss


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
