"""Every axis and strategy on every family: exact parameter counts, a reload through from_pretrained with no
custom code that reproduces the pruned model's logits, generation, and invariants of the importance ranking."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import compress
from compress.models import adapter_for
from compress.pruning.shape import ModelShape

from conftest import FAMILIES, tiny_model

CASES = {
    "mlp": ({"intermediate_size": 48}, "width", None),
    "heads-in-groups": ({"num_attention_heads": 4}, "width", None),  # 3 per group -> 2 per group, 2 KV kept
    "heads-whole-groups": ({"num_attention_heads": 3, "num_key_value_heads": 1}, "width", None),
    "hidden": ({"hidden_size": 48}, "width", None),
    "depth-bi": ({"num_hidden_layers": 2}, "depth", {"depth": {"method": "block_influence"}}),
    "depth-block": ({"num_hidden_layers": 2}, "depth", {"depth": {"method": "contiguous_block", "eval_samples": 4}}),
    "width-budget": ({"params": 0.5}, "width", None),
    "depth-budget": ({"params": 0.7}, "depth", None),
    "width+depth-budget": ({"params": 0.4}, "width+depth", None),
}


# GPT-NeoX has no grouped-query attention and computes the head size as hidden_size // heads: heads and hidden
# channels are pruned together there (6 heads of 16 over hidden 96), and hidden alone is refused (a test below).
FAMILY_CASES = {"gpt_neox": {
    "heads-in-groups": ({"num_attention_heads": 4, "hidden_size": 64}, "width", None),
    "heads-whole-groups": ({"num_attention_heads": 3, "hidden_size": 48}, "width", None),
    "hidden": ({"num_attention_heads": 5, "hidden_size": 80, "intermediate_size": 64}, "width", None),
}}


def _reload(model, tmp_path):
    model.save_pretrained(tmp_path, safe_serialization=True)
    return AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
def test_prune_roundtrip(family, case, calib_ids, tmp_path):
    target, strategy, plugins = FAMILY_CASES.get(family, {}).get(case, CASES[case])
    model = tiny_model(family)
    adapter = adapter_for(model)
    report = compress.prune(model, target, calib_ids, strategy=strategy, plugins=plugins,
                            calibration_config=compress.CalibrationConfig(min_samples=4))
    assert report.params_after == compress.pruning.shape.count_params(model) < report.params_before
    if "params" in target:
        frac = target["params"]
        assert report.params_after <= frac * report.params_before
    else:
        for key, value in target.items():
            assert report.shape_after[key] == value
    assert ModelShape.from_config(adapter.shape_config(model.config)).to_dict() == report.shape_after
    if "hidden" in report.removed:
        assert len(report.kept["hidden"]) == report.shape_after["hidden_size"]
    if "depth" in report.removed:
        assert len(report.kept["layers"]) == report.shape_after["num_hidden_layers"]

    reloaded = _reload(model, tmp_path)
    assert type(reloaded) is type(model)
    assert compress.pruning.shape.count_params(reloaded) == report.params_after
    if model.config.tie_word_embeddings:
        assert reloaded.get_submodule(adapter.lm_head).weight is reloaded.get_submodule(adapter.embed).weight
    ids = calib_ids[:2, :16]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
        out = reloaded.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert out.shape == (1, 9)
        # The KV-cache path must agree with a full forward (layer_idx and head counts are consistent).
        full = reloaded(out[:, :-1]).logits[:, -1].argmax(-1)
        assert int(full) == int(out[0, -1])


def test_report_says_what_and_why(calib_ids):
    model = tiny_model("llama")
    report = compress.prune(model, {"params": 0.5}, calib_ids, calibration_config=compress.CalibrationConfig(min_samples=4))
    assert "damage cost" in report.plan_reason
    assert report.importance == "activation"
    assert set(report.removed) <= {"mlp", "heads", "hidden"} and report.removed
    assert report.calibration["samples"] == 16 and report.calibration["tokens"] == 16 * 32
    assert "mlp" in report.importance_summary and "least_important_layers" in report.importance_summary
    assert "->" in str(report)
    assert report.to_dict()["params_after"] == report.params_after


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_dead_neurons_are_pruned_first_and_output_is_unchanged(calib_ids):
    model = tiny_model("llama")
    dead = [3, 10, 20, 50, 60, 70, 80, 90]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[dead] = 0  # activation into down_proj is exactly 0 for these neurons
    ref = _logits(model, calib_ids[:2])
    report = compress.prune(model, {"intermediate_size": 96 - len(dead)}, calib_ids,
                            calibration_config=compress.CalibrationConfig(min_samples=4))
    assert report.removed["mlp"]["removed"] == len(dead)
    torch.testing.assert_close(_logits(model, calib_ids[:2]), ref, rtol=1e-5, atol=1e-5)


def test_silent_kv_group_is_removed_whole_and_output_is_unchanged(calib_ids):
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight[16:32] = 0  # KV group 1 outputs zeros -> its 3 query heads are silent
    ref = _logits(model, calib_ids[:2])
    compress.prune(model, {"num_attention_heads": 3, "num_key_value_heads": 1}, calib_ids,
                   calibration_config=compress.CalibrationConfig(min_samples=4))
    assert model.model.layers[0].self_attn.k_proj.out_features == 16
    torch.testing.assert_close(_logits(model, calib_ids[:2]), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["block_influence", "contiguous_block"])
def test_identity_layer_is_removed_first(method, calib_ids):
    model = tiny_model("llama")
    with torch.no_grad():  # a layer that writes nothing to the residual stream is the identity
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    torch.manual_seed(0)  # text the model itself finds likely, so removing a working layer raises the loss
    own_text = model.generate(calib_ids[:, :1], max_new_tokens=31, do_sample=True, pad_token_id=0)
    ref = _logits(model, calib_ids[:2])
    report = compress.prune(model, {"num_hidden_layers": 3}, own_text, strategy="depth",
                            plugins={"depth": {"method": method, "eval_samples": 4}},
                            calibration_config=compress.CalibrationConfig(min_samples=4))
    assert report.removed["depth"]["removed_layers"] == [2]
    torch.testing.assert_close(_logits(model, calib_ids[:2]), ref, rtol=1e-5, atol=1e-5)


def test_activation_importance_is_streamed_exactly(calib_ids):
    """Accumulating batch by batch gives the same scores as one big batch, and matches a direct computation."""
    from compress.pruning.calibrate import Calibration
    from compress.models import adapter_for

    model = tiny_model("llama")
    plugin = compress.registry.build_plugin("activation", "importance")
    small = plugin.score(model, adapter_for(model), Calibration(calib_ids, batch_size=3))
    whole = plugin.score(model, adapter_for(model), Calibration(calib_ids, batch_size=16))
    for name in ("mlp", "heads", "hidden", "layers"):
        torch.testing.assert_close(getattr(small, name), getattr(whole, name), rtol=1e-5, atol=1e-6)
    captured = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        model(calib_ids, use_cache=False)
    handle.remove()
    expected = captured[0].abs().mean(1).pow(2).sum(0).sqrt()  # mean over sequence, L2 over batch
    torch.testing.assert_close(whole.mlp[1], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("importance", ["magnitude", "random"])
def test_data_free_importance_needs_no_calibration(importance):
    model = tiny_model("qwen2")
    report = compress.prune(model, {"params": 0.6}, None, plugins=[importance])
    assert report.importance == importance and report.calibration == {}


def test_prune_is_deterministic(calib_ids):
    a, b = tiny_model("mistral"), tiny_model("mistral")
    ra = compress.prune(a, {"params": 0.5}, calib_ids, calibration_config=compress.CalibrationConfig(min_samples=4))
    rb = compress.prune(b, {"params": 0.5}, calib_ids, calibration_config=compress.CalibrationConfig(min_samples=4))
    assert ra.shape_after == rb.shape_after
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_teacher_left_untouched_when_copied(calib_ids):
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    compress.prune(student, {"hidden_size": 48}, calib_ids, calibration_config=compress.CalibrationConfig(min_samples=4))
    assert teacher.config.hidden_size == 96 and student.config.hidden_size == 48
    assert student.config.head_dim == 16


def test_precomputed_importance_sweeps_targets(calib_ids):
    teacher = tiny_model("llama")
    scores = compress.score_importance(teacher, calib_ids, calibration_config=compress.CalibrationConfig(min_samples=4))
    direct = copy.deepcopy(teacher)
    compress.prune(direct, {"params": 0.5}, calib_ids, calibration_config=compress.CalibrationConfig(min_samples=4))
    for target in ({"params": 0.5}, {"params": 0.7}):
        student = copy.deepcopy(teacher)
        report = compress.prune(student, target, None, importance=scores)
        assert report.importance == "activation" and report.calibration == {}
    reused = copy.deepcopy(teacher)
    compress.prune(reused, {"params": 0.5}, None, importance=scores)
    for a, b in zip(direct.parameters(), reused.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(compress.ConfigError, match="same unpruned model"):
        compress.prune(tiny_model("llama", hidden_size=48), {"params": 0.5}, None, importance=scores)


# -- plan_for: the one way from a model to its plan, on a skeleton without weights too ----------------------------

def _skeleton(family):
    from conftest import tiny_config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(tiny_config(family))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("target, strategy", [({"params": 0.5}, "width"), ({"params": 0.6}, "width+depth"),
                                              ({"intermediate_size": 48, "num_hidden_layers": 3}, "width+depth")])
def test_plan_for_on_a_meta_skeleton_equals_the_real_model(family, target, strategy):
    from compress.pruning.plan import plan_for

    skeleton = _skeleton(family)
    assert all(p.device.type == "meta" for p in skeleton.parameters())  # nothing to read: no weights exist
    real, meta = plan_for(tiny_model(family), target, strategy), plan_for(skeleton, target, strategy)
    assert meta.plans == real.plans and meta.plan == real.plan
    assert (meta.shape, meta.formula, meta.params, meta.target) == (real.shape, real.formula, real.params, real.target)
    assert plan_for(skeleton, target, strategy, candidates=3).plans[0] == real.plan


def test_plan_for_refuses_an_impossible_target_on_a_skeleton():
    from compress.pruning.plan import plan_for

    skeleton = _skeleton("llama")
    with pytest.raises(compress.TargetError, match="below the smallest shape"):
        plan_for(skeleton, {"params": 2}, "width")
    with pytest.raises(compress.TargetError, match="not smaller than the teacher"):
        plan_for(skeleton, {"params": 10**12}, "width")
    with pytest.raises(compress.ConfigError, match="strategy should be one of"):
        plan_for(skeleton, {"params": 0.5}, "sideways")
    with pytest.raises(compress.ConfigError, match=r"plan should be a compress.PlanConfig.*got dict"):
        plan_for(skeleton, {"params": 0.5}, "width", {"tolerance": 0.1})


def test_prune_plans_what_plan_for_plans(calib_ids):
    from compress.pruning.plan import plan_for

    model = tiny_model("qwen3")
    planned = plan_for(model, {"params": 0.55}, "width+depth", compress.PlanConfig(multiple_of=16))
    report = compress.prune(model, {"params": 0.55}, calib_ids, strategy="width+depth",
                            calibration=compress.CalibrationConfig(min_samples=4),
                            plan=compress.PlanConfig(multiple_of=16))
    assert report.shape_after == planned.plan.shape.to_dict() and report.plan_reason == planned.plan.reason
    assert report.params_after == planned.plan.params and report.params_before == planned.params


# -- check_prune_args: every prune input that can be judged before work -----------------------------------------

def test_check_prune_args_before_any_weight_is_loaded():
    from compress.pruning.arguments import check_prune_args

    skeleton = _skeleton("llama")
    assert check_prune_args(skeleton) == {}
    assert check_prune_args(skeleton, plugins=["magnitude"], strategy="depth") == {"magnitude": None}
    assert check_prune_args(skeleton, plugins={"depth": {"method": "block_influence"}},
                            calibration=compress.CalibrationConfig(), plan=compress.PlanConfig()) == {
        "depth": {"method": "block_influence"}}
    for kwargs, match in [(dict(strategy="wide"), "strategy should be one of"),
                          (dict(calibration={"seq_len": 16}), r"calibration should be a compress.CalibrationConfig"
                                                              r".*CalibrationConfig\(\*\*calibration\)"),
                          (dict(plan=compress.CalibrationConfig()), "plan should be a compress.PlanConfig"),
                          (dict(importance=[1.0]), "importance= should be a compress.Importance"),
                          (dict(plugins=5), "plugins should be a plugin name"),
                          (dict(plugins=[""]), "plugin names should be non-empty strings")]:
        with pytest.raises(compress.ConfigError, match=match):
            check_prune_args(skeleton, **kwargs)
    with pytest.raises(compress.ConfigError, match="model should be a torch.nn.Module"):
        check_prune_args("smollm2")


# -- renamed keywords: calibration= and plan= as in compress.compress; the old ones warn for one release -----------

CAL4 = compress.CalibrationConfig(min_samples=4)


def _no_deprecation(call, *args, **kwargs):
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = call(*args, **kwargs)
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)], [str(w.message) for w in caught]
    return out


def test_prune_new_keywords_work_without_a_warning(calib_ids):
    new, old = tiny_model("llama"), tiny_model("llama")
    plan = compress.PlanConfig(multiple_of=16)
    report = _no_deprecation(compress.prune, new, {"params": 0.5}, calib_ids, calibration=CAL4, plan=plan)
    with pytest.warns(DeprecationWarning):
        before = compress.prune(old, {"params": 0.5}, calib_ids, calibration_config=CAL4, plan_config=plan)
    assert report.shape_after == before.shape_after and report.kept == before.kept
    keyword = _no_deprecation(compress.prune, tiny_model("llama"), {"params": 0.5}, data=calib_ids,
                              calibration=CAL4, plan=plan)
    assert keyword.kept == report.kept


@pytest.mark.parametrize("old, new", [("calibration_config", "calibration"), ("plan_config", "plan")])
def test_prune_old_keywords_work_and_warn_at_the_callers_line(old, new, calib_ids):
    value = CAL4 if new == "calibration" else compress.PlanConfig(multiple_of=16)
    with pytest.warns(DeprecationWarning, match=rf"prune\({old}=\.\.\.\) is deprecated.*use {new}=") as caught:
        report = compress.prune(tiny_model("llama"), {"params": 0.5}, calib_ids, **{old: value},
                                **({} if new == "calibration" else {"calibration": CAL4}))
    assert caught[0].filename == __file__
    reference = compress.prune(tiny_model("llama"), {"params": 0.5}, calib_ids, calibration=CAL4,
                               **({new: value} if new == "plan" else {}))
    assert report.kept == reference.kept and report.shape_after == reference.shape_after


def test_data_under_its_old_keyword_works_and_warns(calib_ids):
    with pytest.warns(DeprecationWarning, match=r"prune\(calibration=<data>\) is deprecated.*data=") as caught:
        report = compress.prune(tiny_model("llama"), {"params": 0.5}, calibration=calib_ids, calibration_config=CAL4)
    assert {str(w.message).split(" is ")[0] for w in caught} == {"prune(calibration=<data>)",
                                                                "prune(calibration_config=...)"}
    assert report.calibration["samples"] == 16
    with pytest.warns(DeprecationWarning, match=r"score_importance\(calibration=<data>\)"):
        scores = compress.score_importance(tiny_model("llama"), calibration=calib_ids, calibration_config=CAL4)
    assert scores.mlp is not None


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(calibration=CAL4, calibration_config=CAL4), compress.ConfigError,
     r"prune\(\) got both calibration= and calibration_config="),
    (dict(plan=compress.PlanConfig(), plan_config=compress.PlanConfig()), compress.ConfigError,
     r"prune\(\) got both plan= and plan_config="),
    (dict(calibration="some text"), compress.ConfigError, r"prune\(\) got calibration data twice"),
    (dict(plan_conf=compress.PlanConfig()), TypeError, r"prune\(\) got an unexpected keyword argument 'plan_conf'"),
])
def test_prune_both_spellings_are_refused(kwargs, error, match, calib_ids):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        compress.prune(model, {"params": 0.5}, calib_ids, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_missing_data_is_still_a_type_error():
    with pytest.raises(TypeError, match=r"prune\(\) missing 1 required argument: 'data'"):
        compress.prune(tiny_model("llama"), {"params": 0.5})
    with pytest.raises(TypeError, match=r"score_importance\(\) missing 1 required argument: 'data'"):
        compress.score_importance(tiny_model("llama"))


def test_score_importance_keywords(calib_ids):
    model = tiny_model("llama")
    new = _no_deprecation(compress.score_importance, model, calib_ids, calibration=CAL4)
    with pytest.warns(DeprecationWarning, match=r"score_importance\(calibration_config=\.\.\.\).*calibration="):
        old = compress.score_importance(model, calib_ids, calibration_config=CAL4)
    assert torch.equal(new.mlp, old.mlp) and torch.equal(new.hidden, old.hidden)
    with pytest.raises(compress.ConfigError, match="got both calibration= and calibration_config="):
        compress.score_importance(model, calib_ids, calibration=CAL4, calibration_config=CAL4)
    with pytest.raises(TypeError, match="unexpected keyword argument 'plan_config'"):  # it never took a plan
        compress.score_importance(model, calib_ids, plan_config=compress.PlanConfig())
    with pytest.raises(compress.ConfigError, match=r"calibration_config should be a compress.CalibrationConfig"):
        with pytest.warns(DeprecationWarning):
            compress.score_importance(model, calib_ids, calibration_config={"seq_len": 16})
