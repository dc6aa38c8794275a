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
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from ..data import TextSource, describe_source, pack_tokens
from ..distributed import all_reduce_, rank_world, shard_range
from ..errors import ConfigError, DataError
from ..progress import bar

if TYPE_CHECKING:
    from transformers import PreTrainedModel


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
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
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


def _tokenizer_ids(tokenizer) -> tuple[int, int, str]:
    """(number of tokens, largest id, which token has it) of a tokenizer, without building its whole vocabulary."""
    size = len(tokenizer)
    top, which = size - 1, "its last regular token"
    for token_id in list(getattr(tokenizer, "all_special_ids", None) or []) + list(
        (getattr(tokenizer, "added_tokens_decoder", None) or {}).keys()
    ):
        if isinstance(token_id, int) and token_id > top:
            top, which = token_id, f"special/added token {tokenizer.convert_ids_to_tokens(token_id)!r}"
    return size, top, which


def _embedding_rows(model: nn.Module) -> int:
    """Rows of the model's input embedding table (``get_input_embeddings()`` of a transformers model)."""
    return cast(nn.Embedding, cast("PreTrainedModel", model).get_input_embeddings()).num_embeddings


def check_tokenizer_matches(model: nn.Module, tokenizer) -> None:
    """Refuse a tokenizer that does not belong to ``model``, whichever way the sizes disagree.

    The rule, with ``rows`` the rows of the model's input embedding and ``n = len(tokenizer)`` (added tokens
    included):

    * **larger** — ``n > rows``, or any special/added token id ``>= rows``: some ids have no embedding row;
    * **much smaller** — ``n < rows / 2``. Embedding tables are often padded beyond the tokenizer (rounded up
      to a multiple of 64 or 128, or a few reserved rows: Qwen2 151,936 rows for 151,665 tokens, Phi-3 32,064
      for 32,011, Pythia 50,304 for 50,277 — a few percent at most), but never to twice its size; a tokenizer
      under half the table is another model's (a 32k Llama-2 tokenizer on a 128k Llama-3 model, GPT-2's 50k on a
      152k Qwen). A model whose table really is mostly unused can still be given token ids directly.

    Tokenizers of the same size from different models cannot be told apart by size; load the tokenizer saved
    with the model.
    """
    if tokenizer is None:
        raise DataError("no tokenizer given; text needs the model's tokenizer (pass tokenizer=...)")
    rows = _embedding_rows(model)
    try:
        size, top, which = _tokenizer_ids(tokenizer)
    except TypeError as exc:
        raise DataError(
            f"tokenizer= should be a Hugging Face tokenizer (len() and ids), got {type(tokenizer).__name__}"
        ) from exc
    if size > rows:
        raise DataError(
            f"the tokenizer has {size} tokens but the model's embedding has {rows} rows: they do not "
            "belong together. Load the tokenizer saved with this model."
        )
    if top >= rows:
        raise DataError(
            f"the tokenizer's {which} has id {top}, but the model's embedding has only {rows} rows "
            f"(ids 0..{rows - 1}): they do not belong together. Load the tokenizer saved with this model."
        )
    if size * 2 < rows:
        raise DataError(
            f"the tokenizer has {size} tokens but the model's embedding has {rows} rows, more than twice as many: "
            "they do not belong together (padding rounds an embedding up by a few percent, not 2x). Load the "
            "tokenizer saved with this model; if its table really is mostly unused, tokenize the text yourself and "
            "pass token ids [N, seq_len]."
        )


def check_token_ids(ids, rows: int, where: str = "token ids") -> None:
    """Refuse token ids that are not an integer ``[N, seq_len]`` tensor (``seq_len >= 2``) or lie outside
    ``0..rows-1``; the message names the offending id and the vocabulary size."""
    if not isinstance(ids, torch.Tensor):
        raise DataError(f"{where} should be a torch.Tensor [N, seq_len], got {type(ids).__name__}")
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise DataError(
            f"{where} should be an integer tensor [N, seq_len] (torch.long), got dtype {ids.dtype}; "
            "token ids are whole numbers: tokenize text first, or use ids.long() if they are"
        )
    if ids.dim() != 2:
        raise DataError(f"{where} should be a 2-D [N, seq_len] tensor, got shape {tuple(ids.shape)}")
    if ids.shape[1] < 2:
        raise DataError(
            f"{where} has windows of {ids.shape[1]} tokens (shape {tuple(ids.shape)}); at least 2 are "
            "needed to predict a next token"
        )
    if ids.numel() == 0:
        raise DataError(f"{where} is empty (shape {tuple(ids.shape)})")
    low, high = (int(v) for v in torch.stack([ids.min(), ids.max()]).tolist())
    if low < 0:
        raise DataError(
            f"{where} contain the negative id {low}; ids must lie in 0..{rows - 1} (the model's "
            f"vocabulary of {rows}). Padding marked with -100 or -1 belongs in labels, not input ids"
        )
    if high >= rows:
        raise DataError(
            f"{where} contain the id {high}, outside the model's vocabulary of {rows} (ids 0..{rows - 1}): "
            "these ids come from another tokenizer or model"
        )


def prepare_calibration(
    model: nn.Module, tokenizer, source: TextSource | torch.Tensor | Calibration, config: CalibrationConfig
) -> Calibration:
    """Turn text (or token ids) into :class:`Calibration` windows, refusing data too short to be meaningful,
    token ids outside the model's vocabulary and a tokenizer that does not fit the model."""
    if not isinstance(config, CalibrationConfig):
        raise ConfigError(
            f"calibration_config should be a compress.CalibrationConfig, got {type(config).__name__}"
            + ("; build one: compress.CalibrationConfig(**your_dict)" if isinstance(config, dict) else "")
        )
    rows = _embedding_rows(model)
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
def hooks(registrations: list[Callable[..., torch.utils.hooks.RemovableHandle]]):  # each called with no arguments
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


def all_reduce_tensors(tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor], op: str = "sum"):
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
