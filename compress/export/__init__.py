"""Export: the deployable student as safetensors (+ tokenizer, generation config, model card) and ONNX with KV
cache, verified against PyTorch in onnxruntime, optionally int8-quantized.

Everything is written into a temporary folder and renamed into place only after every check passed, so a
failed parity check leaves nothing that looks like a good export.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..data import TextSource, default_eval_source, describe_source
from ..errors import ConfigError, DataError
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


def check_export_args(formats: Sequence[str] | str, quantize: str | None) -> list[str]:
    """Validate format and quantization names (cheap: callers check them before any expensive stage).

    ``formats`` is a list of names, or one name as a string (``"onnx"``); a string holding several names
    (``"onnx,safetensors"``) is refused: pass a list. Duplicates are refused.
    """
    if isinstance(formats, str):
        if formats not in FORMATS:
            names = [f.strip() for f in formats.replace(",", " ").split() if f.strip()]
            hint = f"; for several formats pass a list: formats={names!r}" if len(names) > 1 else ""
            raise ConfigError(f"unknown export format {formats!r}{hint}; choose from {FORMATS}")
        formats = [formats]
    try:
        formats = list(formats)
    except TypeError:
        raise ConfigError(f"formats should be a list of format names from {FORMATS}, got {formats!r}") from None
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ConfigError(f"unknown export format(s) {unknown or formats}; choose from {FORMATS}")
    duplicates = sorted({f for f in formats if formats.count(f) > 1})
    if duplicates:
        raise ConfigError(f"export format(s) {duplicates} given more than once in formats={formats!r}; name each once")
    if not (quantize is None or isinstance(quantize, str)) or quantize not in QUANTIZATIONS:
        raise ConfigError(f"unknown quantization {quantize!r}; choose from {QUANTIZATIONS}")
    if quantize and "onnx" not in formats:
        raise ConfigError("quantize='int8' quantizes the ONNX model: add 'onnx' to formats")
    return formats


def check_materialized(model: nn.Module) -> None:
    """Refuse a model whose weights are on the meta device (a skeleton without values: nothing to prune or save)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch model (nn.Module), got {type(model).__name__}")
    meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise ConfigError(
            f"{type(model).__name__} has {len(meta)} parameter(s)/buffer(s) on the meta device ({meta[0]}, ...): they "
            "hold no values. Load the weights first (e.g. from_pretrained without device_map='meta', or "
            "model.to_empty(...) and load_state_dict)")


def _cpu_fp32_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` on the CPU in fp32, for export; the caller's model keeps its device,
    dtype, training mode, ``requires_grad`` flags and weights.

    Each parameter and buffer goes straight to the CPU in fp32 (no second copy on an accelerator); one already
    on the CPU in fp32 is shared with the copy rather than duplicated (export only reads weights). Tied
    weights stay tied.
    """
    memo: dict[int, object] = {}
    for t in [*model.parameters(), *model.buffers()]:
        data = t.detach().to("cpu")
        data = data.float() if data.is_floating_point() else data
        memo[id(t)] = nn.Parameter(data, requires_grad=False) if isinstance(t, nn.Parameter) else data
    try:
        clone = copy.deepcopy(model, memo)
    except Exception as exc:  # noqa: BLE001 - e.g. a model holding objects that cannot be copied
        raise ExportError(f"could not copy {type(model).__name__} for export ({type(exc).__name__}: {exc}); "
                          "export leaves the caller's model untouched and needs a copy of it") from exc
    return clone.to("cpu").float().eval()


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

    ``formats``: a list such as ``["safetensors", "onnx"]``, or one name as a string. ``quantize="int8"`` adds a
    blockwise int8 ONNX model (int8 weights and int8 compute on CPU; see
    :func:`compress.export.onnx.quantize_int8`) and measures the perplexity it costs on
    ``eval_data`` (default: held-out pydocs or stdlib docstrings). ``history`` (a :class:`compress.Result` as a
    dict) feeds the model card. Raises :class:`ExportError` — and leaves no folder behind — when the model
    cannot be described by a standard config or the onnxruntime logits differ from PyTorch by more than
    ``parity_tolerance`` relative to the largest logit magnitude (at least 1). The export works on a CPU fp32
    copy: ``model`` itself (device, dtype, training mode, ``requires_grad``, weights) is left as it was.
    ``overwrite=True`` replaces the whole folder, including files compress did not write; a folder holding
    ``eval_data`` is refused even then.
    """
    start = time.perf_counter()
    formats = check_export_args(formats, quantize)
    if isinstance(parity_tolerance, bool) or not isinstance(parity_tolerance, (int, float)) \
            or not math.isfinite(parity_tolerance) or parity_tolerance < 0:
        raise ConfigError(f"parity_tolerance should be a finite number >= 0 (default 1e-4), got {parity_tolerance!r}")
    if isinstance(eval_tokens, bool) or not isinstance(eval_tokens, int) or eval_tokens < 1:
        raise ConfigError(f"eval_tokens should be a positive integer, got {eval_tokens!r}")
    if tokenizer is None or not hasattr(tokenizer, "save_pretrained"):
        raise DataError(f"export needs the model's Hugging Face tokenizer (with save_pretrained), got "
                        f"{type(tokenizer).__name__}")
    inputs = {"evaluation data": eval_data}
    check_output_dir(out_dir, overwrite, inputs=inputs)
    check_materialized(model)
    shape = check_exportable(model)
    if "onnx" in formats:
        from .onnx import check_onnx_support

        check_onnx_support(model)
    model = _cpu_fp32_copy(model)  # the caller's model stays on its device, in its dtype and mode
    report = ExportReport(out_dir=str(out_dir), formats=formats, params=count_params(model), shape=shape.to_dict())

    with atomic_output_dir(out_dir, overwrite, inputs=inputs) as tmp, tempfile.TemporaryDirectory() as scratch:
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


__all__ = ["ExportError", "ExportReport", "check_export_args", "check_exportable", "check_materialized", "export"]
