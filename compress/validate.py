"""Checks of inputs shared by several stages, run before any work so that a bad input costs nothing.

Each check is written once, here, and every public entry point that takes the input calls it, so the same bad
device, dtype, integer, tokenizer or token ids gets the same answer from ``compress``, ``prune``, ``distill``,
``export``, the evaluation functions and the command line.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from .errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "double": torch.float64,
}


def check_int(name: str, value: object, low: int, allow_none: bool = False) -> None:
    """Refuse anything but an integer of at least ``low`` (``None`` too when ``allow_none``), naming ``name``."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = "an integer" if low <= 0 else "a positive integer" if low == 1 else f"an integer of at least {low}"
        raise ConfigError(f"{name} should be {what}{' or None' if allow_none else ''}, got {value!r}")


def check_teacher_source(source: Any) -> None:
    """Refuse a teacher source that is not a path-like string, or is empty, before anything is loaded."""
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(
            f"the teacher should be a folder, a .gguf file, a hub id 'org/name' or 'smollm2' (or a "
            f"model), got {type(source).__name__} {source!r}"
        )
    if not str(os.fspath(source)).strip():
        raise ConfigError(
            f"the teacher source is empty ({str(source)!r}); give a model folder, a .gguf file, a hub "
            "id 'org/name' or 'smollm2' (use './' explicitly for the current folder)"
        )


def check_dtype(dtype: Any) -> torch.dtype | str | None:
    """``None``, ``"auto"``, a floating-point ``torch.dtype`` or one of :data:`DTYPES`' names; anything else is a
    :class:`ConfigError` naming the value."""
    if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
        return dtype if dtype is None else "auto"
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower() in DTYPES:
        return DTYPES[dtype.strip().lower()]
    raise ConfigError(
        f"dtype {dtype!r} is not a floating-point dtype a model can be loaded in; use torch.bfloat16, "
        f"torch.float16, torch.float32, 'auto' (the checkpoint's own) or one of {sorted(DTYPES)}"
    )


def check_device(device: Any) -> str | torch.device | None:
    """Refuse a device string torch does not know (``"gpu"``) or one this machine does not have (``"cuda:9"``),
    before any work, with a :class:`ConfigError` naming it. Returns ``device`` unchanged."""
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise ConfigError(
            f"device should be a string like 'cpu', 'cuda' or 'cuda:1' (or a torch.device), got {device!r}"
        )
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"device {device!r} is not a device torch knows; use 'cpu', 'cuda', 'cuda:N' or 'mps' "
            f"({str(exc).splitlines()[0]})"
        ) from exc
    if dev.type == "cpu":
        return device
    if dev.type == "meta":
        raise ConfigError(f"device {device!r} holds no weights; use 'cpu' or an accelerator such as 'cuda'")
    backend = getattr(torch.backends, "mps", None) if dev.type == "mps" else getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ConfigError(
            f"device {device!r}: this machine has no {dev.type} device that torch can use; "
            "use 'cpu' (or install the torch build for your accelerator)"
        )
    count = getattr(getattr(torch, dev.type, None), "device_count", None)
    if dev.index is not None and count is not None and dev.index >= count():
        raise ConfigError(
            f"device {device!r}: this machine has {count()} {dev.type} device(s), numbered 0 to "
            f"{count() - 1}; pick one of those"
        )
    return device


def check_materialized(model: nn.Module) -> None:
    """Refuse a model whose weights are on the meta device (a skeleton without values: nothing to prune or save)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch model (nn.Module), got {type(model).__name__}")
    meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise ConfigError(
            f"{type(model).__name__} has {len(meta)} parameter(s)/buffer(s) on the meta device ({meta[0]}, ...): they "
            "hold no values. Load the weights first (e.g. from_pretrained without device_map='meta', or "
            "model.to_empty(...) and load_state_dict)"
        )


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


def embedding_rows(model: nn.Module) -> int:
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
    rows = embedding_rows(model)
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


_CPU_CHUNK = 1 << 22  # elements summed at a time on the CPU, where a reduction in a wider dtype copies its input


def _sum(t: torch.Tensor) -> torch.Tensor:
    """``t``'s sum without a full-size copy: on CUDA/MPS in float32 (the kernels widen bf16/fp16 on the fly), on
    the CPU in float64 over chunks of 4M elements (a 32 MiB copy at most, not one of the whole tensor)."""
    if t.device.type != "cpu":
        return t.sum(dtype=torch.float32)
    flat = t.reshape(-1)
    return (
        torch.stack([part.sum(dtype=torch.float64) for part in flat.split(_CPU_CHUNK)]).sum()
        if flat.numel()
        else torch.zeros((), dtype=torch.float64)
    )


def weight_sums(model: nn.Module) -> dict[str, float]:
    """The sum of every floating-point parameter (tied ones once, meta tensors skipped), one reduction per
    tensor on its own device (:func:`_sum`: no full-size copy) and one host sync per device.

    A sum is finite exactly when every element is (NaN and ±inf propagate; a float32 sum of finite weights
    that overflows is checked element by element), so the sums serve both :func:`check_finite_weights` and as a cheap
    fingerprint that notices weights edited in place (:func:`compress.pruning.prune.prune` restores a model after a
    failed plugin and checks it this way).
    """
    by_device: dict[torch.device, tuple[list[str], list[torch.Tensor]]] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point() or p.device.type == "meta":
                continue
            names, sums = by_device.setdefault(p.device, ([], []))
            names.append(name)
            sums.append(_sum(p.detach()))
    out: dict[str, float] = {}
    for names, sums in by_device.values():
        out.update(zip(names, torch.stack(sums).tolist()))
    return out


def check_finite_weights(
    model: nn.Module, what: str = "model", sums: dict[str, float] | None = None
) -> dict[str, float]:
    """Refuse a model with NaN or infinite weights: pruning would rank channels by garbage and distillation
    would train towards it. One reduction per tensor (:func:`weight_sums`, or ``sums`` computed
    earlier), one host sync per device; returns the sums."""
    sums = weight_sums(model) if sums is None else sums
    suspicious = [n for n, s in sums.items() if not math.isfinite(s)]
    if suspicious:  # a non-finite sum of finite values can only be an overflow: look at those exactly
        params = dict(model.named_parameters())
        bad = [n for n in suspicious if not bool(torch.isfinite(params[n].detach()).all())]
    else:
        bad = []
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(
            f"the {what} has NaN or infinite weights in {shown}; it cannot be pruned or distilled. "
            "Load an intact checkpoint. Nothing was changed."
        )
    return sums
