"""Offline teacher cache: the bucketed losses equal naive full-vocabulary references in value and gradient, a built
cache reads back the teacher's own top-k, and the folder is written safely and checked against its inputs."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from compress.distillation import teacher_cache as tc
from compress.distillation.losses import LogitTransform, divergence
from compress.distillation.teacher_cache import TeacherCache, build_teacher_cache, cached_logit_loss
from compress.errors import DataError, OutputExistsError

from conftest import tiny_model


# ------------------------------------------------------------------------------------------ the loss


def _teacher_top_k(n, v, k, g, dtype=torch.float64):
    """A random teacher's top-k log-probs, ids and stable rest log-mass (-inf when k == v)."""
    t = 2.0 * torch.randn(n, v, generator=g, dtype=dtype)
    logp = F.log_softmax(t, dim=-1)
    top, idx = logp.topk(k, dim=-1)
    rest = torch.logsumexp(logp.scatter(-1, idx, float("-inf")), dim=-1)
    return t, top, idx, rest


def _naive_bucket_loss(h, w, t_logp, t_idx, t_rest, kind, transform=None):
    """The (k+1)-bucket divergence from full-vocabulary probabilities, by plain autograd."""
    z = h @ w.t()
    if transform is not None:
        z = transform.apply(z)
    q = torch.softmax(z, dim=-1)
    outside = torch.ones_like(q).scatter(-1, t_idx, 0.0)
    q_b = torch.cat([q.gather(-1, t_idx), (q * outside).sum(-1, keepdim=True)], dim=-1)
    p_b = torch.cat([t_logp.exp(), t_rest.exp().unsqueeze(-1)], dim=-1)
    if kind == "forward_kl":
        per = torch.xlogy(p_b, p_b) - torch.xlogy(p_b, q_b)
    else:
        per = torch.xlogy(q_b, q_b) - torch.xlogy(q_b, p_b)
    return per.sum() / h.shape[0]


@pytest.mark.parametrize("transform", [None, LogitTransform(scale=0.5, softcap=3.0)], ids=["plain", "softcap"])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
def test_cached_loss_equals_naive(kind, transform):
    g = torch.Generator().manual_seed(0)
    n, d, v, k = 23, 6, 40, 5
    h = (1.5 * torch.randn(n, d, generator=g, dtype=torch.float64)).requires_grad_()
    w = torch.randn(v, d, generator=g, dtype=torch.float64).requires_grad_()
    _, t_logp, t_idx, t_rest = _teacher_top_k(n, v, k, g)
    loss, kd = cached_logit_loss(h, w, t_logp, t_idx, t_rest, kind=kind, chunk_tokens=7,
                                 student_transform=transform, weight=0.7)
    grads = torch.autograd.grad(3 * loss, (h, w))
    ref = _naive_bucket_loss(h, w, t_logp, t_idx, t_rest, kind, transform)
    grads_ref = torch.autograd.grad(3 * 0.7 * ref, (h, w))
    torch.testing.assert_close(kd, ref.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss, 0.7 * ref, rtol=1e-12, atol=1e-14)
    assert not kd.requires_grad
    for a, b in zip(grads, grads_ref):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_cached_loss_float32_chunking_and_no_grad_inputs():
    """float32 inputs: the same value for any chunk size; gradients only for what requires them."""
    g = torch.Generator().manual_seed(1)
    n, d, v, k = 19, 8, 64, 6
    h = torch.randn(n, d, generator=g).requires_grad_()
    w = torch.randn(v, d, generator=g)
    _, t_logp, t_idx, t_rest = _teacher_top_k(n, v, k, g, torch.float32)
    t_logp16 = t_logp.half()  # the cache's storage dtype is accepted as is
    values = [cached_logit_loss(h, w, t_logp16, t_idx, t_rest, chunk_tokens=c)[0] for c in (1, 4, 19, 100)]
    for val in values[1:]:
        torch.testing.assert_close(val, values[0], rtol=1e-5, atol=1e-6)
    (gh,) = torch.autograd.grad(values[0], (h,))
    assert gh.dtype == torch.float32 and torch.isfinite(gh).all()


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
def test_top_k_equal_to_vocab_is_the_full_kl(kind):
    """k = V: no mass outside (rest = -inf on both sides), no NaN, and the loss is the ordinary full KL."""
    g = torch.Generator().manual_seed(2)
    n, d, v = 13, 5, 17
    h = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(v, d, generator=g, dtype=torch.float64).requires_grad_()
    t, t_logp, t_idx, t_rest = _teacher_top_k(n, v, v, g)
    assert torch.isneginf(t_rest).all()
    loss, kd = cached_logit_loss(h, w, t_logp, t_idx, t_rest, kind=kind, chunk_tokens=4)
    grads = torch.autograd.grad(loss, (h, w))
    ref = divergence(h @ w.t(), t, kind) / n  # computes in float32
    grads_ref = torch.autograd.grad(ref, (h, w))
    assert torch.isfinite(loss) and all(torch.isfinite(x).all() for x in grads)
    torch.testing.assert_close(loss.float(), ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # and, in float64, exactly the full-vocabulary KL
    s_lp, t_lp = F.log_softmax(h @ w.t(), dim=-1), F.log_softmax(t, dim=-1)
    a, b = (t_lp, s_lp) if kind == "forward_kl" else (s_lp, t_lp)
    full = (a.exp() * (a - b)).sum() / n
    torch.testing.assert_close(loss, full, rtol=1e-12, atol=1e-14)
    for x, y in zip(grads, torch.autograd.grad(full, (h, w))):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)


def test_cached_loss_refuses_what_the_cache_cannot_give():
    h, w = torch.randn(4, 3), torch.randn(10, 3)
    logp, idx, rest = torch.randn(4, 2), torch.zeros(4, 2, dtype=torch.long), torch.randn(4)
    with pytest.raises(ValueError, match="jsd"):
        cached_logit_loss(h, w, logp, idx, rest, kind="jsd")
    with pytest.raises(ValueError, match="t_rest"):
        cached_logit_loss(h, w, logp, idx, rest[:3])


# ------------------------------------------------------------------------------------------ building and reading


def _windows(n, length, vocab, seed=0):
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _reference_logp(model, windows):
    with torch.no_grad():
        return F.log_softmax(model(input_ids=windows, use_cache=False).logits[:, :-1].double(), dim=-1)


def _check_against_reference(logp, idx, rest, ref, k):
    ref_top = ref.topk(k, dim=-1).values
    torch.testing.assert_close(logp.double(), ref_top, rtol=2e-3, atol=1e-2)  # float16 storage
    torch.testing.assert_close(ref.gather(-1, idx), logp.double(), rtol=2e-3, atol=1e-2)
    assert (idx == ref.topk(k, dim=-1).indices).double().mean() > 0.99  # near-ties may swap
    torch.testing.assert_close(rest.double(), torch.log1p(-ref_top.exp().sum(-1)), rtol=1e-4, atol=1e-4)


def test_cache_reads_back_the_teachers_top_k(tmp_path):
    """Gemma-2 soft-caps its logits: the cache holds the model's real log-probs, read back in any order."""
    teacher = tiny_model("gemma2").train()
    windows = _windows(10, 12, teacher.config.vocab_size)
    report = build_teacher_cache(teacher, windows, tmp_path / "cache", top_k=8, batch_size=3, shard_windows=4,
                                 progress=False, chunk_tokens=16)
    assert teacher.training and all(m.training for m in teacher.modules())  # mode put back
    assert report.windows == 10 and report.tokens == 10 * 11 and report.shards == 3
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert files == ["manifest.json", "shard-00000.safetensors", "shard-00001.safetensors",
                     "shard-00002.safetensors"]
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["index_dtype"] == "uint16" and manifest["transform"]["softcap"] == 20.0
    with safe_open(str(tmp_path / "cache" / "shard-00001.safetensors"), "pt") as f:
        assert f.get_slice("idx").get_dtype() == "I16" and f.get_slice("logp").get_dtype() == "F16"
        assert f.get_slice("rest").get_shape() == [4, 11]

    ref = _reference_logp(teacher.eval(), windows)
    order = torch.tensor([9, 0, 5, 4, 3, 9, 7])  # across shards, out of order, a repeat
    cache = TeacherCache.open(tmp_path / "cache", windows=windows, teacher=teacher, max_open_shards=2)
    logp, idx, rest = cache.lookup(order, renormalize=False)
    assert logp.shape == (7, 11, 8) and idx.dtype == torch.int64 and rest.shape == (7, 11)
    assert logp.dtype == rest.dtype == torch.float32
    _check_against_reference(logp, idx, rest, ref[order], 8)
    # Renormalized (in float32): the k + 1 buckets sum to one, within a few float32 roundings.
    logp_n, idx_n, rest_n = cache.lookup(order)
    assert torch.equal(idx_n, idx)
    torch.testing.assert_close((logp_n.double().exp().sum(-1) + rest_n.double().exp()),
                               torch.ones(7, 11, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(logp_n, logp, atol=1e-2, rtol=0)


@pytest.mark.parametrize("vocab, logical, stored", [(40000, "uint16", "I16"), (70000, "int32", "I32")])
def test_large_ids_survive_storage(tmp_path, vocab, logical, stored):
    """Ids above 32767 in int16 storage (uint16 bits), and int32 beyond 65536 ids."""
    teacher = tiny_model("llama", vocab_size=vocab, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=8, num_hidden_layers=1)
    windows = _windows(3, 6, vocab, seed=1)
    build_teacher_cache(teacher, windows, tmp_path / "c", top_k=32, batch_size=2, progress=False)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["index_dtype"] == logical
    with safe_open(str(tmp_path / "c" / "shard-00000.safetensors"), "pt") as f:
        assert f.get_slice("idx").get_dtype() == stored
        raw = f.get_tensor("idx")
    if stored == "I16":
        assert (raw < 0).any()  # ids >= 32768 are stored as negative int16
    logp, idx, rest = TeacherCache.open(tmp_path / "c").lookup(torch.tensor([2, 0]), renormalize=False)
    assert (idx > 32767).any()
    _check_against_reference(logp, idx, rest, _reference_logp(teacher, windows)[[2, 0]], 32)


def test_distilling_the_teacher_from_its_own_cache_costs_nothing(tmp_path):
    """End to end: a student equal to the teacher has (almost) zero cached KL, a perturbed one does not."""
    teacher = tiny_model("llama")
    windows = _windows(4, 10, teacher.config.vocab_size)
    build_teacher_cache(teacher, windows, tmp_path / "c", top_k=16, progress=False)
    logp, idx, rest = TeacherCache.open(tmp_path / "c").lookup(torch.tensor([3, 1]))
    with torch.no_grad():
        hidden = teacher.model(input_ids=windows[[3, 1]]).last_hidden_state[:, :-1].reshape(-1, 96)
    head = teacher.lm_head.weight.detach()
    flat = (logp.reshape(-1, 16), idx.reshape(-1, 16), rest.reshape(-1))
    _, kd_same = cached_logit_loss(hidden, head, *flat)
    _, kd_other = cached_logit_loss(hidden, head * 1.5, *flat)
    assert abs(float(kd_same)) < 1e-4 and float(kd_other) > 100 * abs(float(kd_same))


def test_fingerprints_refuse_other_windows_and_other_teachers(tmp_path):
    teacher = tiny_model("llama")
    windows = _windows(4, 8, teacher.config.vocab_size)
    build_teacher_cache(teacher, windows, tmp_path / "c", top_k=4, progress=False)
    TeacherCache.open(tmp_path / "c", windows=windows.int(), teacher=copy.deepcopy(teacher).to(torch.bfloat16))
    other = windows.clone()
    other[2, 5] += 1
    with pytest.raises(DataError, match="other windows"):
        TeacherCache.open(tmp_path / "c", windows=other)
    with pytest.raises(DataError, match="built for 4 windows of 8"):
        TeacherCache.open(tmp_path / "c", windows=windows[:3])
    with pytest.raises(DataError, match="another teacher"):
        TeacherCache.open(tmp_path / "c", teacher=tiny_model("llama", seed=1))
    trained = copy.deepcopy(teacher)
    with torch.no_grad():
        trained.model.layers[1].mlp.down_proj.weight.mul_(1.01)
    with pytest.raises(DataError, match="another teacher"):
        TeacherCache.open(tmp_path / "c", teacher=trained)


def test_existing_folder_is_refused_and_untouched(tmp_path):
    teacher = tiny_model("llama")
    windows = _windows(2, 8, teacher.config.vocab_size)
    out = tmp_path / "c"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for overwrite in (False, True):  # overwrite replaces an earlier cache only, never other files
        with pytest.raises(OutputExistsError):
            build_teacher_cache(teacher, windows, out, top_k=4, progress=False, overwrite=overwrite)
        assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]

    cache = tmp_path / "cache"
    build_teacher_cache(teacher, windows, cache, top_k=4, progress=False)
    with pytest.raises(OutputExistsError):
        build_teacher_cache(teacher, windows, cache, top_k=6, progress=False)
    build_teacher_cache(teacher, windows, cache, top_k=6, progress=False, overwrite=True)
    assert TeacherCache.open(cache, windows=windows, teacher=teacher).top_k == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "cache"]


def test_failure_mid_build_leaves_nothing(tmp_path, monkeypatch):
    teacher = tiny_model("llama").train()
    windows = _windows(6, 8, teacher.config.vocab_size)
    calls = []
    real_save = tc._save_shard

    def failing_save(path, tensors, metadata):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        real_save(path, tensors, metadata)

    monkeypatch.setattr(tc, "_save_shard", failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        build_teacher_cache(teacher, windows, tmp_path / "sub" / "cache", top_k=4, batch_size=2, shard_windows=2,
                            progress=False)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # no cache, no temporary folder, no parent folder it made
    assert teacher.training


def test_bytes_per_token_is_file_size_over_tokens(tmp_path):
    teacher = tiny_model("llama")
    windows = _windows(5, 9, teacher.config.vocab_size)
    report = build_teacher_cache(teacher, windows, tmp_path / "c", top_k=16, shard_windows=2, progress=False)
    files = list((tmp_path / "c").iterdir())
    on_disk = sum(p.stat().st_size for p in files)
    assert report.bytes == on_disk and report.tokens == 5 * 8
    assert report.bytes_per_token == pytest.approx(on_disk / report.tokens, abs=1e-3)
    assert report.payload_bytes_per_token == 16 * (2 + 2) + 4
    manifest_size = (tmp_path / "c" / "manifest.json").stat().st_size
    headers = 3 * 400  # a safetensors header per shard: a few hundred bytes of JSON
    assert report.payload_bytes_per_token * report.tokens <= on_disk - manifest_size
    assert on_disk <= report.payload_bytes_per_token * report.tokens + manifest_size + headers
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["bytes_per_token"] == pytest.approx((on_disk - manifest_size) / report.tokens, abs=1e-3)
    assert report.tokens_per_second > 0 and report.seconds >= 0


def test_rest_mass_is_stable_when_the_top_k_hold_almost_everything():
    """log(1 - sum p) from float32 sums would be -inf or noise here; the cache's logsumexp form is exact."""
    v, k = 50, 4
    logits = torch.zeros(3, v)
    logits[:, :k] = torch.tensor([[40.0, 39.0, 38.0, 37.0], [30.0, 10.0, 5.0, 1.0], [3.0, 2.0, 1.0, 0.5]])
    logp, idx, rest = tc._top_k_chunk(logits, torch.eye(v), k, None)  # hidden @ eye = the logits themselves
    exact = torch.logsumexp(logits.double()[:, k:], -1) - torch.logsumexp(logits.double(), -1)
    assert sorted(idx[0].tolist()) == [0, 1, 2, 3] and exact[0] < -35
    torch.testing.assert_close(rest.double(), exact, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(logp.double(), F.log_softmax(logits.double(), -1)[:, :k], rtol=1e-6, atol=1e-5)


def test_open_and_lookup_refuse_bad_input(tmp_path):
    from compress.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no manifest.json"):
        TeacherCache.open(tmp_path)
    teacher = tiny_model("llama")
    build_teacher_cache(teacher, _windows(3, 6, teacher.config.vocab_size), tmp_path / "c", top_k=4,
                        progress=False)
    cache = TeacherCache.open(tmp_path / "c")
    with pytest.raises(DataError, match=r"0\.\.2"):
        cache.lookup(torch.tensor([0, 3]))
    (tmp_path / "c" / "shard-00000.safetensors").write_bytes(b"cut short")
    with pytest.raises(CheckpointError, match="incomplete"):
        TeacherCache.open(tmp_path / "c")
