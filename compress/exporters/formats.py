"""The export formats, by name: one table (:data:`REGISTRY`) and the checks of format and quantization names.

This module is the place to add a format: one :class:`FormatSpec` line in :data:`REGISTRY` naming the module
that checks, writes and describes it (the contract is :class:`compress.exporters.job.FormatHandler`). Everything
else (name checks, ``formats="auto"``, the export loop, the report's keys, the model card's sections, the
command line's summary) is read from the table.

It imports no exporter implementation (no ONNX, onnxruntime-genai or GGUF code, not even their modules), so a
config check such as :class:`compress.recipe.ExportSettings` can call :func:`check_export_args` cheaply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import CompressError, ConfigError


class ExportError(CompressError, RuntimeError):
    """Export failed or produced a model that does not match PyTorch."""


@dataclass(frozen=True)
class FormatSpec:
    """One export format: which module writes it, where, and what it reports.

    ``module`` is the module (imported only when the format is used) that checks, writes, reports and describes
    it, a :class:`compress.exporters.job.FormatHandler`; or None for the Hugging Face folder itself, which
    :func:`compress.export` always writes (every other format is built from it). Formats sharing a module are
    written by one call of it.
    """

    module: str | None
    #: Folders it writes in the export (removed again when ``formats="auto"`` falls back to the next format).
    folders: tuple[str, ...] = ()
    #: Keys of the export report (:meth:`ExportReport.to_dict`) its module fills; several formats may share one.
    report_keys: tuple[str, ...] = ()
    #: The precision its module writes it in (onnxruntime-genai: fp32, int8, int4).
    precision: str | None = None
    #: ``quantize="int8"`` means something for it: its module writes an int8 version beside it, or
    #: :attr:`int8_format` is added to the formats.
    takes_int8: bool = False
    #: The format ``quantize="int8"`` adds beside this one.
    int8_format: str | None = None


# In the order the formats are written (and their sections appear in the model card). Each format other than
# safetensors is a folder of its own name; "onnx-genai*" are onnxruntime-genai folders (fp32, int8, int4), the
# fastest on CPU (see compress/exporters/genai.py); Optimum's int8 ("onnx-int8/") comes with quantize="int8".
_ONNX, _GENAI, _GGUF = "compress.exporters.onnx", "compress.exporters.genai", "compress.exporters.gguf"
REGISTRY: dict[str, FormatSpec] = {
    "safetensors": FormatSpec(None),
    "onnx": FormatSpec(_ONNX, ("onnx", "onnx-int8"), ("parity", "int8"), takes_int8=True),
    "onnx-genai": FormatSpec(
        _GENAI, ("onnx-genai",), ("genai",), "fp32", takes_int8=True, int8_format="onnx-genai-int8"
    ),
    "onnx-genai-int8": FormatSpec(_GENAI, ("onnx-genai-int8",), ("genai",), "int8"),
    "onnx-genai-int4": FormatSpec(_GENAI, ("onnx-genai-int4",), ("genai",), "int4"),
    "gguf": FormatSpec(_GGUF, ("gguf",), ("gguf",)),
}
#: Every format name, in the order of :data:`REGISTRY`.
FORMATS: tuple[str, ...] = tuple(REGISTRY)
#: The export report's per-format keys, in the order ``to_dict()`` writes them.
REPORT_KEYS: tuple[str, ...] = tuple(dict.fromkeys(key for f in REGISTRY.values() for key in f.report_keys))
# formats="auto": safetensors plus the first of these the model can be written in and that passes its gates.
# Fastest first: onnxruntime-genai decodes ~1.8-2.6x faster than the Optimum export on CPU (BENCHMARKS.md).
AUTO = "auto"
DEPLOY_ORDER = ("onnx-genai", "onnx")
QUANTIZATIONS = (None, "int8")


def check_export_args(formats: Sequence[str] | str, quantize: str | None) -> list[str]:
    """Validate format and quantization names (cheap: callers check them before any expensive stage).

    ``formats`` is a list of names, or one name as a string (``"onnx"``), or ``"auto"`` (see
    :func:`compress.exporters.resolve_formats`); a string holding several names (``"onnx,safetensors"``) is
    refused: pass a list. Duplicates are refused. Returns the names as a list.
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
    _check_quantize(formats, quantize)
    return formats


def _check_quantize(formats: list[str], quantize: str | None) -> None:
    """``quantize`` is a known name, and one of ``formats`` (or ``"auto"``) has an int8 version."""
    if not (quantize is None or isinstance(quantize, str)) or quantize not in QUANTIZATIONS:
        raise ConfigError(f"unknown quantization {quantize!r}; choose from {QUANTIZATIONS}")
    takes_int8 = [name for name, f in REGISTRY.items() if f.takes_int8]
    if quantize and not {*takes_int8, AUTO} & set(formats):
        raise ConfigError(
            f"quantize={quantize!r} writes int8 versions of the ONNX models: add "
            f"{' or '.join(repr(name) for name in takes_int8)} to formats (or use formats='auto')"
        )


def with_int8(formats: Sequence[str], quantize: str | None) -> list[str]:
    """``formats`` plus, with ``quantize="int8"``, the int8 format each one adds (``onnx-genai`` adds
    ``onnx-genai-int8``) when it is not named already; a module that writes its own int8 version (Optimum's
    ``onnx-int8/`` beside ``onnx/``) adds nothing here."""
    out = list(formats)
    if quantize == "int8":
        for name in formats:
            extra = REGISTRY[name].int8_format
            if extra is not None and extra not in out:
                out.append(extra)
    return out


__all__ = [
    "AUTO",
    "DEPLOY_ORDER",
    "FORMATS",
    "QUANTIZATIONS",
    "REGISTRY",
    "REPORT_KEYS",
    "ExportError",
    "FormatSpec",
    "check_export_args",
    "with_int8",
]
