"""Built-in width axes: MLP neurons, attention heads (GQA-aware) and hidden/embedding channels.

All are uniform across layers: every layer keeps the same *number* of neurons/heads (each its own most
important ones), so the pruned model is described by a standard config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from compress.errors import ConfigError
from compress.models import DecoderAdapter
from compress.plugin_api import AxisPlugin, PruneContext
from compress.pruning.surgery import head_rows, slice_embedding_dim, slice_linear, slice_norm, top_k_sorted


class MLPAxis(AxisPlugin):
    """Prune MLP neurons (``intermediate_size``): rows of gate/up, columns of down."""

    name = "mlp"
    axis = "mlp"
    needs = ("mlp",)

    def select(self, ctx: PruneContext) -> dict:
        assert ctx.importance is not None  # compress.prune scores importance for an axis with `needs`
        scores = ctx.importance.require("mlp", self.name)
        k = ctx.shape_after.intermediate_size
        keep = [top_k_sorted(layer_scores, k).tolist() for layer_scores in scores]
        return {"keep": keep, "kept": k, "removed": ctx.shape_before.intermediate_size - k}

    def apply(self, model: nn.Module, adapter: DecoderAdapter, selection: dict) -> None:
        for layer, keep in zip(adapter.decoder_layers(model), selection["keep"]):
            adapter.slice_mlp(layer, torch.tensor(keep, dtype=torch.long))


class HeadsAxis(AxisPlugin):
    """Prune attention heads without breaking grouped-query attention.

    With ``K`` KV heads serving ``g`` query heads each, a target of ``K'`` KV heads and ``H'`` query heads keeps
    the ``K'`` most important KV groups (by the summed importance of their query heads) and, inside each kept
    group, its ``H'/K'`` most important query heads. So query heads are pruned evenly inside every group, whole
    groups are removed, or both.
    """

    name = "heads"
    axis = "heads"
    needs = ("heads",)

    @dataclass
    class Config:
        group_score: str = "sum"

        def __post_init__(self) -> None:
            if self.group_score not in ("sum", "max"):
                raise ConfigError(f"HeadsAxis.group_score should be 'sum' or 'max', got {self.group_score!r}")

    def select(self, ctx: PruneContext) -> dict:
        assert ctx.importance is not None  # compress.prune scores importance for an axis with `needs`
        scores = ctx.importance.require("heads", self.name)
        before, after = ctx.shape_before, ctx.shape_after
        g, kv_keep, g_keep = before.group_size, after.num_key_value_heads, after.group_size
        q_heads, kv_heads = [], []
        for layer_scores in scores:
            grouped = layer_scores.view(before.num_key_value_heads, g)
            group_scores = grouped.sum(1) if self.config.group_score == "sum" else grouped.max(1).values
            groups = top_k_sorted(group_scores, kv_keep).tolist()
            kv_heads.append(groups)
            q_heads.append([grp * g + h for grp in groups for h in top_k_sorted(grouped[grp], g_keep).tolist()])
        return {
            "query_heads": q_heads,
            "kv_heads": kv_heads,
            "num_attention_heads": after.num_attention_heads,
            "num_key_value_heads": kv_keep,
            "head_dim": before.head_dim,
        }

    def apply(self, model: nn.Module, adapter: DecoderAdapter, selection: dict) -> None:
        hd = selection["head_dim"]
        for layer, q_keep, kv_keep in zip(
            adapter.decoder_layers(model), selection["query_heads"], selection["kv_heads"]
        ):
            adapter.slice_heads(layer, head_rows(q_keep, hd), head_rows(kv_keep, hd), hd)
            attn = layer.get_submodule(adapter.attention)
            # transformers' attention modules cache these counts; keep them in step with the weights.
            # (type: ignore: torch types Module.__setattr__'s value as Tensor | Module; any attribute can be set)
            if hasattr(attn, "num_heads"):
                attn.num_heads = len(q_keep)  # type: ignore[assignment]
            if hasattr(attn, "num_key_value_heads"):
                attn.num_key_value_heads = len(kv_keep)  # type: ignore[assignment]
            if hasattr(attn, "num_key_value_groups"):
                attn.num_key_value_groups = len(q_keep) // len(kv_keep)  # type: ignore[assignment]


class HiddenAxis(AxisPlugin):
    """Prune hidden (embedding) channels: the embedding table, every norm, every projection, and ``lm_head``.

    One channel set is kept for the whole residual stream. Tied embeddings stay tied. ``head_dim`` is unchanged
    and written explicitly to the config.
    """

    name = "hidden"
    axis = "hidden"
    needs = ("hidden",)

    def select(self, ctx: PruneContext) -> dict:
        assert ctx.importance is not None  # compress.prune scores importance for an axis with `needs`
        scores = ctx.importance.require("hidden", self.name)
        keep = top_k_sorted(scores, ctx.shape_after.hidden_size).tolist()
        return {"keep": keep, "kept": len(keep), "removed": ctx.shape_before.hidden_size - len(keep)}

    def apply(self, model: nn.Module, adapter: DecoderAdapter, selection: dict) -> None:
        idx = torch.tensor(selection["keep"], dtype=torch.long)
        embed = cast(nn.Embedding, model.get_submodule(adapter.embed))
        lm_head = cast(nn.Linear, model.get_submodule(adapter.lm_head))
        tied = lm_head.weight is embed.weight
        slice_embedding_dim(embed, idx)
        if tied:
            lm_head.weight = embed.weight
            lm_head.in_features = len(idx)
        else:
            slice_linear(lm_head, in_idx=idx)
        for norm in adapter.hidden_norms(model):
            slice_norm(norm, idx)
        adapter.slice_stream_inputs(model, idx)  # e.g. Gemma-3's image features projected into the stream
        for layer in adapter.decoder_layers(model):
            for lin in adapter.hidden_in_linears(layer):
                slice_linear(lin, in_idx=idx)
            for lin in adapter.hidden_out_linears(layer):
                slice_linear(lin, out_idx=idx)
        # e.g. Gemma's sqrt(hidden_size) embedding scale, which a reload recomputes from the new width
        adapter.compensate_hidden(model, selection["kept"] + selection["removed"], len(idx))
