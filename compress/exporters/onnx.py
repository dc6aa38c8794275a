"""Everything ONNX: export through Optimum, the PyTorch-vs-onnxruntime parity check, blockwise int8
quantization, and perplexity/generation with onnxruntime; and the ``"onnx"`` export format built from them
(:func:`check_support`, :func:`write_formats`, :func:`card_section`; see :mod:`compress.exporters.formats`).

Kept in one module on purpose: optimum-onnx 0.1.0, its only release, pins transformers < 4.58, so this format
exists on the compatibility line only (``pip install "compress-llm[optimum]"``, transformers 4.57.6; see
setup.cfg). When optimum-onnx supports transformers 5, this is the only file that should need to change.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import describe_source
from ..evaluate import eval_windows
from ..models import layout_for
from ..progress import bar
from .card import CardSection
from .formats import ExportError
from .job import EVAL_SEQ_LEN, ExportJob

ONNX_DIR = "onnx"
INT8_DIR = "onnx-int8"
TASK = "text-generation-with-past"
# The progress bar while the format is written: "export onnx + parity".
CHECKS = "parity"


#: What installs this format, for the message that refuses it where it is missing.
INSTALL_HINT = (
    'pip install "compress-llm[optimum]" (the compatibility line: optimum-onnx 0.1.0, its only release, requires '
    "transformers < 4.58, so this installs transformers 4.57.6)"
)


def check_optimum_installed() -> None:
    """Refuse the format where optimum-onnx is not installed (the main line, transformers 5, cannot have it)."""
    import importlib.util

    from ..version import transformers_version

    try:
        found = importlib.util.find_spec("optimum.exporters.onnx") is not None
    except ModuleNotFoundError:  # no "optimum" package at all
        found = False
    if not found:
        major, minor = transformers_version()
        raise ExportError(
            "the 'onnx' format is Optimum's ONNX exporter, and optimum-onnx is not installed (transformers "
            f"{major}.{minor} here). Either export 'onnx-genai' (onnxruntime-genai, the faster CPU format, which "
            f"works on transformers 5), or install it: {INSTALL_HINT}. Nothing was written."
        )


def check_onnx_support(model: nn.Module) -> None:
    """Refuse, before any work, a missing optimum-onnx, or a model type Optimum's ONNX exporter has no
    text-generation config for."""
    check_optimum_installed()
    import optimum.exporters.onnx.model_configs  # noqa: F401 - registers the exporter's model types
    from optimum.exporters.tasks import TasksManager

    model_type = getattr(model.config, "model_type", None) or ""
    for name in dict.fromkeys((model_type, model_type.replace("_", "-"))):
        try:
            tasks = TasksManager.get_supported_tasks_for_model_type(name, exporter="onnx", library_name="transformers")
        except KeyError:
            continue
        if TASK in tasks:
            return
    raise ExportError(
        f"Optimum's ONNX exporter (optimum-onnx) has no {TASK!r} support for model type "
        f"{model_type!r}; export without 'onnx' in formats (the safetensors folder loads with "
        "from_pretrained). Nothing was written."
    )


def export_onnx(hf_dir: Path, out: Path, attn_implementation: str | None = None) -> Path:
    """Export the Hugging Face folder ``hf_dir`` (weights, config, tokenizer) to ``out`` with KV-cache inputs.

    ``attn_implementation`` (from the family's adapter, e.g. ``"eager"`` for Gemma-2, whose attention
    soft-capping SDPA silently drops): load the model with it and export that, instead of Optimum's default.
    """
    from optimum.exporters.onnx import main_export, onnx_export_from_model

    try:
        # Optimum's own validation only warns; parity_check below is the one that can fail the export.
        if attn_implementation is None:
            main_export(str(hf_dir), output=str(out), task=TASK, do_validation=False, local_files_only=True)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation=attn_implementation)
            onnx_export_from_model(
                model,
                output=str(out),
                task=TASK,
                do_validation=False,
                preprocessors=[AutoTokenizer.from_pretrained(hf_dir)],
            )
    except Exception as exc:  # noqa: BLE001 - surface exporter failures as one error type
        raise ExportError(f"ONNX export of {hf_dir} failed: {type(exc).__name__}: {exc}") from exc
    for graph_file in sorted(out.glob("*.onnx")):
        accept_any_empty_past(graph_file)
    return out


PAST_PREFIX = "past_key_values."


def _rename_uses(graph, old: str, new: str) -> None:
    """Make every node of ``graph`` (and of its subgraphs that do not shadow ``old``) read ``new`` for ``old``."""
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name == old:
                node.input[k] = new
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                defined = (
                    {v.name for v in sub.input}
                    | {t.name for t in sub.initializer}
                    | {o for n in sub.node for o in n.output}
                )
                if old not in defined:
                    _rename_uses(sub, old, new)


def accept_any_empty_past(model_path: str | Path) -> int:
    """Let each ``past_key_values.*`` input of the ONNX graph at ``model_path`` accept an empty cache of any
    head count and head size; rewrites the file in place and returns how many inputs were changed.

    On the first step of ``generate``, Optimum's ``ORTModelForCausalLM`` (optimum-onnx 0.1.0) feeds an empty past
    of shape ``(batch, kv_heads, 0, head_size)`` computed from the config: ``hidden_size // num_attention_heads``
    as the head size for Llama-family types, even where the config states another ``head_dim`` (any pruned
    student), and one KV head per query head for types outside its list (Gemma-2). The graph declared the true
    sizes as fixed dimensions, so onnxruntime refused that tensor. Now the two dimensions are symbolic and a
    ``Reshape(past, [0, kv_heads, -1, head_dim])`` (0: keep the batch) comes first: an empty past of any such
    shape becomes the right empty past, and a real past (already of that shape) passes through unchanged — so
    the stock class runs the folder, with no compress code or patch in the user's process.

    Weights are neither loaded nor rewritten (an external-data file stays as it is). A graph already rewritten,
    or one without such inputs, is left alone.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    taken = (
        {v.name for v in [*graph.input, *graph.output, *graph.value_info]}
        | {t.name for t in graph.initializer}
        | {o for n in graph.node for o in n.output}
        | {n.name for n in graph.node}
    )

    def fresh(name: str) -> str:
        while name in taken:
            name += "_"
        taken.add(name)
        return name

    reshapes, shapes = [], {}
    for inp in graph.input:
        dims = inp.type.tensor_type.shape.dim
        if (
            not inp.name.startswith(PAST_PREFIX)
            or len(dims) != 4
            or not (dims[1].HasField("dim_value") and dims[3].HasField("dim_value"))
        ):
            continue
        heads, size = dims[1].dim_value, dims[3].dim_value
        if (heads, size) not in shapes:
            shapes[heads, size] = fresh(f"past_key_values_shape_{heads}x{size}")
            graph.initializer.append(
                numpy_helper.from_array(np.array([0, heads, -1, size], dtype=np.int64), shapes[heads, size])
            )
        cache = fresh(f"{inp.name}.as_cache")
        _rename_uses(graph, inp.name, cache)
        reshapes.append(
            helper.make_node("Reshape", [inp.name, shapes[heads, size]], [cache], name=fresh(f"/{inp.name}/Reshape"))
        )
        dims[1].dim_param = "past_num_key_value_heads"  # replaces the fixed value (a oneof)
        dims[3].dim_param = "past_head_dim"
    if not reshapes:
        return 0
    for k, node in enumerate(reshapes):
        graph.node.insert(k, node)
    onnx.save(model, str(model_path))
    return len(reshapes)


def load_ort(onnx_dir: str | Path, provider: str = "CPUExecutionProvider"):
    """``ORTModelForCausalLM`` for an exported folder: the stock ``from_pretrained``, nothing else on the CPU.

    A folder exported by compress runs with the stock class and no compress code (the graph accepts the empty
    KV cache the class feeds on the first step; see :func:`accept_any_empty_past`). Two cases still need the
    class's own idea of the cache shape — ``hidden_size // num_attention_heads`` as the head size for
    Llama-family types, one KV head per query head for types outside its list (Gemma-2) — replaced by the
    config's ``head_dim`` and ``num_key_value_heads``, which is done here on the loaded object:

    * IO binding (Optimum's default with the CUDA provider): it allocates the ``present.*`` outputs in those
      sizes before the run, which no graph can change (a stock user passes ``use_io_binding=False`` there);
    * a folder exported before that rewrite, whose graph still fixes the past's head count and head size.
    """
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(str(onnx_dir), provider=provider)
    past_shapes = [s for name, s in model.input_shapes.items() if name.startswith(PAST_PREFIX)]
    fixed_past = any(len(s) == 4 and not (isinstance(s[1], str) and isinstance(s[3], str)) for s in past_shapes)
    if not (model.use_io_binding or fixed_past):
        return model
    config = getattr(model.config, "text_config", None) or model.config  # multimodal Gemma-3: the decoder's sizes
    head_dim = getattr(config, "head_dim", None)
    if head_dim and hasattr(model, "embed_size_per_head"):
        model.embed_size_per_head = head_dim
    kv_heads = getattr(config, "num_key_value_heads", None)
    if kv_heads and hasattr(model, "num_key_value_heads"):
        model.num_key_value_heads = kv_heads
    return model


def _ort_logits(ort_model, input_ids: torch.Tensor) -> torch.Tensor:
    return ort_model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits.float()


def parity_check(model: nn.Module, ort_model, input_ids: torch.Tensor, tolerance: float) -> dict:
    """Max |logit difference| between PyTorch and onnxruntime on a prefill and on one cached decode step.

    The check passes when that difference, relative to the largest logit magnitude (at least 1), is within
    ``tolerance``: fp32 rounding grows with the logits' scale (a 135M model's logits reach ~30, and its honest
    fp32 differences ~1e-4 absolute), while a wrong graph is off by orders of magnitude more.
    """
    model_cpu = model.to("cpu").eval()
    with torch.no_grad():
        ref = model_cpu(input_ids=input_ids, use_cache=False).logits.float()
        got = _ort_logits(ort_model, input_ids)
        prefill = float((ref - got).abs().max())
        # Decode path: the ONNX graph with past key values must give the same next-token logits.
        prompt, last = input_ids[:, :-1], input_ids[:, -1:]
        out = ort_model(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=True)
        step = (
            ort_model(
                input_ids=last,
                attention_mask=torch.ones_like(input_ids),
                past_key_values=out.past_key_values,
                use_cache=True,
            )
            .logits[:, -1]
            .float()
        )
        decode = float((ref[:, -1] - step).abs().max())
    worst = max(prefill, decode)
    scale = max(1.0, float(ref.abs().max()))
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


# Blockwise int8 (weights quantized in blocks of this many input channels, each block with its own scale).
INT8_BLOCK_SIZE = 32
# accuracy_level=4: onnxruntime's CPU kernel also quantizes the activations to int8, block by block at run
# time, and multiplies in integers (the speed); blockwise activation scales keep outlier channels from
# swamping everyone else's precision, which per-tensor dynamic quantization does not (see BENCHMARKS.md).
INT8_ACCURACY_LEVEL = 4


def _nbits_quantizer():
    """onnxruntime's ``MatMulNBitsQuantizer``, imported without its side effect on the caller's logging.

    That module calls ``logging.basicConfig(level=INFO)`` at import, which would turn on INFO output for every
    library in the user's process; the root logger is put back as it was and the quantizer's own logger is
    limited to warnings.
    """
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger(nbits.__name__).setLevel(logging.WARNING)
    return nbits


def _untie_transposed_weights(model) -> int:
    """Give every MatMul fed by ``Transpose(initializer)`` its own pre-transposed initializer.

    Tied embeddings export as ``lm_head = MatMul(h, Transpose(embed_tokens.weight))``; a weight-only quantizer
    only sees constant weights, so without this the LM head — about 40% of a small student's per-token
    multiply-adds — would stay fp32. Returns how many MatMuls were rewired.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for name in [i for node in graph.node for i in node.input] + [o.name for o in graph.output]:
        consumers[name] = consumers.get(name, 0) + 1
    rewired, dead = 0, []
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        src = producer.get(node.input[1])
        if src is None or src.op_type != "Transpose" or src.input[0] not in inits:
            continue
        perm = [list(a.ints) for a in src.attribute if a.name == "perm"]
        weight = numpy_helper.to_array(inits[src.input[0]], base_dir="")
        transposed = weight.transpose(perm[0] if perm else None).copy()
        name = f"{src.input[0]}.transposed.{rewired}"
        while name in inits:
            name += "_"
        inits[name] = numpy_helper.from_array(transposed, name)
        graph.initializer.append(inits[name])
        consumers[node.input[1]] -= 1
        if consumers[node.input[1]] == 0:
            dead.append(src)
        node.input[1] = name
        rewired += 1
    for node in dead:
        graph.node.remove(node)
    return rewired


def quantize_int8(onnx_dir: Path, out_dir: Path) -> Path:
    """Blockwise int8 quantization of every linear layer and the LM head (onnxruntime.quantization).

    Weights go to int8 in blocks of :data:`INT8_BLOCK_SIZE` (``MatMulNBits``); activations are quantized at
    run time, block by block, by the CPU kernel (:data:`INT8_ACCURACY_LEVEL`). Only MatMuls with a constant
    weight are quantized (the attention products and the rotary-embedding MatMul have none). The embedding
    table stays fp32: a lookup costs no multiply-adds, and onnxruntime quantizes ``Gather`` only to 4 bits.
    The config and tokenizer files are copied so the folder loads like the fp32 one.
    """
    try:
        import onnx

        nbits = _nbits_quantizer()
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in onnx_dir.iterdir():
            if f.suffix != ".onnx" and not f.name.endswith(".onnx_data"):
                shutil.copy2(f, out_dir / f.name)
        model = onnx.load(str(onnx_dir / "model.onnx"))
        _untie_transposed_weights(model)
        config = nbits.DefaultWeightOnlyQuantConfig(
            block_size=INT8_BLOCK_SIZE,
            is_symmetric=True,
            accuracy_level=INT8_ACCURACY_LEVEL,
            bits=8,
            op_types_to_quantize=("MatMul",),
        )
        quantizer = nbits.MatMulNBitsQuantizer(
            model,
            bits=8,
            block_size=INT8_BLOCK_SIZE,
            is_symmetric=True,
            accuracy_level=INT8_ACCURACY_LEVEL,
            algo_config=config,
        )
        quantizer.process()
        # One file unless the protobuf would pass its 2 GiB limit (then weights go to model.onnx.data). Summed
        # per initializer: serializing the whole model to measure it fails past that same limit.
        big = sum(t.ByteSize() for t in quantizer.model.model.graph.initializer) > 1_800_000_000
        quantizer.model.save_model_to_file(str(out_dir / "model.onnx"), use_external_data_format=big)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"int8 quantization failed: {type(exc).__name__}: {exc}") from exc
    return out_dir


def ort_perplexity(ort_model, windows: torch.Tensor) -> float:
    """Perplexity with onnxruntime over ``windows`` (``[n, seq_len]`` token ids, e.g. from
    :func:`compress.evaluate.eval_windows`), scored exactly as :func:`compress.evaluate.perplexity` does."""
    nll, count = 0.0, 0
    for row in bar(windows, desc="perplexity (onnxruntime)", unit="window"):
        batch = row[None]
        logits = _ort_logits(ort_model, batch)
        nll += float(nn.functional.cross_entropy(logits[0, :-1], batch[0, 1:], reduction="sum"))
        count += batch.shape[1] - 1
    return math.exp(nll / count)


def ort_generate(ort_model, tokenizer, prompt: str, max_new_tokens: int = 24) -> str:
    ids = tokenizer(prompt, return_tensors="pt")
    out = ort_model.generate(
        input_ids=ids["input_ids"],
        attention_mask=ids["attention_mask"],
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0][ids["input_ids"].shape[1] :], skip_special_tokens=True)


# --- the "onnx" export format (compress.exporters.formats.REGISTRY) --------------------------------------------


def check_support(model: nn.Module, tokenizer: Any = None) -> None:
    """Refuse, before any work, a model Optimum cannot export (the tokenizer is not checked)."""
    check_onnx_support(model)


def write_formats(job: ExportJob, formats: list[str]) -> dict[str, dict]:
    """The Optimum ONNX folder (``onnx/``) and its parity gate (report key ``parity``), and with
    ``quantize="int8"`` ``onnx-int8/`` and its perplexity change against the fp32 ONNX model (``int8``)."""
    layout = layout_for(job.model)
    export_onnx(job.hf_dir, job.out / ONNX_DIR, layout.attention_implementation(layout.shape_config(job.model.config)))
    ort = load_ort(job.out / ONNX_DIR)
    parity = parity_check(job.model, ort, job.sample_ids(), job.tolerance)
    if not parity["passed"]:
        raise ExportError(
            f"onnxruntime logits differ from PyTorch by {parity['max_abs_diff']:.3g} "
            f"({parity['relative_diff']:.3g} of the largest logit; tolerance {job.tolerance:g}); "
            "the export was discarded"
        )
    if job.quantize != "int8":
        return {"parity": parity}
    quantize_int8(job.out / ONNX_DIR, job.out / INT8_DIR)
    windows = eval_windows(job.tokenizer, job.text, EVAL_SEQ_LEN, job.eval_tokens)
    fp32 = ort_perplexity(ort, windows)
    int8 = ort_perplexity(load_ort(job.out / INT8_DIR), windows)
    return {
        "parity": parity,
        "int8": {
            "ppl_fp32": fp32,
            "ppl_int8": int8,
            "ppl_change": int8 / fp32 - 1,
            "evaluation": describe_source(job.text),
            "eval_tokens": windows.numel(),
            "eval_seq_len": EVAL_SEQ_LEN,
        },
    }


def summary_lines(results: Mapping[str, dict], out_dir: Path) -> list[str]:
    """The command line's lines for the Optimum folders: fp32 parity with PyTorch, int8's perplexity change."""
    lines = []
    if results.get("parity"):
        p = results["parity"]
        lines.append(
            f"onnx     {out_dir / ONNX_DIR}   parity with PyTorch: max |logit diff| {p['max_abs_diff']:.2e} "
            f"({p['relative_diff']:.1e} of max |logit| {p['max_abs_logit']:.1f}, tolerance {p['tolerance']:g}) "
            f"{'PASSED' if p['passed'] else 'FAILED'}"
        )
    if results.get("int8"):
        q = results["int8"]
        lines.append(
            f"int8     {out_dir / INT8_DIR}   perplexity {q['ppl_fp32']:.2f} -> {q['ppl_int8']:.2f} "
            f"({q['ppl_change']:+.1%})"
        )
    return lines


def card_section(results: Mapping[str, dict]) -> CardSection:
    """The int8 model's perplexity change (when quantized), and how to run the folders with Optimum's stock
    class or plain onnxruntime."""
    int8 = results.get("int8")
    measured = []
    if int8:
        measured = [
            "",
            f"int8 ONNX (`{INT8_DIR}/`: blockwise int8 weights, int8 compute on CPU): perplexity "
            f"{int8['ppl_fp32']:.2f} (fp32 ONNX) -> {int8['ppl_int8']:.2f} ({int8['ppl_change']:+.1%}) on "
            f"{int8.get('eval_tokens', 0):,} tokens of {int8.get('evaluation', 'held-out text')}.",
        ]
    usage = [
        "",
        f"ONNX (with KV cache) in `{ONNX_DIR}/`"
        + (f", int8 in `{INT8_DIR}/`" if int8 else "")
        + ", for Optimum's stock class:",
        "",
        "```python",
        "from optimum.onnxruntime import ORTModelForCausalLM",
        f'model = ORTModelForCausalLM.from_pretrained("path/to/this/folder/{ONNX_DIR}")',
        "```",
        "",
        "With the CUDA provider pass `use_io_binding=False`: with IO binding optimum-onnx 0.1.0 sizes the "
        "cache outputs as hidden_size / num_attention_heads, which pruning changes. Or plain onnxruntime: "
        f'`onnxruntime.InferenceSession("{ONNX_DIR}/model.onnx")` with inputs `input_ids`, `attention_mask`, '
        "`position_ids` and `past_key_values.*`.",
    ]
    return CardSection(measured, usage)
