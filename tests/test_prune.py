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
    "hidden": ({"hidden_size": 40}, "width", None),
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
    compress.prune(student, {"hidden_size": 32}, calib_ids, calibration_config=compress.CalibrationConfig(min_samples=4))
    assert teacher.config.hidden_size == 64 and student.config.hidden_size == 32
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
