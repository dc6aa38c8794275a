"""Least-squares reconstruction after pruning (compress.pruning.reconstruct, plugin "least_squares"), checked against a
naive reference written here: activations collected with this file's own hooks on whole-model forwards, one module
at a time, and the ridge solved by torch.linalg.lstsq on the explicitly stacked activations."""

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import compress
from compress import registry
from compress.errors import ConfigError, DataError, PluginError, UnsupportedModelError
from compress.plugin_api import ReconstructPlugin
from compress.pruning.reconstruct import reconstruct

from conftest import VOCAB, tiny_model

PATHS = {"attention": "self_attn.o_proj", "mlp": "mlp.down_proj"}  # Llama's names, written out independently
CALIB = compress.CalibrationConfig(min_samples=4)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two threads ran these tests
    ~25x slower (158 s against 6.7 s) than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ids(n, seq=32, seed=0):
    return torch.randint(4, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def _pruned(target, strategy="width", seed=0, n=32, **overrides):
    teacher = tiny_model("llama", seed=seed, **overrides)
    student = copy.deepcopy(teacher)
    importance, plugins = None, None
    if "depth" in strategy:  # keep layers 1 and 3 (and 2): a student layer maps to another teacher layer
        importance = compress.score_importance(teacher, _ids(n), calibration_config=CALIB)
        importance.layers = torch.tensor([0.0, 1.0, 0.5, 2.0])
        plugins = {"depth": {"method": "block_influence"}}
    report = compress.prune(student, target, _ids(n), strategy=strategy, calibration_config=CALIB,
                            plugins=plugins, importance=importance)
    return teacher, student, report


def _collect(student, s_mod, teacher, t_mod, ids, hidden):
    """The student's input to s_mod and the teacher's output of t_mod (kept channels), float64, from whole forwards."""
    got = {}
    h1 = s_mod.register_forward_pre_hook(lambda m, a: got.__setitem__("a", a[0].detach()))
    h2 = t_mod.register_forward_hook(lambda m, a, o: got.__setitem__("y", o.detach()))
    try:
        with torch.no_grad():
            student(input_ids=ids, use_cache=False)
            teacher(input_ids=ids, use_cache=False)
    finally:
        h1.remove()
        h2.remove()
    a = got["a"].reshape(-1, got["a"].shape[-1]).double()
    y = got["y"][..., hidden].reshape(-1, len(hidden)).double()
    return a, y


def _naive_ridge(a, y, lam, intercept):
    """argmin ‖A Wᵀ + b − Y‖² + λ·s·‖W‖², s = mean diag of the (centered) Gram, by lstsq on [A; √(λs) I]."""
    a_mean, y_mean = a.mean(0), y.mean(0)
    ac, yc = (a - a_mean, y - y_mean) if intercept else (a, y)
    s = (ac * ac).sum(0).mean()
    n_in = a.shape[1]
    big_a = torch.cat([ac, (lam * s).sqrt() * torch.eye(n_in, dtype=a.dtype)])
    big_y = torch.cat([yc, torch.zeros(n_in, y.shape[1], dtype=y.dtype)])
    wt = torch.linalg.lstsq(big_a, big_y).solution
    b = y_mean - a_mean @ wt if intercept else torch.zeros(y.shape[1], dtype=y.dtype)
    return wt.T, b


def _naive_reconstruct(student, teacher, ids_fit, ids_held, layers, hidden, lam):
    """Sequential ridge refit, attention then MLP per layer, backing off when held-out error is not lower."""
    ref = copy.deepcopy(student)
    decisions = []
    for i, t in enumerate(layers):
        for kind in ("attention", "mlp"):
            s_mod = ref.model.layers[i].get_submodule(PATHS[kind])
            t_mod = teacher.model.layers[t].get_submodule(PATHS[kind])
            a, y = _collect(ref, s_mod, teacher, t_mod, ids_fit, hidden)
            a_h, y_h = _collect(ref, s_mod, teacher, t_mod, ids_held, hidden)
            intercept = s_mod.bias is not None
            w, b = _naive_ridge(a, y, lam, intercept)
            w0 = s_mod.weight.detach().double()
            b0 = s_mod.bias.detach().double() if intercept else torch.zeros(w0.shape[0], dtype=torch.float64)
            new = ((a_h @ w.T + b - y_h) ** 2).sum()
            old = ((a_h @ w0.T + b0 - y_h) ** 2).sum()
            decisions.append(bool(new >= old))
            if new < old:
                s_mod.weight = torch.nn.Parameter(w.float())
                if intercept:
                    s_mod.bias = torch.nn.Parameter(b.float())
    return ref, decisions


def _kl(teacher, student, ids):
    with torch.no_grad():
        lt = teacher(input_ids=ids).logits.float().log_softmax(-1)
        ls = student(input_ids=ids).logits.float().log_softmax(-1)
    return F.kl_div(ls, lt, log_target=True, reduction="batchmean").item()


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(model, state):
    return all(torch.equal(p, state[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("case", ["width", "bias", "depth", "width+depth"])
def test_matches_naive_ridge(case, tmp_path):
    extra = dict(mlp_bias=True, attention_bias=True) if case == "bias" else {}
    if case == "depth":
        target, strategy = {"num_hidden_layers": 2}, "depth"
    elif case == "width+depth":
        target, strategy = {"hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 3}, "width+depth"
    else:
        target, strategy = {"params": 0.5}, "width"
    teacher, student, report = _pruned(target, strategy, **extra)
    ids = _ids(32, seed=1)
    lam = 1e-2
    result = reconstruct(student_run := copy.deepcopy(student), teacher, ids, kept=report.kept,
                         config={"lambdas": [lam]})

    layers = report.kept.get("layers", list(range(4)))
    hidden = report.kept.get("hidden", list(range(96)))
    assert result.layer_map == dict(enumerate(layers))
    if "depth" in case:
        assert layers != list(range(len(layers)))  # the mapping is not the identity
    assert [(m["layer"], m["teacher_layer"], m["module"]) for m in result.modules] == \
        [(i, t, k) for i, t in enumerate(layers) for k in ("attention", "mlp")]
    ref, backed = _naive_reconstruct(student, teacher, ids[:24], ids[24:], layers, hidden, lam)
    assert [m["backed_off"] for m in result.modules] == backed
    assert backed.count(False) >= len(backed) // 2  # the comparison is about refit weights, mostly
    for (name, p), (ref_name, r) in zip(student_run.named_parameters(), ref.named_parameters()):
        assert name == ref_name
        scale = r.abs().max().item()
        assert torch.allclose(p, r, atol=2e-4 * scale, rtol=0), (name, (p - r).abs().max().item(), scale)
    if case == "bias":
        # the intercept was fitted and written (it moved away from the pruned bias), to the centered solution
        mods = [m for m in result.modules if not m["backed_off"]]
        assert mods and all(m["bias"] for m in mods)
        layer = mods[0]["layer"]
        path = PATHS[mods[0]["module"]]
        assert not torch.allclose(student_run.model.layers[layer].get_submodule(path).bias,
                                  student.model.layers[layer].get_submodule(path).bias)
    else:
        assert all(m.bias is None for layer in student_run.model.layers for m in
                   (layer.self_attn.o_proj, layer.mlp.down_proj))
    if case in ("width", "bias"):  # still a stock model: reloads with plain from_pretrained, same logits
        student_run.save_pretrained(tmp_path)
        again = type(student_run).from_pretrained(tmp_path, attn_implementation="eager").eval()
        with torch.no_grad():
            assert torch.allclose(again(input_ids=ids[:2]).logits, student_run(input_ids=ids[:2]).logits, atol=1e-5)


def test_unpruned_student_is_left_alone():
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    result = reconstruct(student, teacher, _ids(16), kept={})
    assert result.totals["held_out_rel_error_before"] < 1e-9
    assert result.totals["held_out_rel_error_after"] < 1e-6
    for (name, p), q in zip(student.named_parameters(), teacher.parameters()):
        assert torch.allclose(p, q, atol=1e-3 * q.abs().max().item(), rtol=0), name


def test_held_out_guard_backs_off_when_refitting_overfits():
    # 512 MLP neurons and 96 attention channels fitted on 2 windows of 8 tokens, with almost no ridge: the refit
    # interpolates the fit tokens and fails on the held-out window, where the lightly pruned weights are good.
    teacher, student, report = _pruned({"intermediate_size": 480}, intermediate_size=512)
    before = _state(student)
    params = {n: p for n, p in student.named_parameters()}
    result = reconstruct(student, teacher, _ids(3, seq=8, seed=2), kept=report.kept,
                         config={"lambdas": [1e-9], "holdout_fraction": 0.34})
    assert result.totals["fit_windows"] == 2 and result.totals["held_out_windows"] == 1
    assert all(m["backed_off"] and m["lambda"] is None and "does worse" in m["reason"] for m in result.modules)
    assert result.totals["refit"] == 0
    assert _same(student, before) and all(p is params[n] for n, p in student.named_parameters())


def test_student_gets_closer_to_the_teacher():
    teacher, student, report = _pruned({"hidden_size": 48, "intermediate_size": 48, "num_attention_heads": 3,
                                        "num_key_value_heads": 1})
    held_out = _ids(8, seed=7)  # windows neither pruning nor reconstruction saw

    def mse():
        with torch.no_grad():
            return F.mse_loss(student(input_ids=held_out).logits, teacher(input_ids=held_out).logits).item()

    kl_before, mse_before = _kl(teacher, student, held_out), mse()
    result = reconstruct(student, teacher, _ids(64, seed=3), kept=report.kept)
    kl_after, mse_after = _kl(teacher, student, held_out), mse()
    assert result.totals["held_out_rel_error_after"] < result.totals["held_out_rel_error_before"]
    # measured 61.4 -> 55.2 and 3.97 -> 3.55 (a random tiny model at half width is far from its teacher)
    assert kl_after < 0.95 * kl_before and mse_after < 0.95 * mse_before, (kl_before, kl_after, mse_before, mse_after)
    assert "reconstructed" in str(result) and result.to_dict()["plugin"] == "least_squares"


def test_plugin_is_registered_and_third_party_ones_are_used():
    info = {p.name: p for p in compress.list_plugins()}["least_squares"]
    assert info.kind == "reconstruct" and info.source == "builtin"
    assert [p.name for p in compress.list_plugins("reconstruct")] == ["least_squares"]

    calls = []

    @compress.register_plugin
    class Echo(ReconstructPlugin):
        name = "test-echo"

        @dataclass
        class Config:
            tag: str = "x"

        def run(self, student, teacher, adapter, calibration, kept):
            calls.append((self.config.tag, kept["layers"], calibration.num_samples))
            return {"modules": [{"layer": 0}], "totals": {"n": 1}, "extra": True}

    try:
        teacher, student, report = _pruned({"params": 0.5})
        result = reconstruct(student, teacher, _ids(6), kept=report.kept, plugin="test-echo", config={"tag": "y"})
        assert calls == [("y", [0, 1, 2, 3], 6)]
        assert result.plugin == "test-echo" and result.modules == [{"layer": 0}] and result.details == {"extra": True}
        result = reconstruct(student, teacher, _ids(6), kept=report.kept, plugin=Echo())
        assert result.plugin == "test-echo"
        with pytest.raises(PluginError, match="unknown reconstruct plugin 'activation'.*least_squares"):
            reconstruct(student, teacher, _ids(6), kept=report.kept, plugin="activation")
    finally:
        registry.unregister_plugin("test-echo")


@pytest.mark.parametrize("how", ["third-party", "least_squares"])
def test_failure_midway_restores_the_student(how, monkeypatch):
    teacher, student, report = _pruned({"params": 0.5})
    before = _state(student)

    class Boom(ReconstructPlugin):
        name = "test-boom"

        def run(self, student, teacher, adapter, calibration, kept):
            layer = adapter.decoder_layers(student)[1]
            o = layer.get_submodule(adapter.o)
            o.weight = torch.nn.Parameter(torch.zeros_like(o.weight))
            raise RuntimeError("boom")

    if how == "third-party":
        plugin = Boom()
    else:  # the built-in plugin fails after having refit a few modules
        from compress.plugins.reconstruct import LeastSquaresReconstruct

        original, count = LeastSquaresReconstruct._refit, []

        def failing(self, *args):
            count.append(1)
            if len(count) == 4:
                raise RuntimeError("boom")
            return original(self, *args)
        monkeypatch.setattr(LeastSquaresReconstruct, "_refit", failing)
        plugin = "least_squares"
    with pytest.raises(PluginError, match="boom") as info:
        reconstruct(student, teacher, _ids(16), kept=report.kept, plugin=plugin)
    assert "restored" in str(info.value)
    assert _same(student, before)


def test_bad_inputs_are_refused_before_any_work():
    teacher, student, report = _pruned({"params": 0.5})
    before = _state(student)
    ids = _ids(8)
    with pytest.raises(ConfigError, match="same model"):
        reconstruct(teacher, teacher, ids, kept={})
    with pytest.raises(ConfigError, match="student should be a torch.nn.Module"):
        reconstruct("student", teacher, ids, kept={})
    with pytest.raises(ConfigError, match="kept has no 'hidden'|kept\\['heads'\\]|kept"):
        reconstruct(student, teacher, ids, kept={"hidden": [0, 1]})
    with pytest.raises(ConfigError, match=r"kept\['mlp'\]"):
        reconstruct(student, teacher, ids, kept={**report.kept, "mlp": [[0]] * 4})
    with pytest.raises(ConfigError, match=r"lambdas.*-1"):
        reconstruct(student, teacher, ids, kept=report.kept, config={"lambdas": [-1]})
    with pytest.raises(ConfigError, match=r"holdout_fraction.*1\.5"):
        reconstruct(student, teacher, ids, kept=report.kept, config={"holdout_fraction": 1.5})
    with pytest.raises(ConfigError, match=r"modules.*'ffn'"):
        reconstruct(student, teacher, ids, kept=report.kept, config={"modules": "ffn"})
    with pytest.raises(ConfigError, match=r"dtype.*'float16'"):
        reconstruct(student, teacher, ids, kept=report.kept, config={"dtype": "float16"})
    with pytest.raises(ConfigError, match=r"max_windows.*1"):
        reconstruct(student, teacher, ids, kept=report.kept, config={"max_windows": 1})
    with pytest.raises(DataError, match="outside the model's vocabulary"):
        reconstruct(student, teacher, ids + VOCAB, kept=report.kept)
    with pytest.raises(DataError, match="at least min_samples=2"):
        reconstruct(student, teacher, ids[:1], kept=report.kept)
    assert _same(student, before)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
    with pytest.raises(UnsupportedModelError, match="needs a family adapter.*'gpt2'"):
        reconstruct(copy.deepcopy(gpt2), gpt2, ids, kept={})


def test_only_the_chosen_modules_are_refit():
    teacher, student, report = _pruned({"params": 0.5})
    downs = [layer.mlp.down_proj.weight for layer in student.model.layers]
    result = reconstruct(student, teacher, _ids(16), kept=report.kept, config={"modules": "attention"})
    assert {m["module"] for m in result.modules} == {"attention"}
    assert all(layer.mlp.down_proj.weight is w for layer, w in zip(student.model.layers, downs))


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "phi3", "gpt_neox", "olmo2", "gemma3"])
def test_other_families(family):
    teacher = tiny_model(family)
    student = copy.deepcopy(teacher)
    report = compress.prune(student, {"params": 0.5}, _ids(16), calibration_config=CALIB)
    result = reconstruct(student, teacher, _ids(16, seed=4), kept=report.kept)
    assert result.totals["held_out_rel_error_after"] <= result.totals["held_out_rel_error_before"]
    assert result.totals["modules"] == 2 * report.shape_after["num_hidden_layers"]
    with torch.no_grad():
        assert torch.isfinite(student(input_ids=_ids(2, seed=5)).logits).all()


def test_naming_a_reconstruct_plugin_in_prune_plugins_is_refused_with_the_way_to_use_it(calib_ids):
    from compress.errors import PluginError

    model = tiny_model("llama")
    with pytest.raises(PluginError, match="reconstruct='least_squares'"):
        compress.prune(model, {"intermediate_size": 48}, calib_ids, plugins=["least_squares"])


def test_reconstruct_keywords_new_old_and_both():
    import warnings

    teacher, student, report = _pruned({"intermediate_size": 48})
    ids = _ids(16, seed=4)
    new_student, old_student, data_student = copy.deepcopy(student), copy.deepcopy(student), copy.deepcopy(student)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = reconstruct(new_student, teacher, ids, kept=report.kept, calibration=CALIB)
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)]
    with pytest.warns(DeprecationWarning, match=r"reconstruct\(calibration_config=\.\.\.\).*use calibration=") as w:
        old = reconstruct(old_student, teacher, ids, kept=report.kept, calibration_config=CALIB)
    assert w[0].filename == __file__
    with pytest.warns(DeprecationWarning, match=r"reconstruct\(calibration=<data>\).*data="):
        by_keyword = reconstruct(data_student, teacher, calibration=ids, kept=report.kept)
    assert new.totals == old.totals == by_keyword.totals and new.calibration == old.calibration
    for a, b in zip(new_student.parameters(), old_student.parameters()):
        assert torch.equal(a, b)
    before = _state(student)
    with pytest.raises(ConfigError, match=r"reconstruct\(\) got both calibration= and calibration_config="):
        reconstruct(student, teacher, ids, kept=report.kept, calibration=CALIB, calibration_config=CALIB)
    with pytest.raises(ConfigError, match=r"calibration should be a compress.CalibrationConfig.*got dict"):
        reconstruct(student, teacher, ids, kept=report.kept, calibration={"min_samples": 2})
    with pytest.raises(TypeError, match="unexpected keyword argument 'plan_config'"):
        reconstruct(student, teacher, ids, kept=report.kept, plan_config=None)
    with pytest.raises(TypeError, match=r"reconstruct\(\) missing 1 required argument: 'data'"):
        reconstruct(student, teacher, kept=report.kept)
    assert _same(student, before)
