"""Logit transforms (Gemma-2/3 final soft-capping, Granite logit scaling) in the fused, chunked KD loss.

The loss must see the logits each model really produces, and its analytic gradient must go back through the
transform to the raw ``hidden @ head.T``: checked against autograd through a naive full-logit reference.
"""

import pytest
import torch
import torch.nn.functional as F

from compress.distillation.losses import LogitTransform, _chunk_loss_and_grad, _compiled_chunk_fn, chunked_logit_loss, \
    divergence

SOFTCAP = LogitTransform(softcap=5.0)
GRANITE = LogitTransform(scale=1 / 8)

# (id, student transform, teacher transform)
TRANSFORMS = [
    ("softcap-both", SOFTCAP, SOFTCAP),
    ("softcap-student", SOFTCAP, None),
    ("softcap-teacher", None, SOFTCAP),
    ("scale-both", GRANITE, GRANITE),
    ("scale-student-softcap-teacher", GRANITE, LogitTransform(softcap=3.0)),
    ("softcap-student-scale-teacher", LogitTransform(softcap=7.0), LogitTransform(scale=0.25)),
    ("scale-and-softcap", LogitTransform(scale=0.5, softcap=4.0), SOFTCAP),
]
KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)]


def _inputs(n=37, ds=6, dt=9, v=40, seed=0, dtype=torch.float64, spread=3.0):
    """Raw logits reach |~20| (so a soft-cap of 5 saturates: tanh'(4) ~ 1e-3); a few labels are ignore_index."""
    g = torch.Generator().manual_seed(seed)
    h_s = (spread * torch.randn(n, ds, generator=g, dtype=dtype)).requires_grad_()
    w_s = torch.randn(v, ds, generator=g, dtype=dtype).requires_grad_()
    h_t = spread * torch.randn(n, dt, generator=g, dtype=dtype)
    w_t = torch.randn(v, dt, generator=g, dtype=dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::7] = -100
    return h_s, w_s, h_t, w_t, labels


def _apply(transform, logits):
    return logits if transform is None else transform(logits)


def _naive(h_s, w_s, h_t, w_t, labels, kind, temperature, beta, top_k, s_tr, t_tr):
    """Full logits, the transform, :func:`divergence` and ``F.cross_entropy``: autograd does the rest."""
    n = h_s.shape[0]
    s = _apply(s_tr, h_s @ w_s.t())
    t = _apply(t_tr, h_t @ w_t.t())
    kd = divergence(s, t, kind, temperature, beta, top_k) / n
    ce = F.cross_entropy(s, labels, reduction="sum") / n if labels is not None else torch.zeros((), dtype=s.dtype)
    return kd, ce


def test_inputs_saturate_the_softcap():
    """The regime the gradient tests run in: tanh is far from linear, so a missing tanh' could not hide."""
    h_s, w_s, h_t, w_t, _ = _inputs()
    for raw in (h_s @ w_s.t(), h_t @ w_t.t()):
        assert raw.abs().max() > 15
        assert (raw.abs() > 10).float().mean() > 0.05  # tanh'(10 / 5) = 0.07


def _check_against_naive(s_tr, t_tr, kind, beta, temperature, top_k, with_ce, chunk_tokens):
    h_s, w_s, h_t, w_t, labels = _inputs()
    labels = labels if with_ce else None
    loss, kd, ce = chunked_logit_loss(h_s, w_s, h_t, w_t, labels, kind=kind, temperature=temperature, beta=beta,
                                      top_k=top_k, chunk_tokens=chunk_tokens, kd_weight=0.7, ce_weight=0.3,
                                      student_transform=s_tr, teacher_transform=t_tr)
    grads = torch.autograd.grad(3 * loss, (h_s, w_s))
    kd_ref, ce_ref = _naive(h_s, w_s, h_t, w_t, labels, kind, temperature, beta, top_k, s_tr, t_tr)
    loss_ref = 0.7 * kd_ref + 0.3 * ce_ref
    grads_ref = torch.autograd.grad(3 * loss_ref, (h_s, w_s))
    # divergence() computes in fp32, so the reference carries fp32 rounding; the chunked path runs in fp64.
    torch.testing.assert_close(kd, kd_ref.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce, ce_ref.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, loss_ref.float(), rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, grads_ref):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_ce", [False, True], ids=["kd", "kd+ce"])
@pytest.mark.parametrize("top_k", [None, 5], ids=["full", "top5"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind, beta", KINDS)
@pytest.mark.parametrize("name, s_tr, t_tr", TRANSFORMS, ids=[t[0] for t in TRANSFORMS])
def test_transformed_loss_and_gradients_equal_naive(name, s_tr, t_tr, kind, beta, temperature, top_k, with_ce):
    """37 tokens in chunks of 8: the last chunk is partial."""
    _check_against_naive(s_tr, t_tr, kind, beta, temperature, top_k, with_ce, chunk_tokens=8)


@pytest.mark.parametrize("chunk_tokens", [1, 5, 36, 37, 64])
@pytest.mark.parametrize("kind, beta", KINDS)
def test_transformed_any_chunk_size_equals_naive(kind, beta, chunk_tokens):
    _check_against_naive(LogitTransform(softcap=7.0), SOFTCAP, kind, beta, 1.5, None, True, chunk_tokens)
    _check_against_naive(GRANITE, LogitTransform(softcap=3.0), kind, beta, 1.0, 5, True, chunk_tokens)


@pytest.mark.parametrize("s_tr", [SOFTCAP, GRANITE, LogitTransform(scale=0.5, softcap=4.0)], ids=["softcap", "scale",
                                                                                                    "both"])
def test_cross_entropy_only_goes_through_student_transform(s_tr):
    """No teacher (plain fine-tuning): the cross-entropy alone, on the transformed student logits, in fp64."""
    h_s, w_s, _, _, labels = _inputs()
    loss, kd, ce = chunked_logit_loss(h_s, w_s, None, None, labels, chunk_tokens=6, student_transform=s_tr,
                                      teacher_transform=SOFTCAP)  # ignored: there is no teacher
    grads = torch.autograd.grad(loss, (h_s, w_s))
    ce_ref = F.cross_entropy(s_tr(h_s @ w_s.t()), labels, reduction="sum") / h_s.shape[0]
    grads_ref = torch.autograd.grad(ce_ref, (h_s, w_s))
    assert kd == 0
    torch.testing.assert_close(ce, ce_ref.float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss, ce_ref.float(), rtol=1e-6, atol=1e-7)
    for a, b in zip(grads, grads_ref):  # fp64 on both sides; only the fp32 incoming gradient (1/n) rounds
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("with_ce", [False, True], ids=["kd", "kd+ce"])
@pytest.mark.parametrize("top_k", [None, 5], ids=["full", "top5"])
@pytest.mark.parametrize("kind, beta", KINDS)
def test_identity_transform_is_bit_identical_to_none(kind, beta, top_k, with_ce):
    h_s, w_s, h_t, w_t, labels = _inputs(dtype=torch.float32)
    labels = labels if with_ce else None
    out = []
    for tr in (None, LogitTransform(), LogitTransform(scale=1.0, softcap=None)):
        loss, kd, ce = chunked_logit_loss(h_s, w_s, h_t, w_t, labels, kind=kind, beta=beta, top_k=top_k,
                                          temperature=1.5, chunk_tokens=8, kd_weight=0.7, ce_weight=0.3,
                                          student_transform=tr, teacher_transform=tr)
        out.append((loss.detach(), kd, ce, *torch.autograd.grad(loss, (h_s, w_s))))
    for other in out[1:]:
        for a, b in zip(out[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("with_ce", [False, True], ids=["kd", "kd+ce"])
def test_identity_transform_adds_no_op_to_the_graph(with_ce):
    """Even handed straight to the chunk function (no normalisation to None), the identity traces no extra node."""
    h_s, w_s, h_t, w_t, labels = _inputs(n=9, dtype=torch.float32)
    t_logits = h_t @ w_t.t()
    nodes = []
    for tr in (None, LogitTransform()):
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(_chunk_loss_and_grad)(
            h_s.detach(), w_s.detach(), t_logits, labels if with_ce else None, "jsd", 2.0, 0.3, 5, 0.7, 0.3, True,
            tr, tr)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        nodes.append([n.target for g in explanation.graphs for n in g.graph.nodes])
    assert nodes[0] == nodes[1]
    # ... while a soft-cap does add ops, and still no graph break
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_chunk_loss_and_grad)(
        h_s.detach(), w_s.detach(), t_logits, labels if with_ce else None, "jsd", 2.0, 0.3, 5, 0.7, 0.3, True,
        SOFTCAP, SOFTCAP)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    assert len([n for g in explanation.graphs for n in g.graph.nodes]) > len(nodes[0])


@pytest.mark.parametrize("kind, beta", KINDS)
def test_teacher_softcap_changes_the_loss(kind, beta):
    """The bug this fixes: a Gemma teacher's logits soft-capped by the model but not by the loss. Without the
    transform, the student is pulled towards the uncapped (much sharper) distribution: loss and gradient differ."""
    h_s, w_s, h_t, w_t, labels = _inputs()
    runs = {}
    for t_tr in (None, SOFTCAP):
        loss, kd, ce = chunked_logit_loss(h_s, w_s, h_t, w_t, labels, kind=kind, beta=beta, chunk_tokens=8,
                                          kd_weight=0.7, ce_weight=0.3, teacher_transform=t_tr)
        kd_loss, _, _ = chunked_logit_loss(h_s, w_s, h_t, w_t, None, kind=kind, beta=beta, chunk_tokens=8,
                                           teacher_transform=t_tr)
        runs[t_tr] = (kd, ce, torch.autograd.grad(kd_loss, h_s)[0])
    (kd_raw, ce_raw, g_raw), (kd_cap, ce_cap, g_cap) = runs[None], runs[SOFTCAP]
    assert torch.equal(ce_raw, ce_cap)  # the teacher's transform leaves the student's cross-entropy alone
    assert (kd_raw - kd_cap).abs() > 0.05 * kd_cap.abs()
    assert (g_raw - g_cap).norm() > 0.05 * g_cap.norm()  # the divergence's gradient (no cross-entropy in it)
    # and it is the capped one that is right
    kd_ref, _ = _naive(h_s, w_s, h_t, w_t, None, kind, 1.0, beta, None, None, SOFTCAP)
    torch.testing.assert_close(kd_cap, kd_ref.float(), rtol=1e-5, atol=1e-6)


def test_student_softcap_changes_loss_and_gradient():
    h_s, w_s, h_t, w_t, labels = _inputs()
    runs = [chunked_logit_loss(h_s, w_s, h_t, w_t, labels, chunk_tokens=8, student_transform=s_tr)
            for s_tr in (None, SOFTCAP)]
    (l0, kd0, ce0), (l1, kd1, ce1) = runs
    assert (kd0 - kd1).abs() > 0.05 * kd1.abs() and (ce0 - ce1).abs() > 0.05 * ce1.abs()
    g0, g1 = torch.autograd.grad(l0, w_s)[0], torch.autograd.grad(l1, w_s)[0]
    assert (g0 - g1).norm() > 0.05 * g1.norm()


def test_logit_transform_api():
    tr = LogitTransform(scale=0.5, softcap=4.0)
    x = torch.tensor([-100.0, -3.0, 0.0, 3.0, 100.0], dtype=torch.float64)
    torch.testing.assert_close(tr.apply(x), 4.0 * torch.tanh(0.5 * x / 4.0))  # scale first, then the cap
    torch.testing.assert_close(tr(x), tr.apply(x))
    assert tr.apply(x).abs().max() < 4.0
    torch.testing.assert_close(GRANITE(x), x / 8)
    identity = LogitTransform()
    assert identity.is_identity and LogitTransform(scale=1, softcap=None).is_identity
    assert not tr.is_identity and not GRANITE.is_identity and not SOFTCAP.is_identity
    assert identity.apply(x) is x
    assert tr.to_dict() == {"scale": 0.5, "softcap": 4.0}
    assert identity.to_dict() == {"scale": 1.0, "softcap": None}
    assert LogitTransform(**tr.to_dict()) == tr
    assert hash(tr) == hash(LogitTransform(0.5, 4.0))
    with pytest.raises(Exception):  # frozen
        tr.scale = 2.0
    for bad in (dict(scale=0.0), dict(scale=float("inf")), dict(softcap=0.0), dict(softcap=-5.0),
                dict(softcap=float("nan"))):
        with pytest.raises(ValueError):
            LogitTransform(**bad)
    with pytest.raises(TypeError):
        chunked_logit_loss(*_inputs()[:4], student_transform={"softcap": 5.0})


@pytest.mark.parametrize("kind, top_k, temperature, with_ce, s_tr, t_tr", [
    ("jsd", 5, 2.0, True, SOFTCAP, SOFTCAP),
    ("forward_kl", None, 1.0, True, SOFTCAP, LogitTransform(softcap=30.0)),
    ("reverse_kl", None, 1.0, False, GRANITE, SOFTCAP),
], ids=["jsd-softcap", "fkl-softcap", "rkl-scale-softcap"])
def test_compiled_equals_eager_with_transforms(inductor, kind, top_k, temperature, with_ce, s_tr, t_tr):
    h_s, w_s, h_t, w_t, y = _inputs(n=11, dtype=torch.float32)
    labels = y if with_ce else None
    torch._dynamo.reset()  # a fresh recompile budget, whatever ran before in this process
    torch._dynamo.utils.counters.clear()
    out = {}
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # never a silent fall-back to eager
        for compiled in (False, True):
            for n in (11, 10):  # chunks of 4, 4, 3, then 4, 4, 2: the partial last chunk changes shape
                loss, kd, ce = chunked_logit_loss(h_s[:n], w_s, h_t[:n], w_t, None if labels is None else labels[:n],
                                                  kind=kind, temperature=temperature, beta=0.3, top_k=top_k,
                                                  chunk_tokens=4, kd_weight=0.7, ce_weight=0.3, compiled=compiled,
                                                  student_transform=s_tr, teacher_transform=t_tr)
                out[compiled, n] = (loss.detach(), kd, ce, *torch.autograd.grad(loss, (h_s, w_s)))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the compiled path really compiled
    for n in (11, 10):
        for a, b in zip(out[True, n], out[False, n]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert _compiled_chunk_fn() is _compiled_chunk_fn()
