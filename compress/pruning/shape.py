"""The shape of a decoder-only model and its exact parameter count as a function of that shape.

Pruning is uniform across layers, so five numbers (plus ``head_dim``, which pruning never changes) describe
the model completely; :class:`ParamFormula` counts parameters for any candidate shape without building it,
which is what lets the planner search thousands of shapes in milliseconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, cast

import torch
from torch import nn

from ..errors import TargetError
from ..models import DecoderAdapter
from .config import SHAPE_FIELDS


@dataclass(frozen=True)
class ModelShape:
    """The sizes that describe a uniformly pruned decoder: five prunable ones (:data:`SHAPE_FIELDS`) and
    ``head_dim``, which pruning keeps."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    head_dim: int

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """The shape a transformers config describes (KV heads default to query heads, ``head_dim`` to
        ``hidden_size // heads``)."""
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.hidden_size, config.intermediate_size, heads, kv, config.num_hidden_layers, head_dim)

    def apply_to_config(self, config: Any) -> None:
        """Write this shape into a transformers config (``head_dim`` always explicit, as Minitron's exports)."""
        layer_types = getattr(config, "layer_types", None)
        for name in SHAPE_FIELDS:
            if name == "num_key_value_heads" and not hasattr(config, name):  # no grouped-query attention
                if self.num_key_value_heads != self.num_attention_heads:
                    raise TargetError("this config has no num_key_value_heads: query and KV heads must stay equal")
                continue
            setattr(config, name, getattr(self, name))
        config.head_dim = self.head_dim
        if layer_types is not None and len(layer_types) != self.num_hidden_layers:
            raise TargetError("layer_types must be sliced by the depth axis before the shape is applied")

    def replace(self, **changes: int) -> ModelShape:
        """This shape with ``changes`` (field name -> size)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """The fields as a plain dict (for reports)."""
        return asdict(self)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    def check_within(self, teacher: ModelShape) -> None:
        """Raise a :class:`TargetError` if this shape is not a valid sub-shape of ``teacher``."""
        for name in SHAPE_FIELDS:
            new, old = getattr(self, name), getattr(teacher, name)
            if new < 1:
                raise TargetError(f"{name} must be at least 1, got {new}")
            if new > old:
                raise TargetError(f"{name}={new} is larger than the teacher's {old}; pruning only removes")
        h, k = self.num_attention_heads, self.num_key_value_heads
        if h % k:
            raise TargetError(
                f"num_attention_heads={h} is not a multiple of num_key_value_heads={k}: every KV head must "
                "serve the same number of query heads (GQA)"
            )
        if h // k > teacher.group_size:
            raise TargetError(
                f"{h} query heads over {k} KV heads is {h // k} per group, but the teacher has only "
                f"{teacher.group_size} per group ({teacher.num_attention_heads}/{teacher.num_key_value_heads}); "
                "prune query heads evenly inside groups or remove whole KV groups"
            )
        if self == teacher:
            raise TargetError("the target shape equals the teacher's shape: nothing to prune")


@dataclass(frozen=True)
class ParamFormula:
    """Exact parameter count of a model of this family for any :class:`ModelShape`.

    Built from a real model: biases and tying are read off its modules, and whatever the formula does not model
    (e.g. Qwen3's head_dim-sized q/k norms) is measured and carried as a constant per layer.
    """

    vocab_size: int
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    norms_per_layer: int
    norm_params_per_channel: int  # 1 for RMSNorm, 2 for LayerNorm with bias
    per_layer_constant: int
    q_proj_norm: bool = False  # a norm over the whole query projection (OLMo-2): heads * head_dim weights
    k_proj_norm: bool = False
    gated_mlp: bool = True  # gate, up and down projections (False: up and down only, GPT-NeoX)
    stream_rows: int = 0  # rows of the adapter's stream_inputs (weights outside the decoder, one column per channel)
    constant: int = 0  # parameters no axis touches outside the decoder (e.g. a vision tower), measured

    @classmethod
    def from_model(cls, model: nn.Module, adapter: DecoderAdapter) -> ParamFormula:
        """The formula of ``model``'s family, read off its modules (shapes, biases, tying; no weight values, so a
        skeleton on the meta device will do) and checked to count ``model`` exactly."""
        layer = adapter.decoder_layers(model)[0]
        final_norm = model.get_submodule(adapter.final_norm)
        embed = cast(nn.Embedding, model.get_submodule(adapter.embed))
        lm_head = model.get_submodule(adapter.lm_head)
        formula = cls(
            vocab_size=embed.weight.shape[0],
            tied=lm_head.weight is embed.weight,
            qkv_bias=adapter.attention_inputs(layer)[0].bias is not None,
            o_bias=layer.get_submodule(adapter.o).bias is not None,
            mlp_bias=layer.get_submodule(adapter.down).bias is not None,
            norms_per_layer=len(adapter.layer_norms),
            norm_params_per_channel=(
                sum(p.numel() for p in final_norm.parameters()) // cast(torch.Tensor, final_norm.weight).shape[0]
            ),
            per_layer_constant=0,
            q_proj_norm=adapter.q_proj_norm is not None,
            k_proj_norm=adapter.k_proj_norm is not None,
            gated_mlp=adapter.gate is not None,
            stream_rows=sum(
                model.get_parameter(p).numel() // model.get_parameter(p).shape[-1] for p in adapter.stream_inputs
            ),
        )
        shape = ModelShape.from_config(adapter.shape_config(model.config))
        measured = sum(p.numel() for p in layer.parameters())
        formula = replace(formula, per_layer_constant=measured - formula.layer_params(shape))
        return replace(formula, constant=count_params(model) - formula.total(shape))

    def layer_params(self, s: ModelShape) -> int:
        """Parameters of one decoder layer of shape ``s``."""
        d, i, hd = s.hidden_size, s.intermediate_size, s.head_dim
        q_out, kv_out = s.num_attention_heads * hd, s.num_key_value_heads * hd
        attn = d * q_out + 2 * d * kv_out + q_out * d
        if self.qkv_bias:
            attn += q_out + 2 * kv_out
        if self.o_bias:
            attn += d
        attn += (q_out if self.q_proj_norm else 0) + (kv_out if self.k_proj_norm else 0)
        inputs = 2 if self.gated_mlp else 1  # gate and up, or up alone
        mlp = (inputs + 1) * d * i + ((inputs * i + d) if self.mlp_bias else 0)
        norms = self.norms_per_layer * self.norm_params_per_channel * d
        return attn + mlp + norms + self.per_layer_constant

    def embedding_params(self, s: ModelShape) -> int:
        """The input embedding plus an untied LM head: ``vocab × hidden`` each."""
        return self.vocab_size * s.hidden_size * (1 if self.tied else 2)

    def total(self, s: ModelShape) -> int:
        """Parameters of the whole model at shape ``s``."""
        return (
            self.embedding_params(s)
            + (self.norm_params_per_channel + self.stream_rows) * s.hidden_size
            + s.num_hidden_layers * self.layer_params(s)
            + self.constant
        )


def changed_axes(before: ModelShape, after: ModelShape) -> list[str]:
    """The pruning axes (in the order they are applied) that take ``before`` to ``after``."""
    axes = []
    if after.intermediate_size != before.intermediate_size:
        axes.append("mlp")
    if (after.num_attention_heads, after.num_key_value_heads) != (
        before.num_attention_heads,
        before.num_key_value_heads,
    ):
        axes.append("heads")
    if after.hidden_size != before.hidden_size:
        axes.append("hidden")
    if after.num_hidden_layers != before.num_hidden_layers:
        axes.append("depth")
    return axes


def count_params(model: nn.Module) -> int:
    """Parameters of ``model``, counting tied tensors once."""
    return sum(p.numel() for p in model.parameters())
