"""The per-chunk loss-and-gradient function is one graph for torch.compile, and compiling it changes nothing."""

import pytest
import torch

from compress.distillation import chunked_logit_loss
from compress.distillation.losses import _chunk_loss_and_grad, _compiled_chunk_fn


def _inputs(n=11, ds=6, dt=8, v=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n, ds, generator=g).requires_grad_()
    w_s = torch.randn(v, ds, generator=g).requires_grad_()
    h_t, w_t = torch.randn(n, dt, generator=g), torch.randn(v, dt, generator=g)
    return h_s, w_s, h_t, w_t, torch.randint(0, v, (n,), generator=g)


@pytest.mark.parametrize("kind, temperature, beta, top_k, teacher, labels", [
    ("jsd", 2.5, 0.3, 5, True, True),
    ("forward_kl", 1.0, 0.5, None, True, True),
    ("reverse_kl", 1.0, 0.5, 5, True, False),
    ("forward_kl", 1.0, 0.5, None, False, True),  # language-model fine-tuning: cross-entropy only
])
def test_chunk_function_has_no_graph_break(kind, temperature, beta, top_k, teacher, labels):
    """The old version took d(loss)/d(logits) with torch.autograd.grad, which Dynamo cannot trace (2 breaks)."""
    h_s, w_s, h_t, w_t, y = _inputs()
    t_logits = h_t @ w_t.t() if teacher else None
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_chunk_loss_and_grad)(
        h_s.detach(), w_s.detach(), t_logits, y if labels else None, kind, temperature, beta, top_k, 0.7, 0.3, True)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("kind, top_k, temperature, with_ce", [("jsd", 5, 2.0, True), ("reverse_kl", None, 1.0, False)])
def test_compiled_equals_eager(inductor, kind, top_k, temperature, with_ce):
    h_s, w_s, h_t, w_t, y = _inputs()
    labels = y if with_ce else None
    out = {}
    for compiled in (False, True):
        for n in (11, 10):  # chunks of 4, 4, 3, then 4, 4, 2: the partial last chunk changes shape between calls
            loss, kd, ce = chunked_logit_loss(h_s[:n], w_s, h_t[:n], w_t, None if labels is None else labels[:n],
                                              kind=kind, temperature=temperature, beta=0.3, top_k=top_k,
                                              chunk_tokens=4, kd_weight=0.7, ce_weight=0.3, compiled=compiled)
            out[compiled, n] = (loss.detach(), kd, ce, *torch.autograd.grad(loss, (h_s, w_s)))
    for n in (11, 10):
        for a, b in zip(out[True, n], out[False, n]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert _compiled_chunk_fn() is _compiled_chunk_fn()  # compiled once per process, then reused
