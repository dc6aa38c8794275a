"""Checks of inputs shared by several stages, run before any work so that a bad input costs nothing."""

from __future__ import annotations

import torch
from torch import nn

from .errors import DataError


def check_finite_weights(model: nn.Module, what: str = "model") -> None:
    """Refuse a model with NaN or infinite weights: pruning would rank channels by garbage and distillation
    would train towards it. One reduction per tensor on its own device, one host sync at the end."""
    flags, names = [], []
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.device.type != "meta":
            flags.append(torch.isfinite(p.detach()).all())
            names.append(name)
    if not flags:
        return
    finite = torch.stack([f.to("cpu") for f in flags]).tolist() if len({f.device for f in flags}) > 1 \
        else torch.stack(flags).tolist()
    bad = [n for n, ok in zip(names, finite) if not ok]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(f"the {what} has NaN or infinite weights in {shown}; it cannot be pruned or distilled. "
                        "Load an intact checkpoint. Nothing was changed.")
