"""Built-in depth axis: remove whole decoder layers.

Two ways to choose them (``method``):

* ``"contiguous_block"`` (default) — try every contiguous block of the needed length and remove the one whose
  removal raises the calibration loss least (forward passes only, over ``eval_samples`` calibration windows;
  under ``torchrun`` the ranks split the windows and all reach the same choice);
* ``"block_influence"`` — remove the layers that change the residual stream least, by Block Influence
  (``1 - cos(layer input, layer output)``, from the importance plugin's ``layers`` scores). One pass, no
  search, but on SmolLM2 it left a 30-40x worse perplexity than the block search (BENCHMARKS.md): layers
  that each change the stream little are not safe to remove together.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from compress.distributed import broadcast_object
from compress.errors import ConfigError
from compress.models import DecoderAdapter
from compress.plugin_api import AxisPlugin, PruneContext
from compress.progress import bar
from compress.pruning.calibrate import calibration_loss
from compress.pruning.surgery import top_k_sorted

METHODS = ("block_influence", "contiguous_block")


class DepthAxis(AxisPlugin):
    """Remove whole decoder layers: by Block Influence scores (``method="block_influence"``), or the contiguous
    block whose removal raises the calibration loss least (``"contiguous_block"``, the default)."""

    name = "depth"
    axis = "depth"

    @dataclass
    class Config:
        method: str = "contiguous_block"
        eval_samples: int = 32

        def __post_init__(self) -> None:
            if self.method not in METHODS:
                raise ConfigError(f"DepthAxis.method should be one of {METHODS}, got {self.method!r}")
            if isinstance(self.eval_samples, bool) or not isinstance(self.eval_samples, int) or self.eval_samples < 1:
                raise ConfigError(f"DepthAxis.eval_samples should be a positive integer, got {self.eval_samples!r}")

    @property
    def needs(self) -> tuple[str, ...]:  # type: ignore[override]
        """Block Influence reads the ``layers`` scores; the block search needs none."""
        return ("layers",) if self.config.method == "block_influence" else ()

    def select(self, ctx: PruneContext) -> dict:
        n_before, n_after = ctx.shape_before.num_hidden_layers, ctx.shape_after.num_hidden_layers
        if self.config.method == "block_influence":
            assert ctx.importance is not None  # compress.prune scores importance for an axis with `needs`
            layer_scores = ctx.importance.require("layers", self.name)  # ctx.importance.layers, checked set
            keep = top_k_sorted(layer_scores, n_after).tolist()
            detail = {"block_influence": [round(float(v), 6) for v in layer_scores]}
        else:
            if ctx.calibration is None:
                raise ConfigError("DepthAxis(method='contiguous_block') needs calibration data")
            keep, detail = self._best_block(ctx, n_before - n_after)
        removed = [i for i in range(n_before) if i not in keep]
        return {"keep": keep, "removed_layers": removed, "method": self.config.method, **detail}

    def _best_block(self, ctx: PruneContext, n_remove: int) -> tuple[list[int], dict]:
        """Try removing every contiguous block of ``n_remove`` layers and keep the layers around the block
        whose removal gives the lowest calibration loss (the same on every rank)."""
        layers = ctx.adapter.decoder_layers(ctx.model)
        n = len(layers)
        parent_path, _, attr = ctx.adapter.layers.rpartition(".")
        parent = ctx.model.get_submodule(parent_path) if parent_path else ctx.model
        losses: dict[int, float] = {}
        assert ctx.calibration is not None  # select() refuses a missing calibration before the search
        try:
            for start in bar(
                range(n - n_remove + 1), desc=f"depth block search ({n_remove} of {n} layers)", unit="block"
            ):
                kept = [layers[i] for i in range(n) if not start <= i < start + n_remove]
                setattr(parent, attr, nn.ModuleList(kept))
                losses[start] = calibration_loss(ctx.model, ctx.calibration, limit=self.config.eval_samples)
        finally:
            setattr(parent, attr, layers)
        # calibration_loss already gives every rank the same global mean (each rank evaluates its share of the
        # windows, then sums are all-reduced); rank 0's losses are still made authoritative, so that no float
        # difference between ranks can ever make two ranks remove different layers.
        losses = broadcast_object(losses)
        best = min(losses, key=losses.__getitem__)
        keep = [i for i in range(n) if not best <= i < best + n_remove]
        return keep, {"block_start": best, "block_losses": {str(k): round(v, 5) for k, v in losses.items()}}

    def apply(self, model: nn.Module, adapter: DecoderAdapter, selection: dict) -> None:
        layers = adapter.decoder_layers(model)
        keep = selection["keep"]
        parent_path, _, attr = adapter.layers.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, nn.ModuleList([layers[i] for i in keep]))
        for new_idx, layer in enumerate(adapter.decoder_layers(model)):
            # The KV cache is indexed by layer_idx; it must be dense after removal.
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    # torch types Module.__setattr__'s value as Tensor | Module; any attribute can be set
                    module.layer_idx = new_idx  # type: ignore[assignment]
        config = adapter.shape_config(model.config)
        for name in adapter.layer_lists:  # per-layer config lists (layer_types, no_rope_layers, ...)
            values = getattr(config, name, None)
            if values is not None and len(values) == len(layers):
                setattr(config, name, [values[i] for i in keep])
        if getattr(config, "max_window_layers", None) is not None:
            config.max_window_layers = min(config.max_window_layers, len(keep))

    def summarize(self, selection: dict) -> dict:
        out = {k: v for k, v in selection.items() if k != "keep"}
        return out
