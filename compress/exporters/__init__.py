"""Export: the deployable student as safetensors (+ tokenizer, generation config, model card) and ONNX with KV
cache, verified against PyTorch in onnxruntime, optionally int8-quantized; onnxruntime-genai folders and GGUF
files, each checked against PyTorch too.

The formats are listed in one table, :data:`compress.exporters.formats.REGISTRY`: name -> the module that checks,
writes, reports and describes it (:mod:`~compress.exporters.onnx`, :mod:`~compress.exporters.genai`,
:mod:`~compress.exporters.gguf`), imported only when the format is used. :func:`export` runs them.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..data import TextSource, check_source, default_eval_source
from ..errors import ConfigError, DataError
from ..io import atomic_output_dir, check_output_dir
from ..models import layout_for
from ..progress import bar
from ..pruning.shape import ModelShape, count_params
from ..validate import check_materialized
from .card import CardSection, model_card
from .formats import (
    AUTO,
    DEPLOY_ORDER,
    REGISTRY,
    REPORT_KEYS,
    ExportError,
    check_export_args,
    with_int8,
)
from .formats import FORMATS as FORMATS  # importable from here as before
from .formats import QUANTIZATIONS as QUANTIZATIONS
from .job import EVAL_SEQ_LEN as EVAL_SEQ_LEN
from .job import ExportJob
from .resolve import check_format_support, handler, handlers_for, resolve_formats

if TYPE_CHECKING:
    from transformers import PreTrainedModel

GGUF_DIR = REGISTRY["gguf"].folders[0]
REPORT_FILE = "export_report.json"


def _result(key: str) -> Any:
    """A read/write attribute for the report entry ``key`` (kept as attributes: ``report.parity``, ...)."""

    def get(self: ExportReport) -> dict:
        return self.results.setdefault(key, {})

    def set_(self: ExportReport, value: dict) -> None:
        self.results[key] = value

    return property(get, set_, doc=f"The export report's ``{key}`` entry (empty when no format wrote it).")


@dataclass
class ExportReport:
    """What :func:`export` wrote and measured.

    ``results`` holds each format's entries, keyed as in :data:`~compress.exporters.formats.REPORT_KEYS`
    (``parity`` and ``int8``: Optimum ONNX; ``genai``: onnxruntime-genai folders; ``gguf``: GGUF files), also
    readable as attributes (``report.genai``). :meth:`to_dict` gives every key, empty when not written.
    """

    out_dir: str
    formats: list[str]
    files: dict = field(default_factory=dict)
    results: dict[str, dict] = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)  # formats="auto": format -> why it was not written
    params: int = 0
    shape: dict = field(default_factory=dict)
    seconds: float = 0.0

    parity = _result("parity")
    int8 = _result("int8")
    genai = _result("genai")
    gguf = _result("gguf")

    def to_dict(self) -> dict:
        """The report as JSON-ready data (a deep copy): ``export_report.json`` and the run report's ``export``
        stage. Every format's keys appear, in registry order, between ``files`` and ``skipped``."""
        results = {key: self.results.get(key, {}) for key in REPORT_KEYS}
        results.update({k: v for k, v in self.results.items() if k not in results})
        data: dict[str, Any] = {"out_dir": self.out_dir, "formats": self.formats, "files": self.files, **results}
        data.update(skipped=self.skipped, params=self.params, shape=self.shape, seconds=self.seconds)
        return copy.deepcopy(data)


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


def _check_settings(parity_tolerance: float, eval_tokens: int, tokenizer: Any) -> None:
    """Refuse bad export settings and a missing tokenizer (cheap: before any work)."""
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
    _check_settings(parity_tolerance, eval_tokens, tokenizer)
    if eval_data is not None:  # a typo in its path is refused now, not after the formats are built
        check_source(eval_data)
    inputs = {"evaluation data": eval_data}
    check_output_dir(out_dir, overwrite, inputs=inputs)
    check_materialized(model)
    shape = check_exportable(model)
    auto = formats == [AUTO]
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
        job = ExportJob(model, tokenizer, hf_dir, tmp, quantize, parity_tolerance, text, eval_tokens)
        _write_formats(job, report, fallbacks, steps, auto)
        card = model_card(name, report.params, report.shape, history=history, sections=_card_sections(report))
        (tmp / "README.md").write_text(card)
        _write_extra_files(tmp, extra_files)
        report.files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        report.seconds = round(time.perf_counter() - start, 2)
        (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
    return report


def _write_formats(job: ExportJob, report: ExportReport, fallbacks: list[str], steps: Any, auto: bool) -> None:
    """Write and check ``report.formats`` (besides the Hugging Face folder) into ``job.out``, one format module
    after another, filling ``report.results``. With ``formats="auto"`` (``auto``) a format that fails its gates
    is removed and the next of ``fallbacks`` written instead, or none when no fallback is left (the folder then
    holds safetensors alone); ``report.skipped`` says why. Named formats propagate the error.
    """
    while True:
        try:
            for module, names in handlers_for(report.formats):
                writer = handler(module)
                steps.set_description(f"export {', '.join(names)} + {writer.CHECKS}")
                report.results.update(writer.write_formats(job, names))
                steps.update(len(names))
            if auto:  # the formats after the one written were never needed: nothing to explain about them
                written = [DEPLOY_ORDER.index(f) for f in report.formats if f in DEPLOY_ORDER]
                for later in DEPLOY_ORDER[min(written) + 1 :] if written else ():
                    report.skipped.pop(later, None)
            return
        except ExportError as exc:  # formats="auto": the next-fastest format that passes its gates
            if not auto:
                raise
            failed = [f for f in report.formats if REGISTRY[f].module is not None]
            for folder in dict.fromkeys(d for f in failed for d in REGISTRY[f].folders):
                shutil.rmtree(job.out / folder, ignore_errors=True)
            report.skipped[failed[0]] = str(exc)
            kept = [f for f in report.formats if REGISTRY[f].module is None]
            report.formats = kept + (with_int8([fallbacks.pop(0)], job.quantize) if fallbacks else [])
            report.results = {}


def _card_sections(report: ExportReport) -> dict[str, CardSection]:
    """Each written format's part of the model card, keyed by the module that wrote it, in registry order."""
    return {module: handler(module).card_section(report.results) for module, _ in handlers_for(report.formats)}


def _write_extra_files(folder: Path, extra_files: dict[str, str | bytes] | None) -> None:
    """``extra_files`` (name -> text or bytes; a name may hold a subfolder) written into ``folder``."""
    for file_name, content in (extra_files or {}).items():
        path = folder / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")


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
