"""Export: the deployable student as safetensors (+ tokenizer, generation config, model card) and ONNX with KV
cache, verified against PyTorch in onnxruntime, optionally int8-quantized.

Everything is written into a temporary folder and renamed into place only after every check passed, so a
failed parity check leaves nothing that looks like a good export.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from ..data import TextSource, default_eval_source, describe_source
from ..errors import ConfigError, DataError
from ..evaluate import eval_windows, windows_perplexity
from ..io import atomic_output_dir, check_output_dir
from ..models import layout_for
from ..progress import bar
from ..pruning.shape import ModelShape, count_params
from ..validate import check_materialized
from .card import model_card
from .genai import GENAI_FORMATS
from .onnx import INT8_DIR, ONNX_DIR, ExportError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Each format other than safetensors is a folder of its own name; "onnx-genai*" are onnxruntime-genai folders
# (fp32, int8, int4), the fastest on CPU (see compress/exporters/genai.py).
FORMATS = ("safetensors", "onnx", *GENAI_FORMATS, "gguf")
GGUF_DIR = "gguf"
# f16 GGUF read back by transformers vs the fp32 model: fp16 rounding of the weights alone moves logits by
# ~2e-3 of the largest one on SmolLM2 (a wrong conversion moves them by orders of magnitude more).
GGUF_F16_TOLERANCE = 5e-3
# formats="auto": safetensors plus the first of these the model can be written in and that passes its gates.
# Fastest first: onnxruntime-genai decodes ~1.8-2.6x faster than the Optimum export on CPU (BENCHMARKS.md).
AUTO = "auto"
DEPLOY_ORDER = ("onnx-genai", "onnx")
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
    genai: dict = field(default_factory=dict)
    gguf: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)  # formats="auto": format -> why it was not written
    params: int = 0
    shape: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def check_export_args(formats: Sequence[str] | str, quantize: str | None) -> list[str]:
    """Validate format and quantization names (cheap: callers check them before any expensive stage).

    ``formats`` is a list of names, or one name as a string (``"onnx"``), or ``"auto"`` (see
    :func:`resolve_formats`); a string holding several names (``"onnx,safetensors"``) is refused: pass a list.
    Duplicates are refused.
    """
    if isinstance(formats, str):
        if formats not in (*FORMATS, AUTO):
            names = [f.strip() for f in formats.replace(",", " ").split() if f.strip()]
            hint = f"; for several formats pass a list: formats={names!r}" if len(names) > 1 else ""
            raise ConfigError(f"unknown export format {formats!r}{hint}; choose from {FORMATS} or 'auto'")
        formats = [formats]
    try:
        formats = list(formats)
    except TypeError:
        raise ConfigError(f"formats should be a list of format names from {FORMATS}, got {formats!r}") from None
    if AUTO in formats and formats != [AUTO]:
        raise ConfigError(f"formats={formats!r}: 'auto' picks the formats itself; give it alone or name the formats")
    unknown = [f for f in formats if f not in (*FORMATS, AUTO)]
    if unknown or not formats:
        raise ConfigError(f"unknown export format(s) {unknown or formats}; choose from {FORMATS} or 'auto'")
    duplicates = sorted({f for f in formats if formats.count(f) > 1})
    if duplicates:
        raise ConfigError(f"export format(s) {duplicates} given more than once in formats={formats!r}; name each once")
    if not (quantize is None or isinstance(quantize, str)) or quantize not in QUANTIZATIONS:
        raise ConfigError(f"unknown quantization {quantize!r}; choose from {QUANTIZATIONS}")
    if quantize and not {"onnx", "onnx-genai", AUTO} & set(formats):
        raise ConfigError(
            "quantize='int8' writes int8 versions of the ONNX models: add 'onnx' or 'onnx-genai' to "
            "formats (or use formats='auto')"
        )
    return formats


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
        raise ExportError(
            f"could not copy {type(model).__name__} for export ({type(exc).__name__}: {exc}); "
            "export leaves the caller's model untouched and needs a copy of it"
        ) from exc
    return clone.to("cpu").float().eval()


def check_exportable(model: nn.Module) -> ModelShape:
    """A causal LM whose every layer has the shape its config states (what a standard config can describe)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or not model.can_generate() or model.get_output_embeddings() is None:
        raise ExportError(
            f"{type(model).__name__} is not a Hugging Face causal language model "
            "(AutoModelForCausalLM); only causal LMs can be exported"
        )
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
            got = tuple(cast(torch.Tensor, layer.get_submodule(path).weight).shape)
            if got != dims:
                raise ExportError(
                    f"layer {i} {path} has weight shape {got}, but the config describes {dims} for every layer. "
                    "A standard config has one size per axis for all layers, so per-layer shapes cannot be "
                    "exported (or loaded by from_pretrained); prune uniformly (compress.prune does)."
                )
    return shape


def _export_optimum(
    model: nn.Module,
    tokenizer,
    hf_dir: Path,
    tmp: Path,
    quantize: str | None,
    tolerance: float,
    text: TextSource,
    eval_tokens: int,
    report: ExportReport,
) -> None:
    """The Optimum ONNX folder (``onnx/``), its parity gate, and with ``quantize="int8"`` ``onnx-int8/`` and its
    perplexity change."""
    from . import onnx as ox

    layout = layout_for(model)
    ox.export_onnx(hf_dir, tmp / ONNX_DIR, layout.attention_implementation(layout.shape_config(model.config)))
    ort = ox.load_ort(tmp / ONNX_DIR)
    report.parity = ox.parity_check(model, ort, _sample_ids(tokenizer), tolerance)
    if not report.parity["passed"]:
        raise ExportError(
            f"onnxruntime logits differ from PyTorch by {report.parity['max_abs_diff']:.3g} "
            f"({report.parity['relative_diff']:.3g} of the largest logit; tolerance {tolerance:g}); "
            "the export was discarded"
        )
    if quantize == "int8":
        ox.quantize_int8(tmp / ONNX_DIR, tmp / INT8_DIR)
        windows = eval_windows(tokenizer, text, EVAL_SEQ_LEN, eval_tokens)
        fp32 = ox.ort_perplexity(ort, windows)
        int8 = ox.ort_perplexity(ox.load_ort(tmp / INT8_DIR), windows)
        report.int8 = {
            "ppl_fp32": fp32,
            "ppl_int8": int8,
            "ppl_change": int8 / fp32 - 1,
            "evaluation": describe_source(text),
            "eval_tokens": windows.numel(),
            "eval_seq_len": EVAL_SEQ_LEN,
        }


def _with_int8(deploy_format: str, quantize: str | None) -> list[str]:
    """``deploy_format`` plus its int8 folder when one is asked for and the format names it (onnxruntime-genai's
    int8 is a format of its own; Optimum's is written by ``quantize`` beside ``onnx/``)."""
    return [deploy_format] + (["onnx-genai-int8"] if quantize == "int8" and deploy_format == "onnx-genai" else [])


def resolve_formats(
    model: nn.Module, formats: list[str], quantize: str | None, tokenizer=None
) -> tuple[list[str], list[str], dict]:
    """The formats to write, the formats to fall back to, and the formats skipped with the reason.

    Named formats are written or refused (before any work) as they are; ``quantize="int8"`` adds
    ``onnx-genai-int8`` beside ``onnx-genai``. ``["auto"]`` is safetensors plus the fastest deployment format
    (:data:`DEPLOY_ORDER`) this model can be written in; if that one fails its gates at export time, the next one
    is written instead, and the report says why (``skipped``).
    """
    if formats != [AUTO]:
        check_format_support(model, formats, tokenizer)
        if quantize == "int8" and "onnx-genai" in formats and "onnx-genai-int8" not in formats:
            formats = [*formats, "onnx-genai-int8"]
        return formats, [], {}
    usable, skipped = [], {}
    for fmt in DEPLOY_ORDER:
        try:
            check_format_support(model, [fmt])
            usable.append(fmt)
        except ExportError as exc:
            skipped[fmt] = str(exc)
    if not usable:
        return ["safetensors"], [], skipped
    return ["safetensors", *_with_int8(usable[0], quantize)], usable[1:], skipped


def check_format_support(model: nn.Module, formats: Sequence[str], tokenizer=None) -> None:
    """Refuse, before any work, a model (or tokenizer) that one of ``formats`` cannot be written for."""
    if "onnx" in formats:
        from .onnx import check_onnx_support

        check_onnx_support(model)
    if any(f in GENAI_FORMATS for f in formats):
        from .genai import check_genai_support

        check_genai_support(model)
    if "gguf" in formats:
        from .gguf import check_gguf_support

        check_gguf_support(model, tokenizer)


def _sample_text() -> str:
    """A short text with code, unicode, digits and runs of whitespace, for tokenizer agreement checks."""
    return (
        'def mean(xs: list[float]) -> float:\n    """Average of 12 values."""\n    return sum(xs) / len(xs)'
        "\n\n\tNaïve café, 東京, Ωmega — don't stop; 3.14159 2026-11-26   end\n"
    )


def _export_genai(
    model: nn.Module,
    tokenizer,
    hf_dir: Path,
    tmp: Path,
    formats: list[str],
    tolerance: float,
    text: TextSource,
    eval_tokens: int,
) -> dict:
    """Build each onnxruntime-genai folder and check it with onnxruntime-genai itself: config repair and tokenizer
    agreement for all, logits against PyTorch for fp32 (the gate), perplexity change against PyTorch fp32 for
    int8/int4 (measured and stated). An error of the runtime becomes an :class:`ExportError`."""
    from . import genai

    results: dict[str, dict] = {}
    reference: dict = {}  # PyTorch's perplexity windows and figure, shared by the quantized folders
    for fmt in formats:
        try:
            out = genai.build(hf_dir, tmp / fmt, GENAI_FORMATS[fmt])
            results[fmt] = _check_genai_folder(model, tokenizer, out, tolerance, text, eval_tokens, reference)
        except ExportError:
            raise
        except (RuntimeError, KeyError, ValueError, OSError) as exc:  # the runtime, or a folder it wrote wrong
            raise ExportError(
                f"onnxruntime-genai could not run {fmt}: {type(exc).__name__}: {exc}; the export was discarded"
            ) from exc
    return results


def _check_genai_folder(
    model: nn.Module, tokenizer, out: Path, tolerance: float, text: TextSource, eval_tokens: int, reference: dict
) -> dict:
    from . import genai

    fmt, precision = out.name, GENAI_FORMATS[out.name]
    entry: dict = {
        "precision": precision,
        "config_changes": genai.repair_config(out, model.config, getattr(model, "generation_config", None)),
    }
    og_model = genai.load(out)
    entry["tokenizer"] = genai.check_tokenizer(og_model, tokenizer, _sample_text())
    if precision == "fp32":
        parity = entry["parity"] = genai.parity_check(model, og_model, _sample_ids(tokenizer), tolerance)
        if not parity["passed"]:
            raise ExportError(
                f"onnxruntime-genai logits ({fmt}) differ from PyTorch by {parity['max_abs_diff']:.3g} "
                f"({parity['relative_diff']:.3g} of the largest logit; tolerance {tolerance:g}); the export was "
                "discarded"
            )
        return entry
    if not reference:  # windows no longer than the model's context
        context = getattr(layout_for(model).shape_config(model.config), "max_position_embeddings", None)
        seq_len = min(EVAL_SEQ_LEN, context or EVAL_SEQ_LEN)
        reference["ids"] = eval_windows(tokenizer, text, seq_len, eval_tokens)
        reference["ppl"] = windows_perplexity(model, reference["ids"])
    ids, fp32 = reference["ids"], reference["ppl"]
    ppl = genai.perplexity(og_model, ids)
    if not math.isfinite(ppl):
        raise ExportError(
            f"the {precision} onnxruntime-genai model ({fmt}) gives a non-finite perplexity; the export was discarded"
        )
    entry["perplexity"] = {
        "ppl_fp32": fp32,
        f"ppl_{precision}": ppl,
        "ppl_change": ppl / fp32 - 1,
        "evaluation": describe_source(text),
        "eval_tokens": ids.numel(),
        "eval_seq_len": ids.shape[1],
        "reference": "PyTorch fp32",
    }
    return entry


def _export_gguf(model: nn.Module, tokenizer, hf_dir: Path, out: Path, text: TextSource, eval_tokens: int) -> dict:
    """f16 and q8_0 GGUF files (llama.cpp's converter), read back by transformers' GGUF loader: the f16 file's
    logits must match the model within :data:`GGUF_F16_TOLERANCE` (the gate); both files' perplexity change on
    held-out text is measured and stated."""
    from . import gguf

    files = gguf.export_gguf(hf_dir, out)
    check = gguf.verify_gguf(model, tokenizer, files["f16"], tolerance=GGUF_F16_TOLERANCE)
    if not check["passed"] or not check["tokenizer_match"]:
        what = (
            "tokenizer reads text differently"
            if check["passed"]
            else (
                f"logits differ from PyTorch by {check['relative_diff']:.3g} of the largest logit (tolerance "
                f"{GGUF_F16_TOLERANCE:g})"
            )
        )
        raise ExportError(f"the f16 GGUF file read back by transformers: {what}; the export was discarded")
    context = getattr(layout_for(model).shape_config(model.config), "max_position_embeddings", None)
    windows = eval_windows(tokenizer, text, min(EVAL_SEQ_LEN, context or EVAL_SEQ_LEN), eval_tokens)
    result = {"f16": {**check, "gguf_file": files["f16"].name}}
    for kind, path in files.items():
        ppl = gguf.gguf_perplexity(model, path, windows)
        result.setdefault(kind, {"gguf_file": path.name})
        result[kind]["perplexity"] = {**ppl, "gguf_file": path.name, "evaluation": describe_source(text)}
    return result


def _sample_ids(tokenizer, length: int = 32) -> torch.Tensor:
    text = (
        "Pruning removes the least important channels; distillation teaches the student to imitate the "
        "teacher's next-token distribution on ordinary text. "
    ) * 4
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :length]
    return torch.cat([ids, ids.flip(1)], 0)


def export(
    model: nn.Module,
    tokenizer,
    out_dir: str | Path,
    formats: Sequence[str] | str = AUTO,
    quantize: str | None = None,
    *,
    overwrite: bool = False,
    parity_tolerance: float = 1e-4,
    eval_data: TextSource | None = None,
    eval_tokens: int = 4096,
    history: dict | None = None,
    name: str = "compressed student",
    extra_files: dict[str, str | bytes] | None = None,
) -> ExportReport:
    """Write ``model`` + ``tokenizer`` to ``out_dir`` in ``formats`` and check every ONNX model against PyTorch.

    ``formats``: ``"auto"`` (the default: safetensors plus the fastest deployment format that passes its gates,
    onnxruntime-genai first, then Optimum ONNX; see :func:`resolve_formats`), a list such as
    ``["safetensors", "onnx", "onnx-genai"]``, or one name as a string. ``"onnx-genai"``, ``"onnx-genai-int8"``
    and ``"onnx-genai-int4"`` are onnxruntime-genai folders (:mod:`compress.exporters.genai`): the fp32 one must match
    PyTorch's logits, the quantized ones have their perplexity change measured. ``quantize="int8"`` adds a
    blockwise int8 version of each ONNX model (int8 weights and int8 compute on CPU; see
    :func:`compress.exporters.onnx.quantize_int8`) and measures the perplexity it costs on
    ``eval_data`` (default: held-out pydocs or stdlib docstrings). ``history`` (a :class:`compress.Result` as a
    dict) feeds the model card; ``extra_files`` (name -> text or bytes; a name may hold a subfolder) are written
    into the folder with the rest. Raises :class:`ExportError` — and leaves no folder behind — when the model
    cannot be described by a standard config, the onnxruntime logits differ from PyTorch by more than
    ``parity_tolerance`` relative to the largest logit magnitude (at least 1), or onnxruntime-genai's tokenizer
    reads text differently from the model's. The export works on a CPU fp32
    copy: ``model`` itself (device, dtype, training mode, ``requires_grad``, weights) is left as it was.
    ``overwrite=True`` replaces the whole folder, including files compress did not write; a folder holding
    ``eval_data`` is refused even then.
    """
    start = time.perf_counter()
    formats = check_export_args(formats, quantize)
    if (
        isinstance(parity_tolerance, bool)
        or not isinstance(parity_tolerance, (int, float))
        or not math.isfinite(parity_tolerance)
        or parity_tolerance < 0
    ):
        raise ConfigError(f"parity_tolerance should be a finite number >= 0 (default 1e-4), got {parity_tolerance!r}")
    if isinstance(eval_tokens, bool) or not isinstance(eval_tokens, int) or eval_tokens < 1:
        raise ConfigError(f"eval_tokens should be a positive integer, got {eval_tokens!r}")
    if tokenizer is None or not hasattr(tokenizer, "save_pretrained"):
        raise DataError(
            f"export needs the model's Hugging Face tokenizer (with save_pretrained), got {type(tokenizer).__name__}"
        )
    inputs = {"evaluation data": eval_data}
    check_output_dir(out_dir, overwrite, inputs=inputs)
    check_materialized(model)
    shape = check_exportable(model)
    formats, fallbacks, skipped = resolve_formats(model, formats, quantize, tokenizer)
    model = _cpu_fp32_copy(model)  # the caller's model stays on its device, in its dtype and mode
    report = ExportReport(
        out_dir=str(out_dir), formats=formats, params=count_params(model), shape=shape.to_dict(), skipped=skipped
    )

    with (
        atomic_output_dir(out_dir, overwrite, inputs=inputs) as tmp,
        tempfile.TemporaryDirectory() as scratch,
        bar(total=1 + len(set(formats) - {"safetensors"}), desc="export safetensors", unit="format") as steps,
    ):
        hf_dir = tmp if "safetensors" in formats else Path(scratch)
        cast("PreTrainedModel", model).save_pretrained(hf_dir, safe_serialization=True)  # check_exportable
        tokenizer.save_pretrained(hf_dir)
        steps.update(1)
        text = default_eval_source() if eval_data is None else eval_data
        while True:
            try:
                if "onnx" in formats:
                    steps.set_description("export onnx + parity")
                    _export_optimum(
                        model, tokenizer, hf_dir, tmp, quantize, parity_tolerance, text, eval_tokens, report
                    )
                    steps.update(1)
                genai_formats = [f for f in formats if f in GENAI_FORMATS]
                if genai_formats:
                    steps.set_description(f"export {', '.join(genai_formats)} + checks")
                    report.genai = _export_genai(
                        model, tokenizer, hf_dir, tmp, genai_formats, parity_tolerance, text, eval_tokens
                    )
                    steps.update(len(genai_formats))
                if "gguf" in formats:
                    steps.set_description("export gguf + perplexity")
                    report.gguf = _export_gguf(model, tokenizer, hf_dir, tmp / GGUF_DIR, text, eval_tokens)
                    steps.update(1)
                break
            except ExportError as exc:  # formats="auto": the next-fastest format that passes its gates
                if not fallbacks:
                    raise
                failed = [f for f in formats if f != "safetensors"]
                for folder in failed + [INT8_DIR]:
                    shutil.rmtree(tmp / folder, ignore_errors=True)
                report.skipped[failed[0]] = str(exc)
                formats = [f for f in formats if f == "safetensors"] + _with_int8(fallbacks.pop(0), quantize)
                report.formats, report.parity, report.int8, report.genai = formats, {}, {}, {}
        (tmp / "README.md").write_text(
            model_card(
                name, report.params, report.shape, "onnx" in formats, report.int8, history, report.genai, report.gguf
            )
        )
        for file_name, content in (extra_files or {}).items():
            path = tmp / file_name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content, encoding="utf-8")
        report.files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        report.seconds = round(time.perf_counter() - start, 2)
        (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
    return report


__all__ = [
    "AUTO",
    "DEPLOY_ORDER",
    "GGUF_DIR",
    "ExportError",
    "ExportReport",
    "check_export_args",
    "check_exportable",
    "check_format_support",
    "check_materialized",
    "export",
    "resolve_formats",
]
