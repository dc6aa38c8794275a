"""Wanda-style importance for compress: score = |W| x ||X||, summed over the weights a channel owns."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress import Calibration, ConfigError, Importance, ImportancePlugin
from compress.pruning.calibrate import hooks, streamed_pass


class WandaImportance(ImportancePlugin):
    """MLP neuron j: ||x_j|| * sum|W_down[:, j]|; head: the same over the head's o_proj inputs;
    hidden channel c: sum over norms of ||norm_out_c|| * sum|W[:, c]| over the linears reading the stream."""

    name = "wanda"

    @dataclass
    class Config:
        power: float = 1.0  # exponent on the activation norm (1 = Wanda)

        def __post_init__(self) -> None:
            if not isinstance(self.power, (int, float)) or self.power <= 0:
                raise ConfigError(f"WandaImportance.power should be a positive number, got {self.power!r}")

    def score(self, model, adapter, calibration: Calibration | None) -> Importance:
        if calibration is None:
            raise ConfigError("wanda importance needs calibration data")
        layers = adapter.decoder_layers(model)
        norms = adapter.hidden_norms(model)
        sq_down = [torch.zeros(layer.get_submodule(adapter.down).in_features) for layer in layers]
        sq_o = [torch.zeros(layer.get_submodule(adapter.o).in_features) for layer in layers]
        sq_norm = [torch.zeros(n.weight.shape[0]) for n in norms]

        def pre(acc):  # hooks must return None, or their value replaces the module's input/output
            def hook(_module, args):
                acc.add_(args[0].detach().float().pow(2).sum((0, 1)).cpu())
            return hook

        def post(acc):
            def hook(_module, _args, out):
                acc.add_(out.detach().float().pow(2).sum((0, 1)).cpu())
            return hook

        regs = []
        for i, layer in enumerate(layers):
            regs.append(lambda l=layer, a=sq_down[i]: l.get_submodule(adapter.down).register_forward_pre_hook(pre(a)))
            regs.append(lambda l=layer, a=sq_o[i]: l.get_submodule(adapter.o).register_forward_pre_hook(pre(a)))
        for n, acc in zip(norms, sq_norm):
            regs.append(lambda n=n, a=acc: n.register_forward_hook(post(a)))
        with hooks(regs):
            stats = streamed_pass(model, calibration, desc="wanda importance", base=adapter.base)

        p = self.config.power
        heads = adapter.shape_config(model.config).num_attention_heads  # text_config for multimodal models
        mlp, head_scores = [], []
        hidden = torch.zeros_like(sq_norm[0])
        for i, layer in enumerate(layers):
            w_down = layer.get_submodule(adapter.down).weight.detach().float().abs().sum(0).cpu()
            mlp.append(w_down * sq_down[i].sqrt().pow(p))
            w_o = layer.get_submodule(adapter.o).weight.detach().float().abs().sum(0).cpu()
            head_scores.append((w_o * sq_o[i].sqrt().pow(p)).view(heads, -1).sum(1))
            w_in = sum(lin.weight.detach().float().abs().sum(0).cpu() for lin in adapter.hidden_in_linears(layer))
            layer_norms = sq_norm[i * len(adapter.layer_norms):(i + 1) * len(adapter.layer_norms)]
            hidden += w_in * sum(a.sqrt().pow(p) for a in layer_norms)
        return Importance(self.name, mlp=torch.stack(mlp), heads=torch.stack(head_scores), hidden=hidden, stats=stats)
