"""Export: the deployable student as safetensors (+ tokenizer, generation config, model card) and ONNX with KV
cache, verified against PyTorch in onnxruntime, optionally int8-quantized.

Everything is written into a temporary folder and renamed into place only after every check passed, so a
failed parity check leaves nothing that looks like a good export.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..data import TextSource, default_eval_source, describe_source
from ..errors import ConfigError
from ..evaluate import eval_windows
from ..io import atomic_output_dir, check_output_dir
from ..models import layout_for
from ..shape import ModelShape, count_params
from .card import model_card
from .onnx import INT8_DIR, ONNX_DIR, ExportError

FORMATS = ("safetensors", "onnx")
QUANTIZATIONS = (None, "int8")
REPORT_FILE = "export_report.json"
EVAL_SEQ_LEN = 512  # window length of the int8 perplexity check, as in compress.evaluate.perplexity


@dataclass
class ExportReport:
    """What :func:`export` wrote and measured."""

    out_dir: str
    formats: list[str]
    files: dict = field(default_factory=dict)
    parity: dict = field(default_factory=dict)
    int8: dict = field(default_factory=dict)
    params: int = 0
    shape: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def check_export_args(formats: Sequence[str], quantize: str | None) -> list[str]:
    """Validate format and quantization names (cheap: callers check them before any expensive stage)."""
    formats = list(formats)
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ConfigError(f"unknown export format(s) {unknown or formats}; choose from {FORMATS}")
    if quantize not in QUANTIZATIONS:
        raise ConfigError(f"unknown quantization {quantize!r}; choose from {QUANTIZATIONS}")
    if quantize and "onnx" not in formats:
        raise ConfigError("quantize='int8' quantizes the ONNX model: add 'onnx' to formats")
    return formats


def check_exportable(model: nn.Module) -> ModelShape:
    """A causal LM whose every layer has the shape its config states (what a standard config can describe)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or not model.can_generate() or model.get_output_embeddings() is None:
        raise ExportError(f"{type(model).__name__} is not a Hugging Face causal language model "
                          "(AutoModelForCausalLM); only causal LMs can be exported")
    adapter = layout_for(model)
    shape = ModelShape.from_config(adapter.shape_config(model.config))
    q_out, kv_out = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    layers = adapter.decoder_layers(model)
    if len(layers) != shape.num_hidden_layers:
        raise ExportError(f"the model has {len(layers)} layers but its config says {shape.num_hidden_layers}")
    # Without an adapter the roles inside a layer are unknown: the generic backend proved its reload instead.
    for i, layer in enumerate([] if adapter.paths_only else layers):
        expected = adapter.expected_shapes(shape.hidden_size, shape.intermediate_size, q_out, kv_out)
        for path, dims in expected.items():
            got = tuple(layer.get_submodule(path).weight.shape)
            if got != dims:
                raise ExportError(
                    f"layer {i} {path} has weight shape {got}, but the config describes {dims} for every layer. "
                    "A standard config has one size per axis for all layers, so per-layer shapes cannot be "
                    "exported (or loaded by from_pretrained); prune uniformly (compress.prune does).")
    return shape


def _sample_ids(tokenizer, length: int = 32) -> torch.Tensor:
    text = ("Pruning removes the least important channels; distillation teaches the student to imitate the "
            "teacher's next-token distribution on ordinary text. ") * 4
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :length]
    return torch.cat([ids, ids.flip(1)], 0)


def export(
    model: nn.Module,
    tokenizer,
    out_dir: str | Path,
    formats: Sequence[str] = ("safetensors", "onnx"),
    quantize: str | None = None,
    *,
    overwrite: bool = False,
    parity_tolerance: float = 1e-4,
    eval_data: TextSource | None = None,
    eval_tokens: int = 4096,
    history: dict | None = None,
    name: str = "compressed student",
    extra_files: dict[str, str] | None = None,
) -> ExportReport:
    """Write ``model`` + ``tokenizer`` to ``out_dir`` in ``formats`` and check the ONNX graph against PyTorch.

    ``quantize="int8"`` adds a blockwise int8 ONNX model (int8 weights and int8 compute on CPU; see
    :func:`compress.export.onnx.quantize_int8`) and measures the perplexity it costs on
    ``eval_data`` (default: held-out pydocs or stdlib docstrings). ``history`` (a :class:`compress.Result` as a
    dict) feeds the model card. Raises :class:`ExportError` — and leaves no folder behind — when the model
    cannot be described by a standard config or the onnxruntime logits differ from PyTorch by more than
    ``parity_tolerance`` relative to the largest logit magnitude (at least 1). The model is moved to the CPU in fp32 for the check.
    """
    start = time.perf_counter()
    formats = check_export_args(formats, quantize)
    check_output_dir(out_dir, overwrite)
    shape = check_exportable(model)
    if "onnx" in formats:
        from .onnx import check_onnx_support

        check_onnx_support(model)
    model = model.to("cpu").float().eval()
    report = ExportReport(out_dir=str(out_dir), formats=formats, params=count_params(model), shape=shape.to_dict())

    with atomic_output_dir(out_dir, overwrite) as tmp, tempfile.TemporaryDirectory() as scratch:
        hf_dir = tmp if "safetensors" in formats else Path(scratch)
        model.save_pretrained(hf_dir, safe_serialization=True)
        tokenizer.save_pretrained(hf_dir)
        if "onnx" in formats:
            from . import onnx as ox

            layout = layout_for(model)
            ox.export_onnx(hf_dir, tmp / ONNX_DIR, layout.attention_implementation(layout.shape_config(model.config)))
            ort = ox.load_ort(tmp / ONNX_DIR)
            report.parity = ox.parity_check(model, ort, _sample_ids(tokenizer), parity_tolerance)
            if not report.parity["passed"]:
                raise ExportError(
                    f"onnxruntime logits differ from PyTorch by {report.parity['max_abs_diff']:.3g} "
                    f"({report.parity['relative_diff']:.3g} of the largest logit; tolerance {parity_tolerance:g}); "
                    "the export was discarded")
            if quantize == "int8":
                ox.quantize_int8(tmp / ONNX_DIR, tmp / INT8_DIR)
                text = default_eval_source() if eval_data is None else eval_data
                windows = eval_windows(tokenizer, text, EVAL_SEQ_LEN, eval_tokens)
                fp32 = ox.ort_perplexity(ort, windows)
                int8 = ox.ort_perplexity(ox.load_ort(tmp / INT8_DIR), windows)
                report.int8 = {"ppl_fp32": fp32, "ppl_int8": int8, "ppl_change": int8 / fp32 - 1,
                               "evaluation": describe_source(text), "eval_tokens": windows.numel(),
                               "eval_seq_len": EVAL_SEQ_LEN}
        (tmp / "README.md").write_text(
            model_card(name, report.params, report.shape, "onnx" in formats, report.int8, history))
        for file_name, text in (extra_files or {}).items():
            (tmp / file_name).write_text(text, encoding="utf-8")
        report.files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        report.seconds = round(time.perf_counter() - start, 2)
        (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
    return report


__all__ = ["ExportError", "ExportReport", "check_export_args", "check_exportable", "export"]
