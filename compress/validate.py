"""Checks of inputs shared by several stages, run before any work so that a bad input costs nothing."""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import DataError


def weight_sums(model: nn.Module) -> dict[str, float]:
    """The sum of every floating-point parameter (tied ones once, meta tensors skipped), accumulated in float64
    (float32 on Apple MPS): one reduction per tensor on its own device and one host sync per device.

    A sum is finite exactly when every element is (NaN and ±inf propagate; float16/bfloat16/float32 values
    cannot overflow a float64 sum), so the sums serve both :func:`check_finite_weights` and as a cheap
    fingerprint that notices weights edited in place (:func:`compress.prune.prune` restores a model after a
    failed plugin and checks it this way).
    """
    by_device: dict[torch.device, tuple[list[str], list[torch.Tensor]]] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point() or p.device.type == "meta":
                continue
            acc = torch.float32 if p.device.type == "mps" else torch.float64
            names, sums = by_device.setdefault(p.device, ([], []))
            names.append(name)
            sums.append(p.detach().sum(dtype=acc))
    out: dict[str, float] = {}
    for names, sums in by_device.values():
        out.update(zip(names, torch.stack(sums).tolist()))
    return out


def check_finite_weights(model: nn.Module, what: str = "model", sums: dict[str, float] | None = None
                         ) -> dict[str, float]:
    """Refuse a model with NaN or infinite weights: pruning would rank channels by garbage and distillation
    would train towards it. One float64 reduction per tensor (:func:`weight_sums`, or ``sums`` computed
    earlier), one host sync per device; returns the sums."""
    sums = weight_sums(model) if sums is None else sums
    suspicious = [n for n, s in sums.items() if not math.isfinite(s)]
    if suspicious:  # a non-finite sum of finite values can only be a float64 overflow: look at those exactly
        params = dict(model.named_parameters())
        bad = [n for n in suspicious if not bool(torch.isfinite(params[n].detach()).all())]
    else:
        bad = []
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(f"the {what} has NaN or infinite weights in {shown}; it cannot be pruned or distilled. "
                        "Load an intact checkpoint. Nothing was changed.")
    return sums
