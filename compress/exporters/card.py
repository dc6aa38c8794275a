"""The model card (README.md) written next to an exported student."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else (f"{value:.2f}" if isinstance(value, float) else str(value))


def model_card(
    name: str,
    params: int,
    shape: dict,
    onnx: bool,
    int8: dict | None = None,
    history: dict | None = None,
    genai: dict | None = None,
    gguf: dict | None = None,
) -> str:
    """Markdown describing where the student came from, what it is, how it scores, and how to load it.

    ``int8`` is the export report's int8 entry (perplexities with onnxruntime), empty when not quantized;
    ``genai`` its onnxruntime-genai entries (one per folder: parity or perplexity change), ``gguf`` its GGUF
    entries (one per file: perplexity change, and the f16 file's logit check).
    """
    history = history or {}
    prune = history.get("prune", {})
    lines = [
        f"# {name}",
        "",
        "A student model produced by [compress](https://pypi.org/project/compress-llm/): "
        "Minitron-style activation-based pruning, then distillation from the teacher.",
        "",
    ]
    if history.get("teacher"):
        lines += [f"- Teacher: `{history['teacher']}`"]
    lines += [f"- Parameters: {params:,}" + (f" (teacher: {prune['params_before']:,})" if prune else "")]
    if prune:
        lines += [
            f"- Pruning: {prune.get('strategy')} with {prune.get('importance')} importance; "
            f"{prune.get('plan_reason', '')}"
        ]
    lines += [
        "",
        "| shape | " + ("teacher | " if prune else "") + "student |",
        "|---|" + ("---|" if prune else "") + "---|",
    ]
    for key, value in shape.items():
        before = f"{_fmt(prune['shape_before'][key])} | " if prune and key in prune.get("shape_before", {}) else ""
        lines.append(f"| {key} | {before}{_fmt(value)} |")
    ppl = history.get("perplexity", {})
    if ppl:
        lines += [
            "",
            f"Perplexity on {history.get('evaluation', 'held-out text')} "
            f"(non-overlapping {history.get('eval_seq_len', 512)}-token windows):",
            "",
            "| stage | perplexity |",
            "|---|---|",
        ] + [f"| {k} | {v:.2f} |" for k, v in ppl.items()]
    if int8:
        lines += [
            "",
            f"int8 ONNX (`onnx-int8/`: blockwise int8 weights, int8 compute on CPU): perplexity "
            f"{int8['ppl_fp32']:.2f} (fp32 ONNX) -> {int8['ppl_int8']:.2f} ({int8['ppl_change']:+.1%}) on "
            f"{int8.get('eval_tokens', 0):,} tokens of {int8.get('evaluation', 'held-out text')}.",
        ]
    distill = history.get("distill")
    if distill:
        cfg = distill.get("config", {})
        lines += [
            "",
            f"Distillation: {distill.get('tokens', 0):,} tokens, {cfg.get('logit_loss')} on logits "
            f"(T={cfg.get('temperature')}), hidden-state loss: {cfg.get('hidden_loss') or 'none'}, "
            f"lr {cfg.get('lr')}, {distill.get('steps')} steps.",
        ]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        "```",
    ]
    if onnx:
        lines += [
            "",
            "ONNX (with KV cache) in `onnx/`"
            + (", int8 in `onnx-int8/`" if int8 else "")
            + ", for Optimum's stock class:",
            "",
            "```python",
            "from optimum.onnxruntime import ORTModelForCausalLM",
            'model = ORTModelForCausalLM.from_pretrained("path/to/this/folder/onnx")',
            "```",
            "",
            "With the CUDA provider pass `use_io_binding=False`: with IO binding optimum-onnx 0.1.0 sizes the "
            "cache outputs as hidden_size / num_attention_heads, which pruning changes. Or plain onnxruntime: "
            '`onnxruntime.InferenceSession("onnx/model.onnx")` with inputs `input_ids`, `attention_mask`, '
            "`position_ids` and `past_key_values.*`.",
        ]
    if genai:
        lines += [
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
        folder = next(iter(genai))
        lines += [
            "",
            "```python",
            "import onnxruntime_genai as og",
            f'model = og.Model("path/to/this/folder/{folder}"); tokenizer = og.Tokenizer(model)',
            "params = og.GeneratorParams(model); params.set_search_options(max_length=256)",
            'generator = og.Generator(model, params); generator.append_tokens(tokenizer.encode("Hello"))',
            "while not generator.is_done(): generator.generate_next_token(); "
            "print(tokenizer.decode(generator.get_next_tokens()), end='')",
            "```",
        ]
    if gguf:
        lines += [
            "",
            "## GGUF (llama.cpp)",
            "",
            "Converted by llama.cpp's converter and read back by transformers' GGUF loader to check it:",
            "",
        ]
        for entry in gguf.values():
            q = entry["perplexity"]
            check = (
                f"; logits within {entry['relative_diff']:.1e} of the largest logit" if "relative_diff" in entry else ""
            )
            lines.append(
                f"- `gguf/{entry['gguf_file']}`: perplexity {q['ppl_torch']:.2f} (PyTorch fp32) -> "
                f"{q['ppl_gguf']:.2f} ({q['ppl_change']:+.1%}) on {q['eval_tokens']:,} tokens of "
                f"{q['evaluation']}{check}"
            )
        name = gguf.get("q8_0", next(iter(gguf.values())))["gguf_file"]
        lines += ["", "```bash", f'llama-cli -m path/to/this/folder/gguf/{name} -p "Hello" -n 64', "```"]
    return "\n".join(lines) + "\n"
