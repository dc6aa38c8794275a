"""Calibration: token windows for importance estimation, and one streamed, hooked forward pass over them.

Hooks reduce every activation to a per-channel statistic as it is produced, so memory stays at the size of the
statistics (a few vectors per layer), never the activations.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import TextSource, describe_source, pack_tokens
from .errors import ConfigError, DataError


@dataclass
class CalibrationConfig:
    """How much text importance estimation sees. Minitron uses 1024 samples; fewer is faster and noisier."""

    num_samples: int = 1024
    seq_len: int = 512
    batch_size: int = 8
    min_samples: int = 8

    def __post_init__(self) -> None:
        for name in ("num_samples", "seq_len", "batch_size", "min_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"CalibrationConfig.{name} should be a positive integer, got {value!r}")
        if self.seq_len < 2:
            raise ConfigError(f"CalibrationConfig.seq_len should be at least 2, got {self.seq_len}")
        if self.min_samples > self.num_samples:
            raise ConfigError(
                f"CalibrationConfig.min_samples={self.min_samples} exceeds num_samples={self.num_samples}"
            )


@dataclass
class Calibration:
    """Packed calibration windows ``[N, seq_len]`` plus where they came from."""

    input_ids: torch.Tensor
    batch_size: int = 8
    source: str = "<tensor>"

    @property
    def num_samples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def batches(self, limit: int | None = None) -> Iterator[torch.Tensor]:
        ids = self.input_ids if limit is None else self.input_ids[:limit]
        yield from ids.split(self.batch_size)


def check_tokenizer_matches(model: nn.Module, tokenizer) -> None:
    """A tokenizer whose ids exceed the model's embedding table belongs to another model."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise DataError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows: they do not "
            "belong together. Load the tokenizer saved with this model."
        )


def prepare_calibration(
    model: nn.Module, tokenizer, source: TextSource | torch.Tensor | Calibration, config: CalibrationConfig
) -> Calibration:
    """Turn text (or token ids) into :class:`Calibration` windows, refusing data too short to be meaningful."""
    if isinstance(source, Calibration):
        ids, where = source.input_ids, source.source
    elif isinstance(source, torch.Tensor):
        ids, where = source, "<tensor>"
        if ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise DataError(f"calibration token ids must be an integer [N, seq_len] tensor, got {tuple(ids.shape)}")
        ids = ids[: config.num_samples].long()
    else:
        if tokenizer is None:
            raise DataError("calibration given as text needs a tokenizer")
        check_tokenizer_matches(model, tokenizer)
        ids = pack_tokens(tokenizer, source, config.seq_len, max_windows=config.num_samples)
        where = describe_source(source)
    if ids.shape[0] < config.min_samples:
        raise DataError(
            f"calibration data {where} gives {ids.shape[0]} windows of {ids.shape[1]} tokens; at least "
            f"min_samples={config.min_samples} are needed. Give more text, or lower seq_len / min_samples."
        )
    rows = model.get_input_embeddings().num_embeddings
    if int(ids.max()) >= rows:
        raise DataError(f"calibration token id {int(ids.max())} is outside the model's vocabulary of {rows}")
    return Calibration(ids, batch_size=config.batch_size, source=where)


@dataclass
class Importance:
    """Per-channel importance scores (higher = keep). Any field an importance plugin cannot provide is None.

    ``mlp``: [layers, intermediate]; ``heads``: [layers, query heads]; ``hidden``: [hidden];
    ``layers``: [layers] (for depth pruning).
    """

    method: str
    mlp: torch.Tensor | None = None
    heads: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    layers: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)

    def require(self, name: str, needed_by: str) -> torch.Tensor:
        value = getattr(self, name)
        if value is None:
            raise ConfigError(
                f"importance plugin {self.method!r} gives no {name!r} scores, which the {needed_by!r} axis needs; "
                "choose an importance plugin that scores it (e.g. 'activation')"
            )
        return value

    def summary(self, top: int = 5) -> dict:
        """A small JSON-able digest for reports: score spread per axis and the least/most important layers."""
        out: dict = {"method": self.method, **self.stats}
        for name in ("mlp", "heads", "hidden", "layers"):
            value = getattr(self, name)
            if value is None:
                continue
            v = value.float()
            out[name] = {"min": float(v.min()), "median": float(v.median()), "max": float(v.max())}
        if self.layers is not None:
            order = torch.argsort(self.layers.float())
            out["least_important_layers"] = order[:top].tolist()
            out["most_important_layers"] = order.flip(0)[:top].tolist()
        return out


@contextmanager
def hooks(registrations: list[Callable[[], torch.utils.hooks.RemovableHandle]]):
    handles = [register() for register in registrations]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def streamed_pass(model: nn.Module, calibration: Calibration, desc: str = "calibrating", base: str | None = None) -> dict:
    """Run every calibration batch through ``model`` (hooks attached by the caller). Returns timing stats.

    With ``base`` (the adapter's decoder-stack path), only the decoder runs: importance never needs the LM head,
    whose ``[batch, seq, vocab]`` logits would dominate both the time and the memory of the pass.
    """
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    runner = model.get_submodule(base) if base else model
    with torch.inference_mode():
        for batch in tqdm(list(calibration.batches()), desc=desc, leave=False):
            runner(input_ids=batch.to(device, non_blocking=True), use_cache=False)
    model.train(was_training)
    stats = {
        "samples": calibration.num_samples,
        "tokens": calibration.num_tokens,
        "seconds": round(time.perf_counter() - start, 3),
    }
    if device.type == "cuda":
        stats["peak_cuda_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return stats


def calibration_loss(model: nn.Module, calibration: Calibration, limit: int | None = None) -> float:
    """Mean next-token cross-entropy of ``model`` over (the first ``limit``) calibration windows."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for batch in calibration.batches(limit):
            batch = batch.to(device)
            out = model(input_ids=batch, labels=batch, use_cache=False)
            n = batch.shape[0] * (batch.shape[1] - 1)
            total += float(out.loss) * n
            count += n
    return total / count
