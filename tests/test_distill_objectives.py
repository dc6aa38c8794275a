"""Issue 12's objectives and schedule: skew KLs, on-policy (GKD-style) batches, a warm-up that scales with the run.
Each is checked against a naive implementation written here, not against the library's own functions."""

import math

import pytest
import torch
import torch.nn.functional as F

from compress.distillation import DistillConfig, distill
from compress.distillation import trainer as trainer_module
from compress.distillation.data import WindowLoader
from compress.distillation.losses import chunked_logit_loss, divergence
from compress.errors import ConfigError

from distill_job import make_pair


def _naive_skew(s_logits, t_logits, kind, alpha, top_k=None):
    """Sum over tokens, float64, straight from the definitions (DistiLLM)."""
    s_logp = F.log_softmax(s_logits.double(), -1)
    t_logp = F.log_softmax(t_logits.double(), -1)
    if top_k is not None:
        t_top, idx = t_logits.double().topk(top_k, -1)
        t_logp = F.log_softmax(t_top, -1)
        s_logp = s_logp.gather(-1, idx)
    p, q = t_logp.exp(), s_logp.exp()
    if kind == "skew_forward_kl":  # KL(p || a p + (1 - a) q)
        return (p * (t_logp - torch.log(alpha * p + (1 - alpha) * q))).sum()
    return (q * (s_logp - torch.log(alpha * q + (1 - alpha) * p))).sum()  # KL(q || a q + (1 - a) p)


@pytest.mark.parametrize("kind", ["skew_forward_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("top_k", [None, 7])
@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_skew_kl_value_and_gradient_match_naive_autograd(kind, top_k, alpha):
    g = torch.Generator().manual_seed(0)
    n, d_s, d_t, vocab = 37, 12, 16, 50
    h_s = torch.randn(n, d_s, generator=g, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(vocab, d_s, generator=g, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(n, d_t, generator=g, dtype=torch.float64)
    w_t = torch.randn(vocab, d_t, generator=g, dtype=torch.float64)

    loss, kd, _ = chunked_logit_loss(h_s, w_s, h_t, w_t, kind=kind, top_k=top_k, chunk_tokens=10, skew=alpha)
    loss.backward()
    got = (h_s.grad.clone(), w_s.grad.clone())

    h_s2, w_s2 = h_s.detach().clone().requires_grad_(), w_s.detach().clone().requires_grad_()
    ref = _naive_skew(h_s2 @ w_s2.T, h_t @ w_t.T, kind, alpha, top_k) / n
    ref.backward()
    # The loss totals come back in fp32 (the gradients in the inputs' dtype).
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    assert float(kd) == pytest.approx(float(ref.detach()), rel=1e-6)
    torch.testing.assert_close(got[0], h_s2.grad, rtol=1e-6, atol=1e-9)  # scaled by the fp32 upstream gradient
    torch.testing.assert_close(got[1], w_s2.grad, rtol=1e-6, atol=1e-9)  # scaled by the fp32 upstream gradient


def test_skew_zero_is_the_plain_kl_and_the_unfused_divergence_agrees():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(9, 30, generator=g, dtype=torch.float64), torch.randn(9, 30, generator=g, dtype=torch.float64)
    fwd = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum()
    rev = (F.softmax(s, -1) * (F.log_softmax(s, -1) - F.log_softmax(t, -1))).sum()
    assert float(divergence(s, t, "skew_forward_kl", skew=0.0)) == pytest.approx(float(fwd), rel=1e-6)  # divergence() computes in fp32
    assert float(divergence(s, t, "skew_reverse_kl", skew=0.0)) == pytest.approx(float(rev), rel=1e-6)  # divergence() computes in fp32
    for kind in ("skew_forward_kl", "skew_reverse_kl"):
        assert float(divergence(s, t, kind, skew=0.3)) == pytest.approx(float(_naive_skew(s, t, kind, 0.3)),
                                                                        rel=1e-6)  # divergence() computes in fp32


def test_config_refuses_bad_new_fields():
    for bad in (dict(skew_alpha=1.0), dict(skew_alpha=-0.1), dict(on_policy_fraction=1.5),
                dict(on_policy_prompt_tokens=32, seq_len=32), dict(on_policy_temperature=0.0),
                dict(warmup_ratio=1.0), dict(teacher_cache="x", hidden_loss="cosine"),
                dict(teacher_cache="x", on_policy_fraction=0.5), dict(teacher_cache="x", logit_loss="jsd"),
                dict(on_policy_fraction=0.5, logit_weight=0.0, alpha_ce=1.0)):
        with pytest.raises(ConfigError):
            DistillConfig(max_steps=1, **bad)
    with pytest.raises(ConfigError, match="did you mean 'on_policy_fraction'"):
        DistillConfig(max_steps=1, lmbda=0.5)


def test_warmup_scales_with_the_run_and_a_too_long_one_is_cut_with_a_warning():
    teacher, student, data = make_pair()
    # 8 steps with the old fixed 10-step warm-up never reached the peak; now 10% of the run warms up.
    cfg = DistillConfig(max_steps=8, batch_size=2, seq_len=32, lr=1e-3, progress=False, log_every=1)
    report = distill(student, teacher, data, cfg)
    assert report.schedule["warmup_steps"] == round(0.1 * 8) and "adjusted" not in report.schedule
    lrs = [r["lr"] for r in report.losses]
    # Hand-computed: warm-up of 1 step, then cosine from lr to 0.1 lr over the remaining 7.
    expected = [1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (k - 1) / 7))) for k in range(1, 9)]
    assert lrs == pytest.approx(expected, rel=1e-9)

    teacher, student, data = make_pair()
    cfg = DistillConfig(max_steps=8, batch_size=2, seq_len=32, lr=1e-3, warmup_steps=10, progress=False, log_every=1)
    with pytest.warns(UserWarning, match="warmup_steps=10 is not shorter than the run"):
        report = distill(student, teacher, data, cfg)
    assert report.schedule["warmup_steps"] == 1 and "warmup_steps=10" in report.schedule["adjusted"]
    assert max(r["lr"] for r in report.losses) == pytest.approx(1e-3)


def test_loader_says_which_windows_it_served():
    windows = torch.arange(20 * 4).reshape(20, 4)
    loader = WindowLoader(windows, batch_size=3, seed=5)
    for _ in range(9):  # crosses an epoch boundary
        batch = loader.next_batch()
        assert torch.equal(batch, windows[loader.last_indices])


def test_sampling_with_the_cache_equals_sampling_without_it():
    teacher, _, _ = make_pair()
    prompts = torch.randint(4, 320, (3, 5), generator=torch.Generator().manual_seed(3))
    got = trainer_module.sample_continuations(teacher, prompts, 6, 0.8, torch.Generator().manual_seed(11))
    # Naive: the whole sequence through the model at every step, same generator.
    gen, seq = torch.Generator().manual_seed(11), prompts
    with torch.no_grad():
        for _ in range(6):
            probs = torch.softmax(teacher(seq).logits[:, -1].float() / 0.8, -1)
            seq = torch.cat([seq, torch.multinomial(probs, 1, generator=gen)], 1)
    assert torch.equal(got, seq) and not teacher.training


def test_on_policy_loss_is_the_divergence_on_the_sampled_tokens_only(monkeypatch):
    teacher, student, data = make_pair()
    seen = []
    real = trainer_module.sample_continuations

    def record(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out.clone())
        return out

    monkeypatch.setattr(trainer_module, "sample_continuations", record)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = DistillConfig(max_steps=1, batch_size=4, seq_len=32, lr=1e-3, on_policy_fraction=1.0,
                        on_policy_prompt_tokens=12, logit_loss="jsd", jsd_beta=0.3, progress=False, log_every=1)
    report = distill(student, teacher, data, cfg)
    assert len(seen) == 1 and seen[0].shape == (4, 32)
    assert report.objective["on_policy"]["batches"] == 1
    assert report.objective["on_policy"]["sampled_tokens"] == 4 * 20

    # Naive GKD loss on the recorded batch, with the student as it was before the step.
    before = make_pair()[1]
    before.load_state_dict(start)
    ids = seen[0]
    with torch.no_grad():
        s = F.log_softmax(before(ids).logits[:, 11:-1].double(), -1)
        t = F.log_softmax(teacher(ids).logits[:, 11:-1].double(), -1)
    m = torch.log(0.3 * t.exp() + 0.7 * s.exp())
    jsd = 0.3 * (t.exp() * (t - m)).sum(-1) + 0.7 * (s.exp() * (s - m)).sum(-1)
    assert report.losses[0]["kd"] == pytest.approx(float(jsd.mean()), rel=1e-4)
    for row in ids:  # the prompt is the start of a data window; the rest was sampled
        assert any(torch.equal(row[:12], window[:12]) for window in data)


def test_on_policy_fraction_mixes_batches_and_repeats_exactly():
    runs = []
    for _ in range(2):
        teacher, student, data = make_pair()
        cfg = DistillConfig(max_steps=12, batch_size=2, seq_len=32, lr=1e-3, on_policy_fraction=0.5,
                            progress=False, log_every=1)
        report = distill(student, teacher, data, cfg)
        runs.append((report.objective["on_policy"]["batches"], [r["loss"] for r in report.losses]))
    assert 0 < runs[0][0] < 12
    assert runs[0] == runs[1]


def test_distilling_from_a_full_teacher_cache_matches_online_distillation(tmp_path):
    from compress.distillation.teacher_cache import build_teacher_cache

    teacher, student, data = make_pair()
    online_student = make_pair()[1]
    vocab = teacher.config.vocab_size
    # A cache holding every logit (top_k = vocabulary) loses nothing: training from it must follow online KD.
    build_teacher_cache(teacher, data, tmp_path / "cache", top_k=vocab, progress=False)
    common = dict(max_steps=3, batch_size=4, seq_len=32, lr=1e-3, progress=False, log_every=1)
    cached = distill(student, teacher, data, DistillConfig(teacher_cache=str(tmp_path / "cache"), **common))
    online = distill(online_student, teacher, data, DistillConfig(**common))
    assert [r["kd"] for r in cached.losses] == pytest.approx([r["kd"] for r in online.losses], rel=1e-3)
    assert cached.objective["teacher_cache"]["top_k"] == vocab
    # The same updates up to the cache's fp16 rounding. Adam moves even weights whose gradient is only rounding
    # noise by about lr, so compare the whole update direction rather than single weights.
    start = torch.cat([p.detach().flatten() for p in make_pair()[1].parameters()])
    via_cache = torch.cat([p.detach().flatten() for p in student.parameters()]) - start
    via_teacher = torch.cat([p.detach().flatten() for p in online_student.parameters()]) - start
    assert float(F.cosine_similarity(via_cache, via_teacher, dim=0)) > 0.98


def test_a_cache_of_other_windows_is_refused_before_training(tmp_path):
    from compress.distillation.teacher_cache import build_teacher_cache
    from compress.errors import DataError

    teacher, student, data = make_pair()
    build_teacher_cache(teacher, data[:8], tmp_path / "cache", top_k=16, progress=False)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(DataError, match="(?i)rebuild"):
        distill(student, teacher, data, DistillConfig(max_steps=2, batch_size=4, seq_len=32, progress=False,
                                                      teacher_cache=str(tmp_path / "cache")))
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_default_batch_shape_follows_the_budget():
    small, large = DistillConfig(max_tokens=32768), DistillConfig(max_tokens=32 * 8 * 512)
    assert (small.batch_size, small.seq_len, small.total_steps) == (4, 256, 32)
    assert (large.batch_size, large.seq_len, large.total_steps) == (8, 512, 32)
    assert (DistillConfig(max_steps=3).batch_size, DistillConfig(max_steps=3).seq_len) == (8, 512)
    chosen = DistillConfig(max_tokens=32768, batch_size=2, seq_len=64)
    assert (chosen.batch_size, chosen.seq_len) == (2, 64)
    assert DistillConfig(max_steps=1).lr == 5e-4


def test_a_cache_built_over_distillation_windows_serves_text_data(tmp_path, tokenizer):
    import compress
    from conftest import SAMPLE_TEXT, tiny_model

    teacher = tiny_model("llama")
    student = tiny_model("llama", seed=1)
    text = [SAMPLE_TEXT * 2]
    cfg = DistillConfig(max_steps=2, batch_size=2, seq_len=32, progress=False, log_every=1,
                        teacher_cache=str(tmp_path / "cache"))
    windows = compress.distillation_windows(text, tokenizer, cfg, skip_tokens=64)
    assert torch.equal(windows, compress.data.pack_tokens(tokenizer, text, 32, max_windows=4, skip_tokens=64))
    compress.build_teacher_cache(teacher, windows, tmp_path / "cache", top_k=8, progress=False)
    report = distill(student, teacher, text, cfg, tokenizer=tokenizer, skip_tokens=64)
    assert report.objective["teacher_cache"]["windows"] == 4


def test_on_policy_under_fsdp_is_refused_before_any_work(monkeypatch):
    teacher, student, data = make_pair()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    # As under torchrun with two processes: the engine is chosen, then on-policy is refused (FSDP keeps the
    # student sharded, so it cannot sample from it).
    monkeypatch.setattr(trainer_module.distributed, "init", lambda: (0, 2))
    cfg = DistillConfig(max_steps=2, batch_size=2, seq_len=32, on_policy_fraction=0.5, parallel="fsdp",
                        progress=False)
    with pytest.raises(ConfigError, match="FSDP"):
        distill(student, teacher, data, cfg)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
