"""The conformance suite every supported family passes (with tests/test_prune.py, which prunes each axis and
strategy and reloads the student with plain from_pretrained, and tests/test_export.py, which checks ONNX parity):
keeping everything changes nothing, a pruned student generates the same tokens after reloading, distillation
applies the family's logit transform, and Gemma's embedding scale survives hidden pruning."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import compress
from compress import registry
from compress.models import adapter_for
from compress.pruning.shape import ModelShape

from conftest import FAMILIES, NO_GQA, UNTESTED_HERE, tiny_model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _keep_all(shape: ModelShape) -> dict[str, dict]:
    layers = range(shape.num_hidden_layers)
    return {
        "mlp": {"keep": [list(range(shape.intermediate_size)) for _ in layers]},
        "heads": {"query_heads": [list(range(shape.num_attention_heads)) for _ in layers],
                  "kv_heads": [list(range(shape.num_key_value_heads)) for _ in layers], "head_dim": shape.head_dim},
        "hidden": {"keep": list(range(shape.hidden_size)), "kept": shape.hidden_size, "removed": 0},
        "depth": {"keep": list(layers)},
    }


def test_supported_families_are_the_conformance_suites():
    """Every family with an adapter is in the suite, where the installed transformers has its config class (the
    4.57 line has no Ministral 3 or InternLM3) and builds it (UNTESTED_HERE says why not)."""
    from transformers import CONFIG_MAPPING

    installed = [f for f in compress.supported_families() if f in CONFIG_MAPPING and f not in UNTESTED_HERE]
    assert installed == sorted(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("axis", ["mlp", "heads", "hidden", "depth"])
def test_keeping_everything_leaves_logits_identical(family, axis, calib_ids):
    model = tiny_model(family)
    before = _logits(model, calib_ids[:2])
    plugin = registry.build_plugin(axis, "axis")
    adapter = adapter_for(model)
    plugin.apply(model, adapter, _keep_all(ModelShape.from_config(adapter.shape_config(model.config)))[axis])
    torch.testing.assert_close(_logits(model, calib_ids[:2]), before, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_student_generates_the_same_after_reload(family, calib_ids, tmp_path):
    model = tiny_model(family)
    compress.prune(model, {"params": 0.5}, calib_ids, strategy="width+depth",
                   calibration_config=compress.CalibrationConfig(min_samples=4))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    prompt = calib_ids[:1, :6]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(_logits(reloaded, calib_ids[:2]), _logits(model, calib_ids[:2]), rtol=1e-5, atol=1e-5)
    assert torch.equal(reloaded.generate(prompt, **kwargs), model.generate(prompt, **kwargs))


@pytest.mark.parametrize("family", FAMILIES)
def test_distillation_applies_the_family_logit_transform(family):
    """The first step's KD term (before any update) equals KL(teacher || student) over the models' own logits,
    which include Gemma's soft-capping and Granite's scaling."""
    teacher = tiny_model(family)
    student = tiny_model(family, seed=1)
    ids = torch.randint(4, 320, (4, 16), generator=torch.Generator().manual_seed(3))
    t, s = _logits(teacher, ids)[:, :-1], _logits(student, ids)[:, :-1]
    expected = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum") / (4 * 15)
    cfg = compress.DistillConfig(max_steps=1, batch_size=4, seq_len=16, log_every=1, progress=False)
    report = compress.distill(student, teacher, ids, cfg)
    assert report.losses[0]["kd"] == pytest.approx(float(expected), rel=1e-4)


def _image_inputs(model):
    """A prompt with one image (begin-of-image token, the image's soft tokens, end-of-image) and its pixels."""
    cfg = model.config
    ids = torch.tensor([[1, 17, cfg.boi_token_index] + [cfg.image_token_index] * cfg.mm_tokens_per_image
                        + [cfg.eoi_token_index, 40, 41, 42]])
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    return dict(input_ids=ids, pixel_values=pixels, token_type_ids=(ids == cfg.image_token_index).long())


@pytest.mark.parametrize("family", ["gemma3_text", "gemma2", "gemma3"])
def test_gemma_hidden_pruning_keeps_the_function_of_the_sliced_model(family, calib_ids):
    """Slicing hidden channels of a Gemma model changes sqrt(hidden_size), the embedding scale a reload
    computes; the compensation must give the logits of the sliced model with the teacher's scale. For multimodal
    Gemma-3 this includes the image features projected into the residual stream."""
    model = tiny_model(family)
    keep = list(range(0, 96, 2))
    plugin = registry.build_plugin("hidden", "axis")
    reference = copy.deepcopy(model)
    adapter = adapter_for(model)
    plugin.apply(model, adapter, {"keep": keep, "kept": 48, "removed": 48})
    adapter.shape_config(model.config).hidden_size = 48  # what prune() writes, and what a reload reads
    # The reference: the same slicing, with the embedding scale left at sqrt(96) and no compensation.
    no_compensation = type(adapter)(**{**adapter.__dict__, "embed_scale": None, "residual_norms": ()})
    plugin.apply(reference, no_compensation, {"keep": keep, "kept": 48, "removed": 48})
    if family == "gemma2":  # computes sqrt(config.hidden_size) in forward: keep the old width for the reference
        reference.config.hidden_size = 96
    torch.testing.assert_close(_logits(model, calib_ids[:2]), _logits(reference, calib_ids[:2]), rtol=1e-4,
                               atol=1e-4)
    if family == "gemma3":
        with torch.no_grad():
            got, want = model(**_image_inputs(model)).logits, reference(**_image_inputs(reference)).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_multimodal_gemma3_reloads_with_images_and_keeps_its_vision_tower(calib_ids, tmp_path):
    model = tiny_model("gemma3")
    vision = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    report = compress.prune(model, {"hidden_size": 48, "num_attention_heads": 4, "num_hidden_layers": 3}, calib_ids,
                            strategy="width+depth", calibration_config=compress.CalibrationConfig(min_samples=4))
    assert model.model.multi_modal_projector.mm_input_projection_weight.shape == (32, report.shape_after["hidden_size"])
    assert all(torch.equal(v, vision[k]) for k, v in model.model.vision_tower.state_dict().items())
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reloaded) is type(model) and compress.pruning.shape.count_params(reloaded) == report.params_after
    assert len(reloaded.config.text_config.layer_types) == report.shape_after["num_hidden_layers"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**_image_inputs(reloaded)).logits, model(**_image_inputs(model)).logits,
                                   rtol=1e-5, atol=1e-5)


def test_gpt_neox_hidden_without_heads_is_refused_and_heads_keep_their_qkv_rows(calib_ids):
    """GPT-NeoX's fused projection interleaves q, k, v head by head: removing heads must keep whole
    [q_h | k_h | v_h] row blocks, which an independent per-head reshape of the weight shows."""
    model = tiny_model("gpt_neox")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for target, match in (({"hidden_size": 64}, "hidden_size // num_attention_heads"),
                          ({"num_attention_heads": 4}, "hidden_size // num_attention_heads"),
                          ({"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64},
                           "no grouped-query attention")):
        with pytest.raises(compress.TargetError, match=match):
            compress.prune(model, target, calib_ids, calibration_config=compress.CalibrationConfig(min_samples=4))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    qkv = model.gpt_neox.layers[0].attention.query_key_value.weight.detach().clone()
    kept = [0, 2, 3, 5]
    registry.build_plugin("heads", "axis").apply(model, adapter_for(model), {
        "query_heads": [kept] * 4, "kv_heads": [kept] * 4, "head_dim": 16})
    expected = qkv.view(6, 3, 16, 96)[kept].reshape(4 * 3 * 16, 96)
    assert torch.equal(model.gpt_neox.layers[0].attention.query_key_value.weight, expected)


def test_gpt_neox_magnitude_head_scores_read_the_query_rows_of_each_head():
    """Per-head fused rows: the query part of head h is rows [3h*16, 3h*16+16) (an independent reshape)."""
    model = tiny_model("gpt_neox")
    scores = compress.score_importance(model, None, plugin="magnitude")
    layer = model.gpt_neox.layers[0]
    q = layer.attention.query_key_value.weight.detach().view(6, 3, 16, 96)[:, 0]
    o = layer.attention.dense.weight.detach().view(96, 6, 16)
    expected = (q.pow(2).sum((1, 2)) + o.pow(2).sum((0, 2))).sqrt()
    torch.testing.assert_close(scores.heads[0], expected, rtol=1e-5, atol=1e-5)


def test_the_planner_says_when_the_embedding_holds_most_parameters(calib_ids):
    """Gemma-sized vocabularies: only hidden pruning shrinks the embedding, and the plan says so."""
    model = tiny_model("gemma3_text", vocab_size=4096)
    share = 4096 * 96 / compress.pruning.shape.count_params(model)  # tied: one vocab x hidden table
    report = compress.prune(model, {"params": 0.5}, calib_ids,
                            calibration_config=compress.CalibrationConfig(min_samples=4))
    assert f"embedding holds {share:.0%} of the parameters" in report.plan_reason
    assert "mainly through the hidden size" in report.plan_reason
    assert report.shape_after["hidden_size"] < 96
    small_vocab = compress.prune(tiny_model("gemma3_text"), {"params": 0.5}, calib_ids,
                                 calibration_config=compress.CalibrationConfig(min_samples=4))
    assert "embedding" not in small_vocab.plan_reason
    depth = compress.prune(tiny_model("gemma3_text", vocab_size=4096), {"params": 0.8}, calib_ids,
                           strategy="depth", calibration_config=compress.CalibrationConfig(min_samples=4))
    assert "embedding" not in depth.plan_reason  # hidden does not change: nothing to say about it


def _phi3_longrope():
    # Phi-3-mini-128k style: longrope factors sized for hidden_size // heads * partial_rotary_factor // 2.
    factors = [1.0] * (64 // 4 // 2 // 2)  # hidden 64, 4 heads, head_dim 16, partial rotary 0.5 -> 4 factors
    rope = {"type": "longrope", "short_factor": factors, "long_factor": factors}
    return tiny_model("phi3", hidden_size=64, num_attention_heads=4, rope_scaling=rope, max_position_embeddings=512,
                      original_max_position_embeddings=256)


def test_phi3_longrope_shapes_that_cannot_load_are_refused_or_avoided(calib_ids, tmp_path):
    model = _phi3_longrope()
    with pytest.raises(compress.TargetError, match="hidden_size // num_attention_heads"):
        compress.prune(copy.deepcopy(model), {"hidden_size": 48}, calib_ids,
                       calibration_config=compress.CalibrationConfig(min_samples=4))
    report = compress.prune(model, {"params": 0.6}, calib_ids,
                            calibration_config=compress.CalibrationConfig(min_samples=4))
    after = report.shape_after
    assert after["hidden_size"] // after["num_attention_heads"] == after["head_dim"]
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(_logits(reloaded, calib_ids[:2]), _logits(model, calib_ids[:2]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in NO_GQA])
def test_removing_a_silent_kv_group(family, calib_ids):
    """A KV group whose values are zero contributes nothing; removing it is exact, except for OLMo-2 and OLMo-3,
    whose q/k norms divide by the RMS over all heads together (documented in the README)."""
    model = tiny_model(family)
    adapter = adapter_for(model)
    with torch.no_grad():  # KV group 1 outputs zeros: its 3 query heads are silent
        for layer in adapter.decoder_layers(model):
            if adapter.qkv:
                weight, q_width = layer.get_submodule(adapter.qkv).weight, layer.get_submodule(adapter.o).in_features
                v_start = q_width + (weight.shape[0] - q_width) // 2
                weight[v_start + 16:v_start + 32] = 0
            else:
                v = layer.get_submodule(adapter.v)
                v.weight[16:32] = 0
                if v.bias is not None:  # Qwen2
                    v.bias[16:32] = 0
    ref = _logits(model, calib_ids[:2])
    compress.prune(model, {"num_attention_heads": 3, "num_key_value_heads": 1}, calib_ids,
                   calibration_config=compress.CalibrationConfig(min_samples=4))
    difference = (_logits(model, calib_ids[:2]) - ref).abs().max().item()
    assert (difference < 1e-5) == (adapter.q_proj_norm is None), difference


@pytest.mark.parametrize("config_class, experts", [("MixtralConfig", {"num_local_experts": 4}),
                                                   ("Qwen3MoeConfig", {"num_experts": 4})])
def test_mixture_of_experts_is_refused_clearly_before_any_work(config_class, experts, calib_ids):
    import transformers

    cfg = getattr(transformers, config_class)(vocab_size=320, hidden_size=64, intermediate_size=96,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              **experts)
    model = AutoModelForCausalLM.from_config(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(compress.UnsupportedModelError, match="mixture-of-experts.*4 experts.*Nothing was changed"):
        compress.prune(model, {"params": 0.5}, calib_ids)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_replacing_a_built_in_adapter_must_be_explicit():
    from compress.models import LLAMA, register_adapter

    mine = type(LLAMA)(**{**LLAMA.__dict__, "families": ("llama",)})
    with pytest.raises(compress.UnsupportedModelError, match="replace=True"):
        register_adapter(mine)
    try:
        assert register_adapter(mine, replace=True) is adapter_for(tiny_model("llama"))
    finally:
        register_adapter(LLAMA, replace=True)
    assert adapter_for(tiny_model("llama")) is LLAMA


def test_an_adapter_declared_by_an_installed_package_is_found(monkeypatch):
    """A package can ship a family's adapter through the compress.plugins entry-point group; it cannot silently
    take over a family that already has one."""
    from importlib import metadata
    from types import SimpleNamespace

    from compress import registry
    from compress.models import _ADAPTERS, LLAMA

    mine = type(LLAMA)(**{**LLAMA.__dict__, "families": ("my_llama",)})
    hijack = type(LLAMA)(**{**LLAMA.__dict__, "families": ("llama",)})
    real = metadata.entry_points

    def with_extra(adapter, name):
        extra = SimpleNamespace(name=name, value="my_adapters:ADAPTER", dist=SimpleNamespace(name="my-adapters"),
                                load=lambda: adapter)
        return lambda group=None, **kw: list(real(group=group, **kw)) + (
            [extra] if group == registry.ENTRY_POINT_GROUP else [])

    try:
        monkeypatch.setattr(metadata, "entry_points", with_extra(mine, "my_llama"))
        registry.load_entry_point_plugins(allow="my-adapters", force=True)  # tests load no third party by default
        assert "my_llama" in compress.supported_families()
        model = tiny_model("llama")
        model.config.model_type = "my_llama"
        assert adapter_for(model) is mine

        monkeypatch.setattr(metadata, "entry_points", with_extra(hijack, "llama"))
        with pytest.raises(compress.PluginError, match="my-adapters.*already have an adapter.*replace=True"):
            registry.load_entry_point_plugins(allow="my-adapters", force=True)
    finally:
        _ADAPTERS.pop("my_llama", None)
        monkeypatch.undo()
        registry.load_entry_point_plugins(force=True)
    assert adapter_for(tiny_model("llama")) is LLAMA


def test_replacing_a_built_in_adapter_first_thing_in_a_process(tmp_path):
    """In a fresh process, before anything loaded the built-ins: the README's replace=True call works, a plain
    call for a built-in family is refused, and pruning afterwards uses the replacement."""
    import subprocess
    import sys

    code = """
import compress, sys
sys.path.insert(0, %r)
from conftest import tiny_model
mine = compress.DecoderAdapter(families=("phi3",), qkv="self_attn.qkv_proj", gate_up="mlp.gate_up_proj")
try:
    compress.register_adapter(mine)
    raise SystemExit("a built-in family was taken over silently")
except compress.UnsupportedModelError:
    pass
compress.register_adapter(mine, replace=True)
model = tiny_model("phi3")
compress.prune(model, {"intermediate_size": 48}, None, plugins=["magnitude"])
assert compress.models.adapter_for(model) is mine
print("ok")
""" % str(Path(__file__).parent)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_per_layer_sizes_are_refused_clearly_before_any_work(calib_ids):
    model = tiny_model("llama")
    if hasattr(model.config, "per_layer_config"):  # transformers 5: per-layer overrides of the global config
        model.config.per_layer_config = {2: {"num_attention_heads": 4}, 3: {"num_attention_heads": 4}}
    else:  # what a non-uniform checkpoint's config says on transformers 4.57
        model.config.num_attention_heads = [6, 6, 4, 4]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(compress.UnsupportedModelError, match="per-layer.*num_attention_heads.*Nothing was changed"):
        compress.prune(model, {"params": 0.5}, calib_ids)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- the families of transformers 5 (issue 21): traps beyond the conformance suite, and the refused ones ------------

NEWER = [f for f in ("ministral3", "exaone4", "olmo3", "seed_oss", "apertus", "glm4", "ernie4_5", "internlm3",
                     "hunyuan_v1_dense") if f in FAMILIES]


@pytest.mark.parametrize("family", [f for f in ("olmo3", "exaone4") if f in FAMILIES])
def test_depth_pruning_keeps_each_layer_its_own_attention_type(family, calib_ids, tmp_path):
    """OLMo-3 and EXAONE 4 alternate sliding and full layers (EXAONE 4's full layers use no RoPE): the kept layers
    keep their types, and the reloaded student computes what the pruned one does."""
    model = tiny_model(family)
    types = list(model.config.layer_types)
    report = compress.prune(model, {"num_hidden_layers": 2}, calib_ids, strategy="depth",
                            calibration=compress.CalibrationConfig(min_samples=4))
    assert model.config.layer_types == [types[i] for i in report.kept["layers"]]
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert reloaded.config.layer_types == model.config.layer_types
    torch.testing.assert_close(_logits(reloaded, calib_ids[:2]), _logits(model, calib_ids[:2]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", NEWER)
def test_least_squares_reconstruct_on_the_newer_families(family):
    """The refit reads each family's projections through its adapter (GLM-4's fused gate|up, Apertus's MLP without a
    gate, the biases of Seed-OSS, ERNIE 4.5 and InternLM3) and does not make the held-out error worse."""
    from compress.pruning.reconstruct import reconstruct

    teacher = tiny_model(family)
    student = copy.deepcopy(teacher)
    ids = [torch.randint(4, 320, (16, 32), generator=torch.Generator().manual_seed(s)) for s in (0, 4)]
    report = compress.prune(student, {"params": 0.5}, ids[0], calibration=compress.CalibrationConfig(min_samples=4))
    result = reconstruct(student, teacher, ids[1], kept=report.kept)
    assert result.totals["held_out_rel_error_after"] <= result.totals["held_out_rel_error_before"]
    assert result.totals["modules"] == 2 * report.shape_after["num_hidden_layers"]
    assert torch.isfinite(_logits(student, ids[1][:2])).all()


def _installed(name):
    import transformers

    try:
        return getattr(transformers, name)
    except (AttributeError, ImportError):
        return None


def _tiny_gemma4_text(**overrides):
    return _installed("Gemma4TextConfig")(**{
        **dict(vocab_size=320, hidden_size=96, intermediate_size=96, num_attention_heads=6, num_key_value_heads=2,
               num_hidden_layers=4, head_dim=16, max_position_embeddings=256, sliding_window=8,
               layer_types=["sliding_attention", "full_attention"] * 2, vocab_size_per_layer_input=320,
               hidden_size_per_layer_input=0, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        **overrides})


needs_gemma4 = pytest.mark.skipif(_installed("Gemma4TextConfig") is None, reason="Gemma 4 needs transformers 5")


@needs_gemma4
@pytest.mark.parametrize("overrides, named", [
    # Gemma-4-31B's kind (dense): full-attention layers with their own head size and KV heads, keys reused as values.
    (dict(global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True),
     r"full_attention head_dim 32 with 1 KV heads, sliding_attention head_dim 16 with 2 KV heads.*attention_k_eq_v"),
    # Gemma-4-E2B/E4B's kind: per-layer embeddings and KV sharing as well.
    (dict(global_head_dim=32, hidden_size_per_layer_input=8, num_kv_shared_layers=2),
     r"head_dim 32.*per-layer embeddings.*KV sharing \(the last 2 layers"),
    # Even a Gemma 4 whose layers all agree carries a per_layer_config.
    (dict(global_head_dim=16), r"per_layer_config every Gemma 4 config carries"),
])
def test_gemma4_is_refused_before_any_work_with_what_is_missing(overrides, named, calib_ids):
    model = AutoModelForCausalLM.from_config(_tiny_gemma4_text(**overrides)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (lambda: compress.prune(model, {"params": 0.5}, calib_ids),
                 lambda: compress.prune(model, {"intermediate_size": 48}, None, plugins=["magnitude"]),
                 lambda: compress.distill(model, copy.deepcopy(model), calib_ids,
                                          compress.DistillConfig(max_steps=1, progress=False))):
        with pytest.raises(compress.UnsupportedModelError,
                           match=rf"'gemma4_text' \(Gemma4ForCausalLM\).*{named}.*Nothing was changed"):
            call()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@needs_gemma4
def test_multimodal_gemma4_is_refused_with_what_its_text_decoder_has(calib_ids):
    text = _tiny_gemma4_text(global_head_dim=32, attention_k_eq_v=True, num_global_key_value_heads=1)
    config = _installed("Gemma4Config")(text_config=text.to_dict(), vision_config=None, audio_config=None)
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(compress.UnsupportedModelError,
                       match=r"'gemma4' \(Gemma4ForConditionalGeneration\).*full_attention head_dim 32"):
        compress.prune(model, {"params": 0.5}, calib_ids)


def _tiny_exaone4_5():
    from transformers import AutoModelForImageTextToText

    config = _installed("Exaone4_5_Config")(
        text_config=dict(model_type="exaone4", vocab_size=320, hidden_size=96, intermediate_size=96,
                         num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=4, head_dim=16,
                         sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=96),
        image_token_id=318, video_token_id=319)
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(config).eval()


@pytest.mark.skipif(_installed("Exaone4_5_Config") is None, reason="EXAONE 4.5 needs transformers 5")
def test_exaone4_5_is_refused_and_its_text_decoder_compresses_as_exaone4(calib_ids, tmp_path):
    """EXAONE 4.5 wraps an EXAONE 4 decoder in an image-text model AutoModelForCausalLM cannot load; the refusal's
    way out (an Exaone4ForCausalLM with the language model's and lm_head's weights) gives the same text logits and
    prunes as 'exaone4'."""
    from transformers import Exaone4ForCausalLM

    wrapper = _tiny_exaone4_5()
    before = {k: v.clone() for k, v in wrapper.state_dict().items()}
    with pytest.raises(compress.UnsupportedModelError,
                       match=r"'exaone4_5' \(Exaone4_5_ForConditionalGeneration\).*AutoModelForCausalLM.*"
                             r"Exaone4ForCausalLM\(config.text_config\).*Nothing was changed"):
        compress.prune(wrapper, {"params": 0.5}, calib_ids)
    assert all(torch.equal(v, before[k]) for k, v in wrapper.state_dict().items())

    text = Exaone4ForCausalLM(wrapper.config.text_config).eval()
    text.model.load_state_dict(wrapper.model.language_model.state_dict())
    text.lm_head.load_state_dict(wrapper.lm_head.state_dict())
    torch.testing.assert_close(_logits(text, calib_ids[:2]), _logits(wrapper, calib_ids[:2]), rtol=1e-5, atol=1e-5)
    compress.prune(text, {"params": 0.6}, calib_ids, calibration=compress.CalibrationConfig(min_samples=4))
    text.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(_logits(reloaded, calib_ids[:2]), _logits(text, calib_ids[:2]), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(_installed("Exaone4_5_Config") is None, reason="EXAONE 4.5 needs transformers 5")
def test_an_installed_adapter_for_a_refused_family_is_used():
    """The refusal stands for compress's built-in knowledge only: a package that declares an adapter wins."""
    from compress.models import _ADAPTERS, EXAONE4, register_adapter

    mine = type(EXAONE4)(**{**EXAONE4.__dict__, "families": ("exaone4_5",), "sub_config": "text_config",
                            "base": "model.language_model", "layers": "model.language_model.layers",
                            "embed": "model.language_model.embed_tokens", "final_norm": "model.language_model.norm"})
    try:
        register_adapter(mine)
        assert adapter_for(_tiny_exaone4_5()) is mine
    finally:
        _ADAPTERS.pop("exaone4_5", None)


def test_every_shape_is_checked_against_the_installed_config_class():
    """The planner asks the installed transformers' config class too: here Llama's config seen through the
    Mistral/Qwen2 adapter, which declares no hidden / heads rule of its own. transformers 5's LlamaConfig refuses
    hidden_size 40 with 6 heads; 4.57's has no such check."""
    from compress.models import LLAMA_LIKE
    from conftest import tiny_config

    config = tiny_config("llama")
    rules = LLAMA_LIKE.shape_constraint(config)
    teacher = ModelShape.from_config(config)
    if hasattr(type(config), "validate_architecture"):
        assert "LlamaConfig refuses it" in rules(teacher.replace(hidden_size=40))
        assert rules(teacher.replace(hidden_size=48)) is None and rules(teacher) is None
    else:
        assert rules is None
