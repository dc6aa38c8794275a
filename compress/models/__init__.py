"""Per-family adapters: where a decoder-only model keeps its attention, MLP, norms and embeddings.

The pruning code never names a module itself; it asks the adapter. Llama, Mistral, Qwen2 and Qwen3 share one
layout (they differ in biases and Qwen3's per-head q/k norms, which the adapter reports), so one
:class:`DecoderAdapter` describes all of them. A new family with the same roles under other names is one
``register_adapter(DecoderAdapter(families=("my_type",), q="attn.wq", ...))`` call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import UnsupportedModelError


@dataclass(frozen=True)
class DecoderAdapter:
    """Attribute paths of one family's modules, relative to the model (globals) or to a decoder layer."""

    families: tuple[str, ...]
    base: str = "model"  # the decoder stack without the LM head (returns last_hidden_state, final norm applied)
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    attention: str = "self_attn"
    # Norms over the hidden size inside each layer (pruned with hidden channels).
    layer_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    # Norms over head_dim (Qwen3's q_norm/k_norm): shared by all heads, untouched by any axis.
    head_norms: tuple[str, ...] = field(default_factory=tuple)

    # -- module access -------------------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def hidden_in_linears(self, layer: nn.Module) -> list[nn.Linear]:
        """Linears that read the residual stream (their input dim is the hidden size)."""
        return [layer.get_submodule(p) for p in (self.q, self.k, self.v, self.gate, self.up)]

    def hidden_out_linears(self, layer: nn.Module) -> list[nn.Linear]:
        """Linears that write the residual stream (their output dim is the hidden size)."""
        return [layer.get_submodule(p) for p in (self.o, self.down)]

    def hidden_norms(self, model: nn.Module) -> list[nn.Module]:
        """Every norm whose weight has one entry per hidden channel, the final norm last."""
        norms = [layer.get_submodule(n) for layer in self.decoder_layers(model) for n in self.layer_norms]
        return norms + [model.get_submodule(self.final_norm)]


LLAMA_LIKE = DecoderAdapter(families=("llama", "mistral", "qwen2"))
QWEN3 = DecoderAdapter(families=("qwen3",), head_norms=("self_attn.q_norm", "self_attn.k_norm"))

_ADAPTERS: dict[str, DecoderAdapter] = {}


def register_adapter(adapter: DecoderAdapter) -> DecoderAdapter:
    """Make ``adapter`` the one used for each of its ``families`` (config ``model_type`` values)."""
    for family in adapter.families:
        _ADAPTERS[family] = adapter
    return adapter


for _adapter in (LLAMA_LIKE, QWEN3):
    register_adapter(_adapter)


def supported_families() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_for(model: nn.Module) -> DecoderAdapter:
    """The adapter for ``model``'s family, or an error that names the supported ones."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    adapter = _ADAPTERS.get(model_type)
    if adapter is None:
        raise UnsupportedModelError(
            f"no adapter for model_type {model_type!r} ({type(model).__name__}); supported families: "
            f"{', '.join(supported_families())}. To add one, describe where its modules live: "
            "compress.models.register_adapter(DecoderAdapter(families=('your_type',), q='...', ...))"
        )
    return adapter
