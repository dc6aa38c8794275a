"""In-place weight slicing of the modules pruning touches (Linear, Embedding, norms).

Modules keep their identity (only their parameters are replaced), so references held elsewhere stay valid.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn


def _index(t: torch.Tensor, idx: torch.Tensor, dim: int) -> nn.Parameter:
    """A new parameter holding ``t``'s slices ``idx`` along ``dim`` (same ``requires_grad``)."""
    return nn.Parameter(t.detach().index_select(dim, idx.to(t.device)).clone(), requires_grad=t.requires_grad)


def slice_linear(linear: nn.Linear, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None) -> None:
    """Keep output rows ``out_idx`` and/or input columns ``in_idx`` of ``linear``."""
    if out_idx is not None:
        linear.weight = _index(linear.weight, out_idx, 0)
        if linear.bias is not None:
            linear.bias = _index(linear.bias, out_idx, 0)
        linear.out_features = len(out_idx)
    if in_idx is not None:
        linear.weight = _index(linear.weight, in_idx, 1)
        linear.in_features = len(in_idx)


def slice_norm(norm: nn.Module, idx: torch.Tensor) -> None:
    """Keep channels ``idx`` of an RMSNorm/LayerNorm (weight and optional bias)."""
    norm.weight = _index(cast(torch.Tensor, norm.weight), idx, 0)
    if getattr(norm, "bias", None) is not None:
        norm.bias = _index(cast(torch.Tensor, norm.bias), idx, 0)
    if hasattr(norm, "normalized_shape"):
        # torch types Module.__setattr__'s value as Tensor | Module; any attribute can be set
        norm.normalized_shape = (len(idx),)  # type: ignore[assignment]


def slice_embedding_dim(embedding: nn.Embedding, idx: torch.Tensor) -> None:
    """Keep embedding channels ``idx`` (columns of the table)."""
    embedding.weight = _index(embedding.weight, idx, 1)
    embedding.embedding_dim = len(idx)


def head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    """Row indices of a projection that belong to ``heads`` (each head owns ``head_dim`` consecutive rows)."""
    return (
        torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])
        if heads
        else torch.empty(0, dtype=torch.long)
    )


def top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, in ascending index order (so kept channels keep their order)."""
    return torch.sort(torch.topk(scores.float(), k).indices).values
