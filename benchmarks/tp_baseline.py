"""Torch-Pruning's own GroupMagnitudeImportance pruning a given hidden/MLP shape: the peer in benchmarks.

Attention projections q/k/v are in ``ignored_layers`` (heads kept): with them in the dependency graph,
Torch-Pruning 1.6.1's ``BasePruner`` never returns on Llama (SDPA + RoPE, upstream issue #527).
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn


def tp_prune(model: nn.Module, hidden_size: int, intermediate_size: int) -> nn.Module:
    """Prune ``model`` in place with Torch-Pruning to the given widths and update its config."""
    cfg = model.config
    layers = model.model.layers
    ignored = [model.lm_head] + [getattr(l.self_attn, n) for l in layers for n in ("q_proj", "k_proj", "v_proj")]
    # Torch-Pruning rounds the pruned count up; a hair below the exact ratio lands on the exact shape.
    r_mlp = (cfg.intermediate_size - intermediate_size) / cfg.intermediate_size - 1e-6
    r_hidden = (cfg.hidden_size - hidden_size) / cfg.hidden_size - 1e-6
    ratios: dict = {}
    for layer in layers:
        ratios[layer.mlp.gate_proj] = r_mlp
        ratios[layer.self_attn.o_proj] = r_hidden
        ratios[layer.mlp.down_proj] = r_hidden
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    example = torch.randint(0, cfg.vocab_size, (1, 16))
    pruner = tp.pruner.BasePruner(
        model, example, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.0,
        pruning_ratio_dict=ratios, ignored_layers=ignored, global_pruning=False,
        forward_fn=lambda m, x: m(input_ids=x, use_cache=False).logits,
    )
    pruner.step()
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    cfg.hidden_size = model.model.embed_tokens.weight.shape[1]
    cfg.intermediate_size = layers[0].mlp.gate_proj.out_features
    cfg.head_dim = head_dim
    if (cfg.hidden_size, cfg.intermediate_size) != (hidden_size, intermediate_size):
        raise RuntimeError(f"Torch-Pruning reached {cfg.hidden_size}/{cfg.intermediate_size}, "
                           f"not {hidden_size}/{intermediate_size}")
    return model
