"""The contract between :func:`compress.export` and each format's module: what a writer is given
(:class:`ExportJob`) and what the module provides (:class:`FormatHandler`).

A format's module (named in :data:`compress.exporters.formats.REGISTRY`) checks that the format can be written
for a model and tokenizer before any work, writes its folders into the export and checks them (raising
:class:`~compress.exporters.formats.ExportError` when a check fails: the export is then discarded, or with
``formats="auto"`` the next format is tried), returns its entries of the export report, and gives its section
of the model card.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from ..models import layout_for

if TYPE_CHECKING:
    from ..data import TextSource
    from .card import CardSection

# Window length of the perplexity checks of quantized exports, as in compress.evaluate.perplexity.
EVAL_SEQ_LEN = 512


@dataclass(frozen=True)
class ExportJob:
    """What every format's writer is given: the model (a CPU fp32 copy, never the caller's), its tokenizer, the
    Hugging Face folder the formats are built from, the folder to write into, and the checks' settings."""

    model: nn.Module
    tokenizer: Any
    #: The saved model (config, safetensors, tokenizer): inside ``out`` when safetensors is exported, else scratch.
    hf_dir: Path
    #: The export's temporary folder (renamed into place after every check passed); each format writes its own
    #: folders in it.
    out: Path
    quantize: str | None
    #: Largest logit difference from PyTorch allowed, relative to the largest logit magnitude (at least 1).
    tolerance: float
    #: Held-out text for the perplexity of quantized exports, and how many tokens of it to score.
    text: TextSource
    eval_tokens: int

    def sample_ids(self, length: int = 32) -> torch.Tensor:
        """Two rows of ``length`` token ids (a text and its reverse) for logit parity checks."""
        text = (
            "Pruning removes the least important channels; distillation teaches the student to imitate the "
            "teacher's next-token distribution on ordinary text. "
        ) * 4
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :length]
        return torch.cat([ids, ids.flip(1)], 0)

    def context_seq_len(self) -> int:
        """:data:`EVAL_SEQ_LEN`, or the model's context length when that is shorter."""
        context = getattr(layout_for(self.model).shape_config(self.model.config), "max_position_embeddings", None)
        return min(EVAL_SEQ_LEN, context or EVAL_SEQ_LEN)


class FormatHandler(Protocol):
    """What the module of a format (or of several formats written together) provides; a module satisfies it
    with module-level names."""

    #: What the progress bar says is checked after writing: ``export <formats> + <CHECKS>``.
    CHECKS: str

    def check_support(self, model: nn.Module, tokenizer: Any) -> None:
        """Raise :class:`~compress.exporters.formats.ExportError` before any work when the model (or the
        tokenizer, when not None) cannot be written in this module's formats."""

    def write_formats(self, job: ExportJob, formats: list[str]) -> dict[str, dict]:
        """Write and check ``formats`` (this module's, in registry order) into ``job.out``; return the export
        report's entries, keyed by the formats' ``report_keys``."""

    def card_section(self, results: Mapping[str, dict]) -> CardSection:
        """The model card's text for what was written, from the export report's entries."""

    def summary_lines(self, results: Mapping[str, dict], out_dir: Path) -> list[str]:
        """The command line's lines for what was written (``compress`` prints them after a run), from the
        export report's entries; ``out_dir`` is the output folder."""


__all__ = ["EVAL_SEQ_LEN", "ExportJob", "FormatHandler"]
