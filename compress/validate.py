"""Checks of inputs shared by several stages, run before any work so that a bad input costs nothing."""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import DataError

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
