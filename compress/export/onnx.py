"""Everything ONNX: export through Optimum, the PyTorch-vs-onnxruntime parity check, int8 dynamic
quantization, and perplexity/generation with onnxruntime.

Kept in one module on purpose: optimum-onnx 0.1.0 pins transformers < 4.58 (see setup.cfg), and when that pin
moves, this is the only file that should need to.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
from torch import nn

from ..data import TextSource
from ..evaluate import eval_windows
from ..errors import CompressError

ONNX_DIR = "onnx"
INT8_DIR = "onnx-int8"
TASK = "text-generation-with-past"


class ExportError(CompressError, RuntimeError):
    """Export failed or produced a model that does not match PyTorch."""


def export_onnx(hf_dir: Path, out: Path) -> Path:
    """Export the Hugging Face folder ``hf_dir`` (weights, config, tokenizer) to ``out`` with KV-cache inputs."""
    from optimum.exporters.onnx import main_export

    try:
        # Optimum's own validation only warns; parity_check below is the one that can fail the export.
        main_export(str(hf_dir), output=str(out), task=TASK, do_validation=False, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - surface exporter failures as one error type
        raise ExportError(f"ONNX export of {hf_dir} failed: {type(exc).__name__}: {exc}") from exc
    return out


def load_ort(onnx_dir: str | Path, provider: str = "CPUExecutionProvider"):
    """``ORTModelForCausalLM`` for an exported folder, fixed up for an explicit ``head_dim``.

    optimum-onnx 0.1.0 sizes the empty KV cache of Llama-family models as ``hidden_size // num_attention_heads``;
    after head or hidden pruning that is no longer the head size, and the first generate call fails. The graph
    itself is right; only this attribute of the Python wrapper needs the config's ``head_dim``.
    """
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(str(onnx_dir), provider=provider)
    head_dim = getattr(model.config, "head_dim", None)
    if head_dim and hasattr(model, "embed_size_per_head"):
        model.embed_size_per_head = head_dim
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
        step = ort_model(input_ids=last, attention_mask=torch.ones_like(input_ids),
                         past_key_values=out.past_key_values, use_cache=True).logits[:, -1].float()
        decode = float((ref[:, -1] - step).abs().max())
    worst = max(prefill, decode)
    scale = max(1.0, float(ref.abs().max()))
    return {"max_abs_diff_prefill": prefill, "max_abs_diff_decode": decode, "max_abs_diff": worst,
            "max_abs_logit": scale, "relative_diff": worst / scale, "tolerance": tolerance,
            "passed": worst / scale <= tolerance, "inputs": list(input_ids.shape)}


def quantize_int8(onnx_dir: Path, out_dir: Path) -> Path:
    """Dynamic int8 quantization of the weights (onnxruntime.quantization), with the config/tokenizer copied."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_dir.mkdir(parents=True, exist_ok=True)
    for f in onnx_dir.iterdir():
        if f.suffix != ".onnx" and not f.name.endswith(".onnx_data"):
            shutil.copy2(f, out_dir / f.name)
    try:
        quantize_dynamic(str(onnx_dir / "model.onnx"), str(out_dir / "model.onnx"), weight_type=QuantType.QInt8)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"int8 quantization failed: {type(exc).__name__}: {exc}") from exc
    return out_dir


def ort_perplexity(ort_model, tokenizer, text: TextSource, seq_len: int = 512, max_tokens: int | None = 4096) -> float:
    """Perplexity with onnxruntime, windows exactly as :func:`compress.evaluate.perplexity`."""
    ids = eval_windows(tokenizer, text, seq_len, max_tokens)
    nll, count = 0.0, 0
    for row in ids:
        batch = row[None]
        logits = _ort_logits(ort_model, batch)
        nll += float(nn.functional.cross_entropy(logits[0, :-1], batch[0, 1:], reduction="sum"))
        count += batch.shape[1] - 1
    return math.exp(nll / count)


def ort_generate(ort_model, tokenizer, prompt: str, max_new_tokens: int = 24) -> str:
    ids = tokenizer(prompt, return_tensors="pt")
    out = ort_model.generate(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)
