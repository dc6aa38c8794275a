"""The generic Torch-Pruning backend, used for decoder families without an adapter.

Starcoder2 (LayerNorm, biases, GELU MLP c_fc/c_proj, tied embeddings) and Glm (fused gate|up projection)
honour an explicit head_dim, so both MLP neurons and hidden channels can be pruned; StableLM computes head_dim
as hidden_size // heads, so only its MLP can be. Every expectation is computed independently of compress:
hand-rolled hooks, teacher weights sliced by hand, plain ``from_pretrained`` reloads.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (ArceeConfig, AutoModelForCausalLM, CohereConfig, GemmaConfig, GlmConfig, HeliumConfig,
                          MixtralConfig, NemotronConfig, PersimmonConfig, StableLmConfig, Starcoder2Config)

import compress
from compress.errors import ConfigError, TargetError, UnsupportedModelError
from compress.pruning.shape import count_params

from conftest import HAS_OPTIMUM, VOCAB, needs_optimum, randomized

CONFIGS = {"starcoder2": Starcoder2Config, "stablelm": StableLmConfig, "glm": GlmConfig, "nemotron": NemotronConfig,
           "cohere": CohereConfig, "arcee": ArceeConfig, "persimmon": PersimmonConfig, "helium": HeliumConfig,
           "gemma": GemmaConfig}
CAL = compress.CalibrationConfig(min_samples=4)


def tiny(family: str, seed: int = 0) -> torch.nn.Module:
    """Like conftest.tiny_model, for families compress has no adapter for (checked below)."""
    cfg = CONFIGS[family](vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, num_hidden_layers=3, max_position_embeddings=256,
                          tie_word_embeddings=family == "starcoder2", bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return randomized(cfg, seed)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()}, model.training)


def _unchanged(model, before) -> bool:
    weights, flags, training = before
    state = model.state_dict()
    return (state.keys() == weights.keys() and all(torch.equal(v, weights[k]) for k, v in state.items())
            and {n: p.requires_grad for n, p in model.named_parameters()} == flags and model.training == training)


def test_these_families_have_no_adapter():
    assert not set(CONFIGS) & set(compress.supported_families())


CASES = [("starcoder2", {"intermediate_size": 48}), ("starcoder2", {"hidden_size": 48, "intermediate_size": 64}),
         ("stablelm", {"intermediate_size": 40}), ("glm", {"hidden_size": 40, "intermediate_size": 48}),
         ("nemotron", {"hidden_size": 48, "intermediate_size": 64}), ("cohere", {"hidden_size": 48, "intermediate_size": 64}),
         ("arcee", {"hidden_size": 48, "intermediate_size": 64}), ("persimmon", {"intermediate_size": 48}),
         ("helium", {"intermediate_size": 48}), ("gemma", {"intermediate_size": 48})]


@pytest.mark.parametrize("family, target", CASES)
def test_pruned_student_reloads_with_plain_from_pretrained(family, target, calib_ids, tmp_path):
    model = tiny(family)
    teacher = copy.deepcopy(model)
    report = compress.prune(model, target, calib_ids, calibration_config=CAL)

    assert report.importance == "activation" and "Torch-Pruning" in report.plan_reason
    assert "attention heads kept" in report.plan_reason
    assert all(entry["backend"] == "torch-pruning" for entry in report.removed.values())
    for key, value in target.items():
        assert report.shape_after[key] == value == getattr(model.config, key)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert report.params_after == count_params(reloaded) == count_params(model) < report.params_before
    if model.config.tie_word_embeddings:
        assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    ids = calib_ids[:2, :16]
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), rtol=1e-5, atol=1e-4)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = reloaded.generate(ids[:1, :6], **kwargs)
    assert out.shape == (1, 12) and torch.equal(out, model.generate(ids[:1, :6], **kwargs))

    # Attention is never pruned: its weights are the teacher's, sliced only on the hidden side.
    keep = torch.tensor(report.kept.get("hidden", range(teacher.config.hidden_size)))
    assert len(keep) == model.config.hidden_size
    student = dict(model.named_parameters())
    for name, w in teacher.named_parameters():
        if ".self_attn." not in name:
            continue
        expected = w
        if "hidden" in report.removed:  # q/k/v read hidden columns, o_proj writes hidden rows
            expected = w[keep] if "o_proj" in name else w[:, keep] if w.dim() == 2 else w
        assert torch.equal(student[name], expected), name


def test_selection_is_the_top_k_of_hand_computed_activation_importance(calib_ids):
    """Kept MLP neurons: top-k of mean |input of c_proj|; kept hidden channels: top-k of the summed mean
    |input| of every Linear reading the residual stream (q, k, v, c_fc), all over the calibration tokens."""
    model = tiny("starcoder2")
    teacher = copy.deepcopy(model)
    sums: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(_mod, args):
            x = args[0].detach().double().abs().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.sum(0)
        return hook

    readers = {}
    for k, layer in enumerate(teacher.model.layers):
        readers.update({f"{k}.{n}": getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj")})
        readers.update({f"{k}.{n}": getattr(layer.mlp, n) for n in ("c_fc", "c_proj")})
    handles = [m.register_forward_pre_hook(record(name)) for name, m in readers.items()]
    with torch.no_grad():
        teacher(calib_ids)
    for h in handles:
        h.remove()
    tokens = calib_ids.numel()
    mlp = sums["1.c_proj"] / tokens
    hidden = sum(v / tokens for name, v in sums.items() if not name.endswith("c_proj"))
    assert len(set(mlp.tolist())) == len(mlp) and len(set(hidden.tolist())) == len(hidden)  # no ties

    report = compress.prune(model, {"hidden_size": 40, "intermediate_size": 48}, calib_ids, calibration_config=CAL)
    keep_mlp = torch.sort(torch.topk(mlp, 48).indices).values
    keep_hidden = torch.sort(torch.topk(hidden, 40).indices).values
    assert report.kept["hidden"] == keep_hidden.tolist()
    down = teacher.model.layers[1].mlp.c_proj.weight
    assert torch.equal(model.model.layers[1].mlp.c_proj.weight, down[keep_hidden][:, keep_mlp])
    up = teacher.model.layers[1].mlp.c_fc
    assert torch.equal(model.model.layers[1].mlp.c_fc.bias, up.bias[keep_mlp])


@pytest.mark.parametrize("family, fraction", [("starcoder2", 0.6), ("stablelm", 0.75)])
def test_parameter_budget_lands_within_tolerance_and_is_exact(family, fraction, calib_ids, tmp_path):
    model = tiny(family).train()
    model.model.norm.weight.requires_grad_(False)  # mode and requires_grad flags survive pruning
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = count_params(model)
    plan = compress.PlanConfig(multiple_of=4)
    report = compress.prune(model, {"params": fraction}, calib_ids, calibration_config=CAL, plan_config=plan)
    assert model.training and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    budget = int(fraction * before)
    assert budget * (1 - plan.tolerance) <= report.params_after <= budget
    model.save_pretrained(tmp_path)
    assert report.params_after == count_params(model) == count_params(AutoModelForCausalLM.from_pretrained(tmp_path))
    if family == "stablelm":  # hidden pruning fails the reload preflight: the plan uses MLP neurons only
        assert report.shape_after["hidden_size"] == 64 and "hidden channels kept" in report.plan_reason
    else:
        assert report.shape_after["hidden_size"] < 64


REFUSALS = [
    ("starcoder2", {"intermediate_size": 48}, dict(strategy="depth"), ConfigError, "strategy='depth' needs an adapter"),
    ("starcoder2", {"num_attention_heads": 2}, {}, TargetError, r"num_attention_heads.*keeps attention heads"),
    ("starcoder2", {"num_hidden_layers": 2}, {}, TargetError, "num_hidden_layers"),
    ("starcoder2", {"intermediate_size": 48}, dict(plugins=["magnitude"]), ConfigError, "Drop plugins"),
    ("starcoder2", {"intermediate_size": 48}, dict(calibration=None), ConfigError, "needs calibration data"),
    ("stablelm", {"hidden_size": 48}, {}, UnsupportedModelError,
     r"hidden channels of 'stablelm'.*cannot be pruned without an adapter.*'intermediate_size': \d+"),
    ("stablelm", {"params": 0.3}, {}, TargetError, "hidden channels cannot be pruned for this family"),
    ("persimmon", {"hidden_size": 48}, {}, UnsupportedModelError, r"hidden channels of 'persimmon'.*cannot be pruned"),
    ("helium", {"hidden_size": 48}, {}, UnsupportedModelError, r"hidden channels of 'helium'.*cannot be pruned"),
    # Gemma (v1) scales its embeddings by sqrt(hidden_size): transformers 4.57 computes it from the config at run
    # time (the preflight sees the logits move with config.hidden_size); transformers 5 keeps it in a buffer set
    # from the config when the model is built (the preflight sees the reload differ).
    ("gemma", {"hidden_size": 48}, {}, UnsupportedModelError,
     r"reads config.hidden_size while it runs|logits of the reloaded and the in-memory pruned model differ"),
]


@pytest.mark.parametrize("family, target, kwargs, error, match", REFUSALS)
def test_refusals_leave_the_model_untouched(family, target, kwargs, error, match, calib_ids):
    model = tiny(family).train()
    model.get_input_embeddings().weight.requires_grad_(False)
    before = _state(model)
    kwargs = {"calibration": calib_ids, **kwargs}
    with pytest.raises(error, match=match) as info:
        compress.prune(model, target, kwargs.pop("calibration"), calibration_config=CAL, **kwargs)
    assert "Nothing was changed" in str(info.value)
    assert _unchanged(model, before)


def test_mixture_of_experts_without_adapter_is_refused_upstream(calib_ids):
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    model = AutoModelForCausalLM.from_config(cfg)
    before = _state(model)
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts.*4 experts.*Nothing was changed"):
        compress.prune(model, {"intermediate_size": 48}, calib_ids, calibration_config=CAL)
    assert _unchanged(model, before)


def _write_texts(tmp_path):
    from conftest import SAMPLE_TEXT

    (tmp_path / "train.txt").write_text(SAMPLE_TEXT * 3)
    (tmp_path / "valid.txt").write_text(SAMPLE_TEXT[::-1])
    return tmp_path / "train.txt", tmp_path / "valid.txt"


def test_compress_end_to_end_without_an_adapter(tokenizer, tmp_path):
    """Prune through the generic backend, distill (logits and hidden states), export safetensors and ONNX: the
    folder reloads with plain from_pretrained and onnxruntime matches PyTorch (Glm has no adapter)."""
    train, valid = _write_texts(tmp_path)
    result = compress.compress(
        (tiny("glm"), tokenizer), {"hidden_size": 48, "intermediate_size": 64}, train, tmp_path / "out",
        eval_data=valid, eval_seq_len=32, calibration=compress.CalibrationConfig(seq_len=32, num_samples=16,
                                                                                 min_samples=4),
        distill=compress.DistillConfig(max_steps=2, batch_size=2, seq_len=32, hidden_loss="cosine", log_every=1,
                                       progress=False),
        formats=("safetensors", "onnx") if HAS_OPTIMUM else ("safetensors",))
    assert "Torch-Pruning" in result.prune.plan_reason
    assert result.stages["distill"]["steps"] == 2 and result.stages["distill"]["projection"] == "learned linear 48 -> 64"
    assert result.stages["export"]["parity"]["passed"] if HAS_OPTIMUM else not result.stages["export"].get("parity")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert count_params(reloaded) == result.prune.params_after
    assert reloaded.config.hidden_size == 48 and reloaded.config.intermediate_size == 64


@needs_optimum
def test_onnx_for_a_family_optimum_cannot_export_is_refused_before_any_work(tokenizer, tmp_path):
    train, valid = _write_texts(tmp_path)
    model = tiny("starcoder2")
    before = _state(model)
    with pytest.raises(compress.CompressError, match="no 'text-generation-with-past' support.*'starcoder2'"):
        compress.compress((model, tokenizer), {"intermediate_size": 48}, train, tmp_path / "out",
                          eval_data=valid, formats=("safetensors", "onnx"))
    assert _unchanged(model, before) and not (tmp_path / "out").exists()


def test_the_unpruned_weights_are_freed(calib_ids):
    """Torch-Pruning's traced graph holds the old weights (autograd saved tensors, reference cycles): they must
    not outlive the call, or an 8B model would need its memory twice."""
    import weakref

    model = tiny("starcoder2")
    old = weakref.ref(model.model.layers[0].mlp.c_fc.weight)
    compress.prune(model, {"hidden_size": 48, "intermediate_size": 64}, calib_ids, calibration_config=CAL)
    assert old() is None


def test_weights_made_under_inference_mode_are_refused_clearly(calib_ids):
    with torch.inference_mode():
        model = tiny("starcoder2")
    with pytest.raises(ConfigError, match="inference_mode.*Load the model outside inference_mode"):
        compress.prune(model, {"intermediate_size": 48}, calib_ids, calibration_config=CAL)


def test_distilling_a_family_whose_logits_are_transformed_is_refused_before_any_work(tokenizer, tmp_path):
    """Cohere multiplies its logits by logit_scale; without an adapter declaring it the fused loss would train
    against logits 1/logit_scale times too large."""
    train, valid = _write_texts(tmp_path)
    model = tiny("cohere")
    before = _state(model)
    with pytest.raises(UnsupportedModelError, match="'cohere' has no adapter.*logit_scale"):
        compress.compress((model, tokenizer), {"intermediate_size": 48}, train, tmp_path / "out", eval_data=valid,
                          distill=compress.DistillConfig(max_steps=1, batch_size=2, seq_len=32, progress=False))
    assert _unchanged(model, before) and not (tmp_path / "out").exists()
    student = tiny("cohere", seed=1)
    with pytest.raises(UnsupportedModelError, match="logit_scale"):
        compress.distill(student, tiny("cohere"), torch.randint(4, VOCAB, (4, 16)),
                         compress.DistillConfig(max_steps=1, batch_size=2, seq_len=16, progress=False))


@needs_optimum
def test_export_refuses_onnx_of_a_family_optimum_cannot_export_before_writing(tokenizer, tmp_path):
    model = tiny("starcoder2")
    with pytest.raises(compress.CompressError, match="no 'text-generation-with-past' support.*'starcoder2'"):
        compress.export(model, tokenizer, tmp_path / "out", formats=["safetensors", "onnx"])
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
