"""onnxruntime-genai folders: the student as a fused-attention ONNX model that onnxruntime-genai's C++ generator
runs as it is (model, ``genai_config.json``, tokenizer), in fp32, int8 or int4.

The graph is written by onnxruntime-genai's own model builder (``onnxruntime_genai.models.builder``) from the
exported safetensors folder: ``GroupQueryAttention``, ``SkipSimplifiedLayerNorm`` and ``MatMulNBits`` instead of
the thousands of small nodes of the Optimum export, which is what makes decoding fast on CPU (see BENCHMARKS.md).

The builder runs in a child process (``python -m onnxruntime_genai.models.builder``): it puts its own folder on
``sys.path`` and configures logging when imported, which is no business of the caller's process. Its output is
then checked with the runtime users will run, ``onnxruntime_genai``:

* the tokenizer the generator uses must encode and decode text exactly as the model's Hugging Face tokenizer;
* ``genai_config.json`` must carry the model's own stop, padding and start tokens (corrected when it does not,
  and the correction is reported);
* fp32 logits must match PyTorch on a prefill and on a cached decode step (:func:`parity_check`), and int8/int4
  models have their perplexity change measured on held-out text against PyTorch fp32.

:func:`check_support`, :func:`write_formats` and :func:`card_section` make these folders the ``"onnx-genai*"``
export formats (see :mod:`compress.exporters.formats`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import describe_source
from ..evaluate import eval_windows, windows_perplexity
from ..progress import bar
from ..version import installed_version, transformers_version
from .card import CardSection
from .formats import REGISTRY, ExportError
from .job import ExportJob

# Format name -> builder precision (as the registry states it). Each format is a folder of the same
# name in the export.
GENAI_FORMATS: dict[str, str] = {
    name: f.precision for name, f in REGISTRY.items() if f.module == __name__ and f.precision is not None
}
# The progress bar while the formats are written: "export onnx-genai, onnx-genai-int8 + checks".
CHECKS = "checks"
# Text the generator's tokenizer must encode and decode as the model's: code, unicode, digits, runs of whitespace.
TOKENIZER_CHECK_TEXT = (
    'def mean(xs: list[float]) -> float:\n    """Average of 12 values."""\n    return sum(xs) / len(xs)'
    "\n\n\tNaïve café, 東京, Ωmega — don't stop; 3.14159 2026-11-26   end\n"
)
# Architectures (config.architectures[0]) whose builder output tests/test_export_genai.py checks against
# transformers on tiny random models (a pruned one among them: parity on a prefill and a cached decode step,
# greedy generation against transformers' generate, int8/int4 perplexity); the others are refused before any
# work. Each line has its own builder (0.15.2 with transformers 4.57, 0.18.0 with transformers 5), tried apart:
# * both releases: Llama, Mistral, Qwen2, Qwen3, Granite, ERNIE 4.5, HunYuan dense (its NTK-alpha theta baked in
#   by both), and Phi-3 when its rotary size is a multiple of 16 (see :func:`_check_rotary`; on 0.18 only without
#   LongRoPE);
# * 0.16 and later only (:data:`FROM_GENAI_0_16`): Gemma-2, which 0.15.2 computes right only while the text fits
#   in the sliding window (off by 11-23 after it); 0.18 applies the window per layer as the config's layer_types
#   say, and matches within 1e-5 of the largest logit once the embedding scale is exact
#   (:func:`_exact_embedding_scale`).
# Left out, with either release unless said: Gemma-3 (0.15.2: logits wrong from the first tokens; 0.18: the
# builder fails, KeyError 'rope_type', reading transformers 5's per-layer-type rope_parameters as a flat dict),
# SmolLM3 (the builder fails on its no-RoPE layers: KeyError 'position_ids'), GPT-NeoX and OLMo-2 (not in the
# builder; 0.18 has OLMo-1 only), and the other families compress prunes whose architecture the builder lacks.
BUILDER_ARCHITECTURES = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "GraniteForCausalLM",
        "Phi3ForCausalLM",
        "Ernie4_5ForCausalLM",
        "HunYuanDenseV1ForCausalLM",
        "Gemma2ForCausalLM",
    }
)
# Accepted only with onnxruntime-genai 0.16 or later, and why 0.15.2 is refused.
FROM_GENAI_0_16 = {
    "Gemma2ForCausalLM": "its builder computes wrong logits once the text is longer than the sliding window",
}
# Architectures whose sliding window the 0.18 builder applies (the layers config.layer_types marks
# "sliding_attention"); for the others it ignores the window (see :func:`_check_sliding_window`).
WINDOW_APPLIED_FROM_0_16 = frozenset({"Gemma2ForCausalLM"})
# Architectures that scale the embeddings by sqrt(hidden_size), which both builders write rounded to two decimals.
SQRT_HIDDEN_EMBEDDING_SCALE = frozenset({"Gemma2ForCausalLM"})
# Weight-only quantization (MatMulNBits): blocks of 32 input channels, each with its own scale; accuracy level 4
# = activations quantized to int8 at run time and multiplied in integers on CPU (the builder's CPU default).
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4
# int4 keeps the LM head and the most quantization-sensitive MatMuls (llama.cpp's "mixed" choice: the first and
# last eighth of the layers and every third layer's qkv/v/down projections) at int8. Measured on SmolLM2-135M
# (pydocs valid, 4,096 tokens; BENCHMARKS.md): all-int4 RTN +28.8% perplexity, blocks of 16 +19.5%, k-quant
# +43%, this mix +11.7% (217 MiB vs 194 MiB all-int4; int8 is +0.7%).
INT4_OPTIONS = ("matmul_mixed_precision=last_matmul:int8,mixed_layers:int8",)
BUILD_TIMEOUT_S = 3600


def check_genai_support(model: nn.Module) -> None:
    """Refuse, before any work, a model the onnxruntime-genai export cannot handle (or a missing runtime)."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as exc:
        raise ExportError(
            f"the onnxruntime-genai formats need the onnxruntime_genai package ({exc}); reinstall "
            "compress-llm, which depends on it"
        ) from exc
    _check_builder_matches_transformers()
    arch = type(model).__name__  # what save_pretrained writes into config.json, which the builder reads
    genai = _installed_genai()
    if arch not in BUILDER_ARCHITECTURES:
        raise ExportError(
            f"the onnxruntime-genai export is checked for {sorted(BUILDER_ARCHITECTURES)}, not "
            f"{arch}; export 'onnx' (Optimum) instead. Nothing was written."
        )
    if arch in FROM_GENAI_0_16 and genai < (0, 16):
        raise ExportError(
            f"{arch} is exported to onnxruntime-genai with release 0.16 or later only: the installed "
            f"{_shown(genai)}'s {FROM_GENAI_0_16[arch]}. Use the main line (transformers 5 with "
            "onnxruntime-genai>=0.18), or export 'onnx' (Optimum) or 'gguf'. Nothing was written."
        )
    _check_sliding_window(model, genai)
    _check_rotary(model, genai)
    _check_vocab_sized_linears(model)


def _installed_genai() -> tuple[int, int]:
    return installed_version("onnxruntime-genai")


def _shown(genai: tuple[int, int]) -> str:
    return "onnxruntime-genai " + ".".join(map(str, genai))


def _check_builder_matches_transformers() -> None:
    """The builder imports transformers' model classes: releases before 0.16 import only with transformers 4.x,
    0.16 and later only with transformers >= 5.2. Refuse a pair that cannot run, saying which release to install."""
    genai = _installed_genai()
    tf = transformers_version()
    if tf >= (5, 0) and genai < (0, 16):
        need = "onnxruntime-genai>=0.18 (pip install -U onnxruntime-genai)"
    elif tf < (5, 0) and genai >= (0, 16):
        need = 'onnxruntime-genai==0.15.2 (pip install "compress-llm[optimum]" pins it for this line)'
    else:
        return
    raise ExportError(
        f"{_shown(genai)}'s model builder cannot run with transformers "
        f"{tf[0]}.{tf[1]}: install {need}. Nothing was written."
    )


def _check_sliding_window(model: nn.Module, genai: tuple[int, int]) -> None:
    """Refuse a model with an active sliding window where the installed builder gets it wrong.

    The 0.18 builder applies a window only on the layers ``config.layer_types`` marks ``"sliding_attention"``;
    a Mistral config has no ``layer_types``, so the builder makes every layer attend to the whole text. Measured
    with onnxruntime-genai 0.18.0 on a tiny Mistral with a window of 8 tokens: with the builder's default
    window-sized caches a cached decode step after a 31-token prefill fails in GroupQueryAttention; with
    ``windowed_kv_cache=false`` a 48-token prefill matches PyTorch for the first 8 tokens and is wrong after them
    (max |diff| 8.8 at positions 8-15, 12.2 later). Gemma-2 (:data:`WINDOW_APPLIED_FROM_0_16`, whose config lists
    its sliding layers) is right past its window: 48 tokens and 40 generated ones with a window of 8. 0.15.2
    matches past the window for the architectures it accepts (tests/test_export_genai.py).
    """
    config = model.config
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or not getattr(config, "use_sliding_window", True):
        return
    if window >= (getattr(config, "max_position_embeddings", None) or window + 1):
        return
    if genai >= (0, 16) and type(model).__name__ not in WINDOW_APPLIED_FROM_0_16:
        raise ExportError(
            f"this model attends through a sliding window of {window} tokens, and {_shown(genai)} computes "
            "wrong logits past the window (measured: exact up to the window, off by several units after it). "
            "Export 'gguf', or use the compatibility line (transformers 4.57.6 with onnxruntime-genai 0.15.2: pip "
            'install "compress-llm[optimum]"), whose builder gets it right. Nothing was written.'
        )


def _check_rotary(model: nn.Module, genai: tuple[int, int]) -> None:
    """Phi-3: refuse a rotary size the runtime cannot run, and LongRoPE where the builder fails on it.

    onnxruntime's GroupQueryAttention takes a cos/sin cache of half the rotary size, which must be a multiple of
    8 (measured with both releases: a rotary size of 8, i.e. head 16 with partial_rotary_factor 0.5, fails at the
    first prefill; 16, 48, 96 match). The 0.18 builder reads LongRoPE's settings under rope_parameters["type"],
    a key transformers 5 configs do not have (KeyError); 0.15.2 matches PyTorch on either side of the original
    context.
    """
    if type(model).__name__ != "Phi3ForCausalLM":
        return
    config: Any = model.config
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotary = int(head_dim * factor)
    if rotary % 16:
        raise ExportError(
            f"Phi3ForCausalLM with a rotary size of {rotary} (head {head_dim} x partial_rotary_factor {factor:g}): "
            "onnxruntime's GroupQueryAttention needs a rotary size that is a multiple of 16. Export 'onnx' "
            "(Optimum) or 'gguf' instead. Nothing was written."
        )
    longrope = config.max_position_embeddings != getattr(config, "original_max_position_embeddings", None)
    if longrope and genai >= (0, 16):
        raise ExportError(
            f"Phi3ForCausalLM with LongRoPE (max_position_embeddings {config.max_position_embeddings} != "
            f"original_max_position_embeddings {getattr(config, 'original_max_position_embeddings', None)}): "
            f"{_shown(genai)}'s builder fails on it (it reads a key transformers 5 configs no longer write). Use the "
            'compatibility line (pip install "compress-llm[optimum]", onnxruntime-genai 0.15.2), or export '
            "'gguf'. Nothing was written."
        )


def _check_vocab_sized_linears(model: nn.Module) -> None:
    """Refuse a model with a linear layer of ``vocab_size`` outputs besides the LM head.

    Both builders (0.15.2 and 0.18.0) take any linear layer with ``vocab_size`` outputs for the LM head: measured
    on a tiny Llama whose MLP width equals its vocabulary (320), the logits come out wrong by 16 (1.3 of the
    largest). Pruning to such a width is a coincidence, but then the builder's output would be wrong.
    """
    vocab = getattr(model.config, "vocab_size", None)
    get_head: Any = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head and module.out_features == vocab:
            raise ExportError(
                f"{name} has {vocab} outputs, as many as the vocabulary, and onnxruntime-genai's builder would take "
                "it for the LM head (the logits come out wrong). Prune that width to another size, or export "
                "'onnx' (Optimum) or 'gguf'. Nothing was written."
            )


def builder_options(model: nn.Module) -> list[str]:
    """The builder options (``--extra_options``) a model needs beyond :func:`build`'s defaults.

    With a sliding window the 0.16+ builder sizes the caches of the sliding layers to the window by default, and
    the runtime then refuses any generator whose ``max_length`` is below the window (measured with 0.18.0:
    "KV cache capacity (33) must be at least local_window_size (256)"); ``windowed_kv_cache=false`` keeps
    full-length caches with the window applied in the attention, as 0.15.2 does (same logits past the window).
    """
    window = getattr(model.config, "sliding_window", None)
    if isinstance(window, int) and type(model).__name__ in WINDOW_APPLIED_FROM_0_16 and _installed_genai() >= (0, 16):
        return ["windowed_kv_cache=false"]
    return []


def _exact_embedding_scale(out: Path, model: nn.Module) -> list[str]:
    """Write sqrt(hidden_size) exactly where the builder rounded the embedding scale; return what was changed.

    Gemma multiplies the embeddings by sqrt(hidden_size) (float32 in transformers); both builders write
    ``round(sqrt(hidden_size), 2)`` (9.8 for 96, where transformers uses 9.79796): 2e-4 on every embedding, which
    on a tiny random Gemma-2 moves the logits by 2e-3 of the largest, 20 times the parity tolerance. A hidden size
    with an exact root (64, 144, 2304) matches to 1e-5 either way.
    """
    if type(model).__name__ not in SQRT_HIDDEN_EMBEDDING_SCALE:
        return []
    import onnx
    from onnx import numpy_helper

    path = out / "model.onnx"
    graph_model = onnx.load(str(path), load_external_data=False)
    producers = {o: n for n in graph_model.graph.node for o in n.output}
    mul = next((n for n in graph_model.graph.node if n.name == "/model/embed_tokens/Mul"), None)
    const = producers.get(mul.input[1]) if mul is not None and len(mul.input) == 2 else None
    if const is None or const.op_type != "Constant" or len(const.attribute) != 1 or len(const.attribute[0].t.dims):
        raise ExportError(
            "onnxruntime-genai's builder wrote the embedding scale in an unexpected form (no constant "
            "/model/embed_tokens/Mul); the export was discarded"
        )
    tensor = const.attribute[0].t
    old = numpy_helper.to_array(tensor)
    hidden = int(getattr(model.config, "hidden_size", 0))
    exact = np.asarray(math.sqrt(hidden), dtype=old.dtype)
    if old == exact:
        return []
    tensor.CopyFrom(numpy_helper.from_array(exact, tensor.name))
    onnx.save(graph_model, str(path))
    return [f"embedding scale: {float(old):.6g} -> {float(exact):.6g} (sqrt of hidden_size {hidden})"]


def build(
    hf_dir: Path, out: Path, precision: str, extra_options: Sequence[str] = (), *, int4_mixed: bool = True
) -> Path:
    """Run onnxruntime-genai's model builder on the Hugging Face folder ``hf_dir``, writing ``out``.

    ``extra_options``: more ``key=value`` builder options (``--extra_options``), after this module's defaults;
    ``int4_mixed=False`` quantizes every MatMul of an int4 model to int4 (see :data:`INT4_OPTIONS`).
    """
    if precision not in GENAI_FORMATS.values():
        raise ExportError(
            f"unknown onnxruntime-genai precision {precision!r}; choose from {sorted(set(GENAI_FORMATS.values()))}"
        )
    # shared_embeddings=false: for tied embeddings the 0.15.2 builder otherwise shares the quantized LM head with
    # the embedding lookup, and at int8 it names that tensor as if it were int4 (the model then fails to load).
    # The embedding table stays fp32: a lookup reads one row per token, so it costs no decode speed.
    options = ["hf_remote=false", "shared_embeddings=false"]
    if precision in ("int8", "int4"):
        options += [f"block_size={BLOCK_SIZE}", f"accuracy_level={ACCURACY_LEVEL}"]
    if precision == "int4" and int4_mixed:
        options += list(INT4_OPTIONS)
    options += list(extra_options)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="genai-cache-") as cache:
        cmd = [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(hf_dir),
            "-o",
            str(out),
            "-p",
            precision,
            "-e",
            "cpu",
            "-c",
            cache,
            "--extra_options",
            *options,
        ]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise ExportError(f"onnxruntime-genai's model builder ({precision}) ran past {BUILD_TIMEOUT_S} s") from exc
    if done.returncode != 0 or not (out / "genai_config.json").is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise ExportError(
            f"onnxruntime-genai's model builder ({precision}) failed with exit code {done.returncode}:\n{tail}"
        )
    return out


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def repair_config(out: Path, model_config, generation_config) -> list[str]:
    """Make ``out/genai_config.json`` say what the model's own configs say; return what was changed.

    Stop tokens are the generation config's ``eos_token_id`` (falling back to the model config's), never more:
    the builder has been seen adding the start token as an extra stop token, which ends every answer at once.
    The search defaults (sampling, temperature, top-k/p, repetition penalty) follow the generation config when
    it sets them. The context length is the model's ``max_position_embeddings``.
    """
    path = out / "genai_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    model, search = config["model"], config.setdefault("search", {})
    text_config = getattr(model_config, "text_config", None) or model_config
    gen = generation_config.to_diff_dict() if generation_config is not None else {}  # what it sets, not defaults
    eos = _as_list(gen.get("eos_token_id")) or _as_list(getattr(model_config, "eos_token_id", None))
    want = {}
    if eos:
        want[("model", "eos_token_id")] = eos[0] if len(eos) == 1 else eos
    for key in ("bos_token_id", "pad_token_id"):
        value = gen.get(key, getattr(model_config, key, None))
        if isinstance(value, int):
            want[("model", key)] = value
    if getattr(text_config, "max_position_embeddings", None):
        want[("model", "context_length")] = int(text_config.max_position_embeddings)
    for key in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty"):
        if gen.get(key) is not None:
            want[("search", key)] = gen[key]
    changed = []
    for (section, key), value in want.items():
        target = model if section == "model" else search
        if target.get(key) != value:
            changed.append(f"{section}.{key}: {target.get(key)!r} -> {value!r}")
            target[key] = value
    if changed:
        path.write_text(json.dumps(config, indent=4), encoding="utf-8")
    return changed


def load(out: Path):
    """``onnxruntime_genai.Model`` for a folder written by :func:`build`."""
    import onnxruntime_genai as og

    try:
        return og.Model(str(out))
    except Exception as exc:  # noqa: BLE001 - RuntimeError from the C++ side
        raise ExportError(f"onnxruntime-genai could not load {out}: {exc}") from exc


def check_tokenizer(og_model, tokenizer, text: str) -> dict:
    """The generator's tokenizer must give the Hugging Face tokenizer's ids for ``text``, and its text back.

    onnxruntime-genai tokenizes with onnxruntime-extensions, which reads ``tokenizer.json`` its own way (it picks
    the algorithm from the tokenizer class); a tokenizer it reads differently would feed the model wrong ids.
    """
    import onnxruntime_genai as og

    og_tok = og.Tokenizer(og_model)
    want = tokenizer(text).input_ids
    got = [int(i) for i in og_tok.encode(text)]
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if first is not None or len(got) != len(want):
        at = first if first is not None else min(len(got), len(want))
        raise ExportError(
            f"onnxruntime-genai's tokenizer encodes differently from the model's Hugging Face tokenizer "
            f"({len(got)} vs {len(want)} ids; first difference at position {at}: {got[at : at + 4]} vs "
            f"{want[at : at + 4]}); the generator would read wrong ids, so the folder was not written"
        )
    decoded, reference = og_tok.decode(want), tokenizer.decode(want, skip_special_tokens=True)
    if decoded != reference:
        raise ExportError(
            f"onnxruntime-genai's tokenizer decodes differently from the Hugging Face tokenizer "
            f"({decoded[:60]!r} vs {reference[:60]!r}); the folder was not written"
        )
    return {"tokens_compared": len(want), "identical": True}


def _generator(og_model, length: int):
    import onnxruntime_genai as og

    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=length, do_sample=False)
    return og.Generator(og_model, params)


def prefill_logits(og_model, ids: list[int]) -> np.ndarray:
    """The generator's logits for every position of ``ids`` (one prefill), as ``[len(ids), vocab]`` float32."""
    gen = _generator(og_model, len(ids))
    gen.append_tokens(ids)
    return np.asarray(gen.get_output("logits"), dtype=np.float32)[0]


def parity_check(model: nn.Module, og_model, input_ids: torch.Tensor, tolerance: float) -> dict:
    """Max |logit difference| between PyTorch and onnxruntime-genai on a prefill and one cached decode step,
    judged relative to the largest logit magnitude (at least 1), as :func:`compress.exporters.onnx.parity_check`."""
    model = model.to("cpu").eval()
    prefill = decode = 0.0
    scale = 1.0
    with torch.no_grad():
        ref = model(input_ids=input_ids, use_cache=False).logits.float().numpy()
    for row, expected in zip(input_ids.tolist(), ref):
        gen = _generator(og_model, len(row) + 1)
        gen.append_tokens(row[:-1])
        got = np.asarray(gen.get_output("logits"), dtype=np.float32)[0]
        prefill = max(prefill, float(np.abs(expected[:-1] - got).max()))
        gen.append_tokens(row[-1:])  # one decode step on the cache the prefill left
        step = np.asarray(gen.get_output("logits"), dtype=np.float32)[0, -1]
        decode = max(decode, float(np.abs(expected[-1] - step).max()))
        scale = max(scale, float(np.abs(expected).max()))
    worst = max(prefill, decode)
    return {
        "max_abs_diff_prefill": prefill,
        "max_abs_diff_decode": decode,
        "max_abs_diff": worst,
        "max_abs_logit": scale,
        "relative_diff": worst / scale,
        "tolerance": tolerance,
        "passed": worst / scale <= tolerance,
        "inputs": list(input_ids.shape),
    }


def perplexity(og_model, windows: torch.Tensor) -> float:
    """Perplexity with onnxruntime-genai over ``windows`` (``[n, seq_len]`` token ids), scored as
    :func:`compress.evaluate.perplexity` does (each window on its own, every next token counted)."""
    nll, count = 0.0, 0
    for row in bar(windows.tolist(), desc="perplexity (onnxruntime-genai)", unit="window"):
        logits = torch.from_numpy(prefill_logits(og_model, row))
        nll += float(nn.functional.cross_entropy(logits[:-1], torch.tensor(row[1:]), reduction="sum"))
        count += len(row) - 1
    return math.exp(nll / count)


def generate(og_model, prompt: str, max_new_tokens: int = 24) -> str:
    """Greedy continuation of ``prompt`` with onnxruntime-genai's own tokenizer and generator loop."""
    import onnxruntime_genai as og

    tok = og.Tokenizer(og_model)
    ids = [int(i) for i in tok.encode(prompt)]
    gen = _generator(og_model, len(ids) + max_new_tokens)
    gen.append_tokens(ids)
    new: list[int] = []
    while not gen.is_done() and len(new) < max_new_tokens:
        gen.generate_next_token()
        new.append(int(gen.get_next_tokens()[0]))
    return tok.decode(new)


# --- the "onnx-genai*" export formats (compress.exporters.formats.REGISTRY) ---------------------------------------


def check_support(model: nn.Module, tokenizer: Any = None) -> None:
    """Refuse, before any work, a model the builder is not checked for (the tokenizer is compared with the
    generator's only once a folder is written)."""
    check_genai_support(model)


def write_formats(job: ExportJob, formats: list[str]) -> dict[str, dict]:
    """Build each onnxruntime-genai folder and check it with onnxruntime-genai itself: config repair and tokenizer
    agreement for all, logits against PyTorch for fp32 (the gate), perplexity change against PyTorch fp32 for
    int8/int4 (measured and stated). Report key ``genai``: one entry per folder. An error of the runtime becomes
    an :class:`ExportError`."""
    results: dict[str, dict] = {}
    reference: dict = {}  # PyTorch's perplexity windows and figure, shared by the quantized folders
    for fmt in formats:
        try:
            out = build(job.hf_dir, job.out / fmt, GENAI_FORMATS[fmt], builder_options(job.model))
            graph_changes = _exact_embedding_scale(out, job.model)
            results[fmt] = _check_folder(job, out, reference)
            if graph_changes:
                results[fmt]["graph_changes"] = graph_changes
        except ExportError:
            raise
        except (RuntimeError, KeyError, ValueError, OSError) as exc:  # the runtime, or a folder it wrote wrong
            raise ExportError(
                f"onnxruntime-genai could not run {fmt}: {type(exc).__name__}: {exc}; the export was discarded"
            ) from exc
    return {"genai": results}


def _check_folder(job: ExportJob, out: Path, reference: dict) -> dict:
    """The report entry of one folder: config changes, tokenizer agreement, and parity (fp32) or perplexity."""
    fmt, precision, model = out.name, GENAI_FORMATS[out.name], job.model
    entry: dict = {
        "precision": precision,
        "config_changes": repair_config(out, model.config, getattr(model, "generation_config", None)),
    }
    og_model = load(out)
    entry["tokenizer"] = check_tokenizer(og_model, job.tokenizer, TOKENIZER_CHECK_TEXT)
    if precision == "fp32":
        parity = entry["parity"] = parity_check(model, og_model, job.sample_ids(), job.tolerance)
        if not parity["passed"]:
            raise ExportError(
                f"onnxruntime-genai logits ({fmt}) differ from PyTorch by {parity['max_abs_diff']:.3g} "
                f"({parity['relative_diff']:.3g} of the largest logit; tolerance {job.tolerance:g}); the export "
                "was discarded"
            )
        return entry
    if not reference:  # windows no longer than the model's context
        reference["ids"] = eval_windows(job.tokenizer, job.text, job.context_seq_len(), job.eval_tokens)
        reference["ppl"] = windows_perplexity(model, reference["ids"])
    ids, fp32 = reference["ids"], reference["ppl"]
    ppl = perplexity(og_model, ids)
    if not math.isfinite(ppl):
        raise ExportError(
            f"the {precision} onnxruntime-genai model ({fmt}) gives a non-finite perplexity; the export was discarded"
        )
    entry["perplexity"] = {
        "ppl_fp32": fp32,
        f"ppl_{precision}": ppl,
        "ppl_change": ppl / fp32 - 1,
        "evaluation": describe_source(job.text),
        "eval_tokens": ids.numel(),
        "eval_seq_len": ids.shape[1],
        "reference": "PyTorch fp32",
    }
    return entry


def summary_lines(results: Mapping[str, dict], out_dir: Path) -> list[str]:
    """The command line's line per onnxruntime-genai folder: its precision and its check against PyTorch."""
    lines = []
    for folder, entry in (results.get("genai") or {}).items():
        if "parity" in entry:
            p = entry["parity"]
            check = (
                f"parity with PyTorch: max |logit diff| {p['max_abs_diff']:.2e} ({p['relative_diff']:.1e} of "
                f"max |logit| {p['max_abs_logit']:.1f}) {'PASSED' if p['passed'] else 'FAILED'}"
            )
        else:
            q = entry["perplexity"]
            check = (
                f"perplexity {q['ppl_fp32']:.2f} (PyTorch fp32) -> {q['ppl_' + entry['precision']]:.2f} "
                f"({q['ppl_change']:+.1%})"
            )
        lines.append(f"genai    {out_dir / folder}   {entry['precision']}, {check}")
    return lines


def card_section(results: Mapping[str, dict]) -> CardSection:
    """Each folder's check (parity or perplexity change), and how to run a folder with onnxruntime-genai."""
    genai = results.get("genai")
    if not genai:
        return CardSection([], [])
    lines = [
        "",
        "## onnxruntime-genai (fastest on CPU)",
        "",
        "Fused-attention ONNX folders that onnxruntime-genai's generator runs as they are:",
        "",
    ]
    for folder, entry in genai.items():
        if "parity" in entry:
            p = entry["parity"]
            check = f"logits match PyTorch within {p['relative_diff']:.1e} of the largest logit"
        else:
            q = entry["perplexity"]
            check = (
                f"perplexity {q['ppl_fp32']:.2f} (PyTorch fp32) -> {q['ppl_' + entry['precision']]:.2f} "
                f"({q['ppl_change']:+.1%}) on {q['eval_tokens']:,} tokens of {q['evaluation']}"
            )
        lines.append(f"- `{folder}/`: {entry['precision']}; {check}")
    lines += [
        "",
        "```python",
        "import onnxruntime_genai as og",
        f'model = og.Model("path/to/this/folder/{next(iter(genai))}"); tokenizer = og.Tokenizer(model)',
        "params = og.GeneratorParams(model); params.set_search_options(max_length=256)",
        'generator = og.Generator(model, params); generator.append_tokens(tokenizer.encode("Hello"))',
        "while not generator.is_done(): generator.generate_next_token(); "
        "print(tokenizer.decode(generator.get_next_tokens()), end='')",
        "```",
    ]
    return CardSection([], lines)


__all__ = [
    "BUILDER_ARCHITECTURES",
    "GENAI_FORMATS",
    "build",
    "builder_options",
    "card_section",
    "check_genai_support",
    "check_support",
    "check_tokenizer",
    "generate",
    "load",
    "parity_check",
    "perplexity",
    "prefill_logits",
    "repair_config",
    "write_formats",
]
