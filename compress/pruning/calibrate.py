"""Calibration: token windows for importance estimation, and one streamed, hooked forward pass over them.

Hooks reduce every activation to a per-channel statistic as it is produced, so memory stays at the size of the
statistics (a few vectors per layer), never the activations. The statistics stay on the model's device (no hook
waits for the host), and under ``torchrun`` each rank runs its share of the batches and the statistics are summed
across ranks (:func:`streamed_pass`, :func:`all_reduce_tensors`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data import TextSource, describe_source, pack_tokens
from ..distributed import all_reduce_, rank_world, shard_range
from ..errors import ConfigError, DataError
from ..progress import bar
from ..validate import check_token_ids, check_tokenizer_matches, embedding_rows
from .config import CalibrationConfig


@dataclass
class Calibration:
    """Packed calibration windows ``[N, seq_len]`` plus where they came from."""

    input_ids: torch.Tensor
    batch_size: int = 8
    source: str = "<tensor>"

    @property
    def num_samples(self) -> int:
        """How many windows."""
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        """How many tokens in all the windows."""
        return self.input_ids.numel()

    def batches(self, limit: int | None = None) -> Iterator[torch.Tensor]:
        """The windows (the first ``limit``) in batches of ``batch_size``."""
        ids = self.input_ids if limit is None else self.input_ids[:limit]
        yield from ids.split(self.batch_size)


def prepare_calibration(
    model: nn.Module, tokenizer: Any, source: TextSource | torch.Tensor | Calibration, config: CalibrationConfig
) -> Calibration:
    """Turn text (or token ids) into :class:`Calibration` windows, refusing data too short to be meaningful,
    token ids outside the model's vocabulary and a tokenizer that does not fit the model."""
    if not isinstance(config, CalibrationConfig):
        raise ConfigError(
            f"calibration_config should be a compress.CalibrationConfig, got {type(config).__name__}"
            + ("; build one: compress.CalibrationConfig(**your_dict)" if isinstance(config, dict) else "")
        )
    rows = embedding_rows(model)
    if isinstance(source, Calibration):
        check_token_ids(source.input_ids, rows, "calibration token ids")
        ids, where = source.input_ids.long(), source.source
    elif isinstance(source, torch.Tensor):
        check_token_ids(source, rows, "calibration token ids")
        ids, where = source[: config.num_samples].long(), "<tensor>"
    else:
        if tokenizer is None:
            raise DataError("calibration given as text needs a tokenizer")
        check_tokenizer_matches(model, tokenizer)
        ids = pack_tokens(tokenizer, source, config.seq_len, max_windows=config.num_samples)
        where = describe_source(source)
        check_token_ids(ids, rows, f"the token ids of {where}")
    if ids.shape[0] < config.min_samples:
        raise DataError(
            f"calibration data {where} gives {ids.shape[0]} windows of {ids.shape[1]} tokens; at least "
            f"min_samples={config.min_samples} are needed. Give more text, or lower seq_len / min_samples."
        )
    return Calibration(ids, batch_size=config.batch_size, source=where)


def calibration_summary(calib: Calibration | None) -> dict:
    """What a report says about the calibration windows a stage used (``{}`` when it used none)."""
    if calib is None:
        return {}
    return {
        "source": calib.source,
        "samples": calib.num_samples,
        "tokens": calib.num_tokens,
        "seq_len": calib.input_ids.shape[1],
    }


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
        """The ``name`` scores, refused when this plugin gave none (``needed_by``: the axis that reads them)."""
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
def hooks(registrations: list[Callable[..., torch.utils.hooks.RemovableHandle]]) -> Iterator[None]:
    """Register every hook (each registration is called with no arguments) for the block, and remove them all
    afterwards, whatever happens."""
    handles = [register() for register in registrations]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def accumulator_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype for statistics accumulated on ``device``: float64, or float32 where the device has no float64
    (Apple MPS). Keeping accumulators on the model's device means no hook ever waits for the host."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def all_reduce_tensors(
    tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor], op: str = "sum"
) -> Mapping[str, torch.Tensor] | Sequence[torch.Tensor]:
    """Reduce every tensor of ``tensors`` (a dict name → tensor, or a list/tuple) across ranks, **in place**, and
    return ``tensors``; ``op`` is ``"sum"``, ``"max"`` or ``"min"``. A no-op in a single process.

    This is how an importance plugin turns per-rank statistics into global ones after a sharded
    :func:`streamed_pass`: keep every statistic as a *sum* over samples/tokens (plus the sample/token counts as
    tensors), reduce them, and only then finish (divide, sqrt, ...). Tensors sharing a dtype and device travel in
    one collective. **Every rank must call it, with the same tensors (number, order, shapes, dtypes)** — also a
    rank that was dealt no batch (its accumulators are simply zero); a rank that skips it hangs the others.
    """
    items = list(tensors.values()) if isinstance(tensors, Mapping) else list(tensors)
    if rank_world()[1] == 1 or not items:
        return tensors
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in items:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        if len(group) == 1 and group[0].is_contiguous():
            all_reduce_(group[0], op)
            continue
        flat = all_reduce_(torch.cat([t.reshape(-1) for t in group]), op)
        for t, part in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(part.view_as(t))
    return tensors


def _shard(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's batches: batch ``k`` goes to rank ``k % world`` (round-robin, :func:`shard_range`)."""
    return [batches[k] for k in shard_range(len(batches))]


def streamed_pass(
    model: nn.Module,
    calibration: Calibration,
    desc: str = "calibrating",
    base: str | None = None,
    *,
    reduce: Mapping[str, torch.Tensor] | Sequence[torch.Tensor] | None = None,
    shard: bool | None = None,
) -> dict:
    """Run the calibration batches through ``model`` (hooks attached by the caller). Returns timing stats.

    With ``base`` (the adapter's decoder-stack path), only the decoder runs: importance never needs the LM head,
    whose ``[batch, seq, vocab]`` logits would dominate both the time and the memory of the pass.

    **Several processes** (``torchrun``, a process group of ``world`` ranks): pass ``reduce``, the hooks'
    accumulators — tensors that each hold a *sum* over samples/tokens, counts included. Then the batches are dealt
    round-robin (batch ``k`` to rank ``k % world``, :func:`compress.distributed.shard_range`), each rank runs only
    its own, and afterwards the accumulators are summed across ranks in place with :func:`all_reduce_tensors`, so
    every rank holds the statistics of the whole calibration set (equal to a one-process run up to float
    summation order) and N ranks calibrate about N times faster. A rank dealt no batch (more ranks than batches)
    still joins the reduction. Statistics that are not sums (a max, say): pass ``shard=True`` without ``reduce``
    and call ``all_reduce_tensors(..., op="max")`` yourself after the pass, on every rank.

    Without ``reduce`` (and ``shard``), every rank runs every batch: a plugin that does not declare its
    accumulators stays correct, just not faster. In one process both arguments change nothing.

    The stats always describe the whole set: ``samples`` and ``tokens`` are global, ``ranks`` is how many
    processes shared the work and ``batches`` how many this rank ran.
    """
    device = next(model.parameters()).device
    rank, world = rank_world()
    if shard is None:
        shard = reduce is not None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    runner = model.get_submodule(base) if base else model
    batches = list(calibration.batches())
    mine = _shard(batches) if shard else batches
    try:
        with torch.inference_mode():
            for batch in bar(mine, desc=desc, unit="batch"):
                runner(input_ids=batch.to(device, non_blocking=True), use_cache=False)
    finally:
        model.train(was_training)
    if reduce is not None:
        all_reduce_tensors(reduce)
    stats = {
        "samples": calibration.num_samples,
        "tokens": calibration.num_tokens,
        "ranks": world if shard else 1,
        "batches": len(mine),
        "seconds": round(time.perf_counter() - start, 3),
    }
    if device.type == "cuda":
        stats["peak_cuda_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return stats


def calibration_loss(model: nn.Module, calibration: Calibration, limit: int | None = None) -> float:
    """Mean next-token cross-entropy of ``model`` over (the first ``limit``) calibration windows.

    Under several processes each rank evaluates its round-robin share of the batches and the ``(sum, count)``
    pair is summed across ranks, so every rank returns the same global mean (every rank must call it). The sum
    stays on the device until the end: one host sync per call, not one per batch.
    """
    device = next(model.parameters()).device
    dtype = accumulator_dtype(device)
    total = torch.zeros(2, dtype=dtype, device=device)  # [sum of token losses, token count]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in _shard(list(calibration.batches(limit))):
                batch = batch.to(device, non_blocking=True)
                out = model(input_ids=batch, labels=batch, use_cache=False)
                n = batch.shape[0] * (batch.shape[1] - 1)
                total[0] += out.loss.detach().to(dtype) * n
                total[1] += n
    finally:
        model.train(was_training)
    all_reduce_tensors([total])
    loss_sum, count = total.tolist()
    return loss_sum / max(count, 1)
