"""Tiny random models of every supported family, a tiny tokenizer trained offline, and text to calibrate on."""

from __future__ import annotations

import os

os.environ.setdefault("COMPRESS_PLUGINS", "none")  # tests load built-in plugins only, unless a test opts in
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util

import pytest
import torch
import transformers
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3Config, Gemma3TextConfig, GPTNeoXConfig,
                          GraniteConfig, LlamaConfig, MistralConfig, Olmo2Config, Phi3Config,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen3Config, SmolLM3Config)

from transformers.utils import logging as hf_logging

# transformers 5 draws a bar for every load and save ("Loading weights", "Writing model shards"); tests that read
# stderr check compress's own output (the command line switches them off itself: tests run it in a subprocess).
hf_logging.disable_progress_bar()

VOCAB = 320


def _has_optimum_onnx() -> bool:
    try:
        return importlib.util.find_spec("optimum.exporters.onnx") is not None
    except ModuleNotFoundError:
        return False


HAS_OPTIMUM = _has_optimum_onnx()
# Optimum's ONNX exporter (the "onnx" format) exists on the transformers 4.57 line only (the [optimum] extra);
# CI runs these tests there, in a second environment (.ci/run).
needs_optimum = pytest.mark.skipif(
    not HAS_OPTIMUM, reason="optimum-onnx is not installed: the 'onnx' format is tested on the transformers 4.57 line"
)


def _gemma3_multimodal(**text):
    """Gemma3ForConditionalGeneration: a tiny SigLIP tower (kept whole) before the Gemma-3 text decoder."""
    tie = text.pop("tie_word_embeddings")
    special = {k: text[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    return Gemma3Config(text_config=Gemma3TextConfig(**text, tie_word_embeddings=tie).to_dict(),
                        vision_config=vision, mm_tokens_per_image=4, image_token_index=VOCAB - 1,
                        boi_token_index=VOCAB - 2, eoi_token_index=VOCAB - 3, tie_word_embeddings=tie, **special)


CONFIGS = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "gemma3_text": Gemma3TextConfig,
    "gemma2": Gemma2Config,
    "granite": GraniteConfig,
    "olmo2": Olmo2Config,
    "phi3": Phi3Config,
    "smollm3": SmolLM3Config,
    "gpt_neox": GPTNeoXConfig,
    "gemma3": _gemma3_multimodal,
}


def _installed_config_class(name: str):
    """transformers' config class ``name``, or None where the installed transformers has none."""
    try:
        return getattr(transformers, name)
    except (AttributeError, ImportError):
        return None


# Families that only newer transformers have (Ministral 3 and InternLM3: transformers 5 only; the others from 4.57
# on) join the suite where their config class imports, so the 4.57 line runs the families it has.
_NEWER_CONFIGS = {
    "ministral3": "Ministral3Config",
    "exaone4": "Exaone4Config",
    "olmo3": "Olmo3Config",
    "seed_oss": "SeedOssConfig",
    "apertus": "ApertusConfig",
    "glm4": "Glm4Config",
    "ernie4_5": "Ernie4_5Config",
    "internlm3": "InternLM3Config",
    "hunyuan_v1_dense": "HunYuanDenseV1Config",
}
# Families whose config class imports here but whose model transformers cannot build as the suite needs it.
UNTESTED_HERE = {"apertus": "transformers 4.57 builds Apertus's xIELU activation in bfloat16 whatever the model's "
                            "dtype, and cannot build it on the meta device (a teacher skeleton); fixed in 5"
                 } if transformers.__version__.startswith("4.") else {}
CONFIGS.update({family: cls for family, name in _NEWER_CONFIGS.items()
                if family not in UNTESTED_HERE and (cls := _installed_config_class(name)) is not None})
TIED = ("llama", "qwen3", "gemma3_text", "gemma2", "smollm3", "gemma3", "ernie4_5")
# No grouped-query attention and a head size computed as hidden_size // heads: 6 heads of 16 need hidden 96.
NO_GQA = ("gpt_neox",)
# What each family needs beyond the common fields, with its traps switched on: Gemma's sliding/full layer
# pattern and soft-capping, Granite's four multipliers, Phi-3's partial rotary, SmolLM3's no-RoPE layers; of the
# families below: Ministral 3's position-dependent query scaling (llama_4_scaling_beta, past an original context of 8)
# over a sliding window, OLMo-3's and EXAONE 4's sliding/full layers (EXAONE 4's full layers without RoPE), biases
# everywhere (Seed-OSS's separate o_proj bias, ERNIE 4.5, InternLM3), GLM-4's partial rotary, Apertus's llama3 rope
# scaling, HunYuan's attention biases and NTK-alpha rope.
EXTRA = {
    "gemma3_text": dict(query_pre_attn_scalar=16, sliding_window=8, final_logit_softcapping=20.0,
                        layer_types=["sliding_attention", "full_attention"] * 2),
    "gemma2": dict(query_pre_attn_scalar=16, sliding_window=8, final_logit_softcapping=20.0),
    "granite": dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0625,
                    logits_scaling=4.0),
    "phi3": dict(original_max_position_embeddings=256, partial_rotary_factor=0.5),  # fused q|k|v, gate|up
    "smollm3": dict(no_rope_layer_interval=2),
    "gpt_neox": dict(rotary_pct=0.5, use_parallel_residual=True, hidden_act="gelu"),
    "ministral3": dict(sliding_window=8, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 32.0, "original_max_position_embeddings": 8,
        "max_position_embeddings": 256, "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
        "llama_4_scaling_beta": 0.1}),
    "olmo3": dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2),
    "exaone4": dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2),
    # Dropout off (Seed-OSS's default is 0.1): the distillation test compares a training step with eval logits.
    "seed_oss": dict(attention_bias=True, attention_out_bias=True, mlp_bias=True, attention_dropout=0.0,
                     residual_dropout=0.0),
    "apertus": dict(rope_scaling={"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": 64,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    "glm4": dict(partial_rotary_factor=0.5, attention_bias=True),
    "ernie4_5": dict(use_bias=True),
    "internlm3": dict(attention_bias=True, mlp_bias=True),
    "hunyuan_v1_dense": dict(attention_bias=True, rope_scaling={"type": "dynamic", "alpha": 1000.0, "factor": 1.0}),
}
EXTRA["gemma3"] = EXTRA["gemma3_text"]


def tiny_config(family: str = "llama", **overrides):
    base = dict(
        vocab_size=VOCAB, hidden_size=96, intermediate_size=96, num_attention_heads=6, num_key_value_heads=2,
        num_hidden_layers=4, max_position_embeddings=256, tie_word_embeddings=family in TIED,
        head_dim=16, bos_token_id=1, eos_token_id=2, pad_token_id=0, **EXTRA.get(family, {}),
    )
    if family in NO_GQA:
        del base["num_key_value_heads"], base["head_dim"]
        base["hidden_size"] = 96
    base.update(overrides)
    return CONFIGS[family](**base)


def randomized(config, seed: int = 0):
    """A model of ``config`` with weights large enough that importance differences are visible (the default
    init, std 0.02, makes every channel look alike), in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.05)
    return model.eval()


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    return randomized(tiny_config(family, **overrides), seed)


SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Python is a programming language that lets you work quickly "
    "and integrate systems more effectively. A list is a mutable sequence; a tuple is an immutable one. "
    "Functions are first-class objects. Modules group related code; packages group modules. "
) * 40


@pytest.fixture(scope="session")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # The full byte alphabet: any text encodes without <unk>, as with real byte-level tokenizers (onnxruntime-genai's
    # tokenizer, checked against this one by the export, has no <unk> for bytes outside the vocabulary).
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([SAMPLE_TEXT], trainer)
    from tokenizers import decoders
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    assert len(fast) <= VOCAB
    return fast


def cli_run_args(tmp_path, tokenizer, family: str = "llama") -> list[str]:
    """A tiny teacher folder and train/valid text under ``tmp_path``, and CLI arguments that compress it fast."""
    teacher = tmp_path / "teacher"
    tiny_model(family).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    (tmp_path / "train.txt").write_text(SAMPLE_TEXT)
    (tmp_path / "valid.txt").write_text(SAMPLE_TEXT[:3000])
    return [str(teacher), "--out", str(tmp_path / "s"), "--data", str(tmp_path / "train.txt"), "--eval-data",
            str(tmp_path / "valid.txt"), "--samples", "8", "--seq-len", "32", "--eval-tokens", "256"]


@pytest.fixture
def calib_ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(4, VOCAB, (16, 32), generator=g)


FAMILIES = list(CONFIGS)


@pytest.fixture(scope="session")
def inductor():
    """Skip (saying why) where torch.compile cannot build kernels, e.g. a machine without a C++ compiler."""
    try:
        torch.compile(lambda x: x + 1)(torch.ones(2))
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"torch.compile (inductor) does not work here: {type(exc).__name__}: {exc}"[:400])
