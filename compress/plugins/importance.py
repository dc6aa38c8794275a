"""Built-in importance plugins: Minitron's activation importance, and weight magnitude and random baselines."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import ConfigError
from compress.models import DecoderAdapter
from compress.plugin_api import ImportancePlugin
from compress.pruning.calibrate import Calibration, Importance, accumulator_dtype, hooks, streamed_pass
from compress.pruning.shape import ModelShape

_AGGREGATIONS = ("mean", "l2")


def _reduce(x: torch.Tensor, how: str, dim: int) -> torch.Tensor:
    """Aggregate ``x`` over ``dim``: the mean, or the L2 norm."""
    return x.mean(dim) if how == "mean" else x.pow(2).sum(dim).sqrt()


class ActivationImportance(ImportancePlugin):
    """Minitron activation importance, gathered with forward hooks in one streamed pass.

    * MLP neuron: magnitude of the input of ``down_proj`` (the gated activation);
    * attention head: L2 norm of the head's slice of the input of ``o_proj`` (the attention output);
    * hidden channel: magnitude of every hidden-size norm output, summed over norms;
    * layer: Block Influence, the mean over tokens of ``1 - cos(layer input, layer output)``.

    Each statistic is aggregated over the sequence first (``seq_agg``), then over samples (``batch_agg``);
    Minitron's best setting is mean over sequence, L2 over batch.

    The sums stay on the model's device during the pass. Under ``torchrun`` each rank scores its share of the
    calibration batches and the sums are added across ranks (``streamed_pass(..., reduce=...)``), so every rank
    returns the same scores, those of a one-process run over all the windows.
    """

    name = "activation"

    @dataclass
    class Config:
        seq_agg: str = "mean"
        batch_agg: str = "l2"

        def __post_init__(self) -> None:
            for field_name in ("seq_agg", "batch_agg"):
                value = getattr(self, field_name)
                if value not in _AGGREGATIONS:
                    raise ConfigError(
                        f"ActivationImportance.{field_name} should be one of {_AGGREGATIONS}, got {value!r}"
                    )

    def score(self, model: nn.Module, adapter: DecoderAdapter, calibration: Calibration | None) -> Importance:
        if calibration is None:
            raise ConfigError("activation importance needs calibration data")
        cfg = self.config
        layers = adapter.decoder_layers(model)
        n_layers = len(layers)
        heads = adapter.shape_config(model.config).num_attention_heads
        norms = adapter.hidden_norms(model)
        inter = cast(nn.Linear, layers[0].get_submodule(adapter.down)).in_features
        hidden = cast(torch.Tensor, norms[-1].weight).shape[0]
        device = next(model.parameters()).device
        dtype = accumulator_dtype(device)
        # Sums over samples (mlp/heads/norms) and tokens (Block Influence), kept on the device: a hook that moved
        # them to the host would stall the GPU once per module per batch. Counts: [samples, tokens].
        acc = {
            "mlp": torch.zeros(n_layers, inter, dtype=dtype, device=device),
            "heads": torch.zeros(n_layers, heads, dtype=dtype, device=device),
            "norms": torch.zeros(len(norms), hidden, dtype=dtype, device=device),
            "bi": torch.zeros(n_layers, dtype=dtype, device=device),
            "counts": torch.zeros(2, dtype=torch.long, device=device),
        }
        acc_mlp, acc_heads, acc_norms, acc_bi, counts = acc.values()

        def per_sample(x: torch.Tensor) -> torch.Tensor:
            """[B, T, C] -> [C] accumulator increment: sequence reduction, then the batch part of the L2/mean."""
            s = _reduce(x.float().abs() if cfg.seq_agg == "mean" else x.float(), cfg.seq_agg, 1)
            return (s.pow(2) if cfg.batch_agg == "l2" else s).sum(0).to(device=device, dtype=dtype)

        def mlp_hook(i):
            def hook(_mod, args):
                acc_mlp[i] += per_sample(args[0])

            return hook

        def heads_hook(i):
            def hook(_mod, args):
                x = args[0]
                per_head = x.float().reshape(*x.shape[:-1], heads, -1).norm(dim=-1)  # [B, T, H]
                acc_heads[i] += per_sample(per_head)

            return hook

        def norm_hook(j):
            def hook(_mod, _args, out):
                acc_norms[j] += per_sample(out)

            return hook

        inputs: dict[int, torch.Tensor] = {}

        def layer_pre(i):
            def hook(_mod, args, kwargs):
                inputs[i] = args[0] if args else kwargs["hidden_states"]

            return hook

        def layer_post(i):
            def hook(_mod, _args, _kwargs, out):
                out = out[0] if isinstance(out, (tuple, list)) else out
                cos = F.cosine_similarity(inputs.pop(i).float(), out.float(), dim=-1)
                acc_bi[i] += (1 - cos).sum().to(device=device, dtype=dtype)
                if i == 0:
                    counts[0] += out.shape[0]
                    counts[1] += out.shape[0] * out.shape[1]

            return hook

        # each called with no arguments (the defaults bind the loop variables)
        registrations: list[Callable[..., torch.utils.hooks.RemovableHandle]] = []
        for i, layer in enumerate(layers):
            registrations += [
                lambda i=i, mod=layer: mod.get_submodule(adapter.down).register_forward_pre_hook(mlp_hook(i)),
                lambda i=i, mod=layer: mod.get_submodule(adapter.o).register_forward_pre_hook(heads_hook(i)),
                lambda i=i, mod=layer: mod.register_forward_pre_hook(layer_pre(i), with_kwargs=True),
                lambda i=i, mod=layer: mod.register_forward_hook(layer_post(i), with_kwargs=True),
            ]
        for j, norm in enumerate(norms):
            registrations.append(lambda j=j, n=norm: n.register_forward_hook(norm_hook(j)))
        with hooks(registrations):
            # Under torchrun: this rank's share of the batches, then every accumulator summed across ranks.
            stats = streamed_pass(model, calibration, desc="activation importance", base=adapter.base, reduce=acc)

        host = {k: v.cpu() for k, v in acc.items()}  # the one device -> host copy
        n_samples, n_tokens = host["counts"].tolist()

        def finish(a: torch.Tensor) -> torch.Tensor:
            return (a.sqrt() if cfg.batch_agg == "l2" else a / max(n_samples, 1)).float()

        return Importance(
            method=self.name,
            mlp=finish(host["mlp"]),
            heads=finish(host["heads"]),
            hidden=finish(host["norms"]).sum(0),
            layers=(host["bi"] / max(n_tokens, 1)).float(),
            stats=stats,
        )


class MagnitudeImportance(ImportancePlugin):
    """Weight-magnitude baseline: the norm of every weight a channel, head or layer owns (no data needed)."""

    name = "magnitude"
    needs_calibration = False

    @dataclass
    class Config:
        p: float = 2.0

        def __post_init__(self) -> None:
            if (
                isinstance(self.p, bool)
                or not isinstance(self.p, (int, float))
                or not math.isfinite(self.p)
                or self.p <= 0
            ):
                raise ConfigError(f"MagnitudeImportance.p should be a positive number, got {self.p!r}")

    def _norm(self, w: torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
        """``sum |w|^p`` over ``dim`` (the p-th root is taken at the end)."""
        return w.detach().float().abs().pow(self.config.p).sum(dim)

    def score(self, model: nn.Module, adapter: DecoderAdapter, calibration: Calibration | None) -> Importance:
        layers = adapter.decoder_layers(model)
        heads = adapter.shape_config(model.config).num_attention_heads
        head_dim = ModelShape.from_config(adapter.shape_config(model.config)).head_dim
        mlp, head_scores, layer_scores = [], [], []
        embed = cast(torch.Tensor, model.get_submodule(adapter.embed).weight)
        hidden = self._norm(embed, 0)
        for layer in layers:
            get = layer.get_submodule
            mlp.append(
                sum(self._norm(w, 1) for w in adapter.mlp_input_weights(layer))
                + self._norm(cast(torch.Tensor, get(adapter.down).weight), 0)
            )
            q = self._norm(adapter.query_weight(layer, head_dim), 1).view(heads, -1).sum(1)
            o = self._norm(cast(torch.Tensor, get(adapter.o).weight), 0).view(heads, -1).sum(1)
            head_scores.append(q + o)
            for lin in adapter.hidden_in_linears(layer):
                hidden = hidden + self._norm(lin.weight, 0)
            for lin in adapter.hidden_out_linears(layer):
                hidden = hidden + self._norm(lin.weight, 1)
            # a decoder layer has parameters: the sum is a tensor, never sum()'s start value 0
            layer_scores.append(
                cast(torch.Tensor, sum(self._norm(p, tuple(range(p.dim()))) for p in layer.parameters()))
            )
        lm_head = cast(torch.Tensor, model.get_submodule(adapter.lm_head).weight)
        if lm_head is not embed:
            hidden = hidden + self._norm(lm_head, 0)
        root = 1.0 / self.config.p
        return Importance(
            method=self.name,
            mlp=torch.stack(mlp).pow(root),
            heads=torch.stack(head_scores).pow(root),
            hidden=hidden.pow(root),
            layers=torch.stack(layer_scores).pow(root),
        )


class RandomImportance(ImportancePlugin):
    """Random scores (seeded): the floor any importance method must beat."""

    name = "random"
    needs_calibration = False

    @dataclass
    class Config:
        seed: int = 0

        def __post_init__(self) -> None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
                raise ConfigError(f"RandomImportance.seed should be a non-negative integer, got {self.seed!r}")

    def score(self, model: nn.Module, adapter: DecoderAdapter, calibration: Calibration | None) -> Importance:
        g = torch.Generator().manual_seed(self.config.seed)
        cfg = adapter.shape_config(model.config)
        n = cfg.num_hidden_layers
        return Importance(
            method=self.name,
            mlp=torch.rand(n, cfg.intermediate_size, generator=g),
            heads=torch.rand(n, cfg.num_attention_heads, generator=g),
            hidden=torch.rand(cfg.hidden_size, generator=g),
            layers=torch.rand(n, generator=g),
        )
