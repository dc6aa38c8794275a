"""Which formats an export writes, and the modules that write them: each format's module
(:data:`compress.exporters.formats.REGISTRY`) is imported here, only when the format is used, so ONNX,
onnxruntime-genai and GGUF code loads only for an export that needs it.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any, cast

from torch import nn

from .formats import AUTO, DEPLOY_ORDER, REGISTRY, ExportError, with_int8
from .job import FormatHandler


def handler(module: str) -> FormatHandler:
    """The format module named ``module`` (a :class:`FormatHandler`), imported on first use."""
    return cast(FormatHandler, importlib.import_module(module))


def handlers_for(formats: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``(module, its formats)`` for every format module ``formats`` need, in registry order (which is the order
    they are written in); the Hugging Face folder (written by :func:`compress.export` itself) is left out."""
    groups: dict[str, list[str]] = {}
    for name, spec in REGISTRY.items():
        if name in formats and spec.module is not None:
            groups.setdefault(spec.module, []).append(name)
    return list(groups.items())


def check_format_support(model: nn.Module, formats: Sequence[str], tokenizer: Any = None) -> None:
    """Refuse, before any work, a model (or tokenizer) that one of ``formats`` cannot be written for."""
    for module, _ in handlers_for(formats):
        handler(module).check_support(model, tokenizer)


def resolve_formats(
    model: nn.Module, formats: list[str], quantize: str | None, tokenizer: Any = None
) -> tuple[list[str], list[str], dict]:
    """The formats to write, the formats to fall back to, and the formats skipped with the reason.

    ``formats`` have passed :func:`~compress.exporters.formats.check_export_args`. Named formats are written or
    refused (before any work) as they are; ``quantize="int8"`` adds ``onnx-genai-int8`` beside ``onnx-genai``.
    ``["auto"]`` is safetensors plus the fastest deployment format (:data:`DEPLOY_ORDER`) this model can be
    written in; if that one fails its gates at export time, the next one is written instead, and the report says
    why (``skipped``).
    """
    if formats != [AUTO]:
        formats = with_int8(formats, quantize)
        check_format_support(model, formats, tokenizer)
        return formats, [], {}
    usable, skipped = [], {}
    for fmt in DEPLOY_ORDER:
        try:
            check_format_support(model, [fmt], tokenizer)
            usable.append(fmt)
        except ExportError as exc:
            skipped[fmt] = str(exc)
    if not usable:
        return ["safetensors"], [], skipped
    return ["safetensors", *with_int8([usable[0]], quantize)], usable[1:], skipped


__all__ = ["check_format_support", "handler", "handlers_for", "resolve_formats"]
