"""Per-family adapters: where a decoder-only model keeps its attention, MLP, norms and embeddings, and what else
pruning must know about the family.

The pruning code never names a module itself; it asks the adapter. Llama, Mistral, Qwen2 and Qwen3 share one
layout (they differ in biases, Qwen3's per-head q/k norms and Llama's hidden / heads rule, which the adapters
report). Other families are described by the same object with more fields filled in, not by new pruning code:

* ``layer_norms`` — every norm over the hidden size inside a layer (Gemma has four), ``head_norms`` — norms over
  ``head_dim`` shared by all heads (Qwen3, Gemma-3), ``norm_offset`` — 1 when a norm computes ``x̂·(1 + w)``
  (Gemma) rather than ``x̂·w``;
* ``embed_scale="sqrt_hidden"`` — the embeddings are multiplied by √hidden_size, a factor transformers
  recomputes from the config when the model is loaded; when hidden channels are pruned, the norms in
  ``residual_norms`` (those whose output is added to the residual stream) absorb the change, so the saved
  student computes what the pruned one did;
* ``qkv`` / ``gate_up`` — fused projections (Phi-3), sliced by row ranges; ``qkv_layout="per_head"`` when the
  fused rows are interleaved head by head, ``[q_h | k_h | v_h]`` (GPT-NeoX); ``gate=None`` — an MLP without a
  gate (``up → act → down``); ``q_proj_norm`` / ``k_proj_norm`` — norms over a whole projection (OLMo-2), sliced
  with the heads;
* ``head_dim_from_hidden`` — the family computes the head size as hidden_size // heads and reads no ``head_dim``
  (GPT-NeoX): hidden channels and heads are pruned together, a constraint the planner respects;
* ``sub_config`` — the config attribute that holds the decoder's sizes when the model wraps it (``text_config`` of
  multimodal Gemma-3); ``stream_inputs`` — parameters outside the decoder layers that write into the residual
  stream by their last dimension (Gemma-3's image projection), sliced and compensated with hidden channels;
* ``layer_lists`` — per-layer config lists (``layer_types``, ``no_rope_layers``) that follow depth pruning;
  ``rope_checks_hidden_over_heads`` — rope types whose config check ties hidden_size / heads to head_dim
  (Phi-3's longrope), a constraint the planner respects;
* ``logit_softcap`` / ``logit_divisor`` — the config fields of a transform the model applies to its logits
  (Gemma-2's soft-capping, Granite's scaling), which the distillation loss applies too; ``eager_attention_if``
  — a config feature only eager attention honours (Gemma-2's attention soft-capping; the ONNX export uses it).

A new family with the same roles under other names is one ``register_adapter(DecoderAdapter(...))`` call.

Families compress recognises but cannot prune correctly (Gemma 4: attention sizes that differ by layer type,
per-layer embeddings, KV sharing; EXAONE 4.5: an image-text model transformers does not load as a causal LM) are
refused before any work with what is missing (``_UNSUPPORTED``), unless an installed package declares an adapter.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
from torch import nn

from .. import registry
from ..errors import ConfigError, PluginError, UnsupportedModelError
from ..pruning.surgery import head_rows, slice_linear, slice_norm
from ..version import transformers_version
from .logits import LogitTransform


def _linear(module: nn.Module, path: str) -> nn.Linear:
    """The projection at ``path`` under ``module`` (get_submodule is typed as returning any Module)."""
    return cast(nn.Linear, module.get_submodule(path))


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
    gate: str | None = "mlp.gate_proj"  # None: an MLP without a gate
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    attention: str = "self_attn"
    # Norms over the hidden size inside each layer (pruned with hidden channels).
    layer_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    # Norms over head_dim (Qwen3's q_norm/k_norm): shared by all heads, untouched by any axis.
    head_norms: tuple[str, ...] = field(default_factory=tuple)
    # Fused projections (Phi-3): one Linear whose rows are [q | k | v], or [gate | up]; they replace q/k/v, gate/up.
    qkv: str | None = None
    gate_up: str | None = None
    # "stacked": qkv rows are [all q | all k | all v]; "per_head": [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] (GPT-NeoX).
    qkv_layout: str = "stacked"
    # Norms over a whole projection's output (OLMo-2's q_norm over heads*head_dim): sliced with its heads' rows.
    q_proj_norm: str | None = None
    k_proj_norm: str | None = None
    # Of the layer norms, those applied to a sublayer's output just before it is added to the residual stream.
    residual_norms: tuple[str, ...] = field(default_factory=tuple)
    norm_offset: float = 0.0  # a norm computes x_hat * (norm_offset + weight)
    embed_scale: str | None = None  # None, or "sqrt_hidden": embeddings times sqrt(config.hidden_size)
    layer_lists: tuple[str, ...] = ("layer_types",)  # config lists with one entry per layer
    logit_softcap: str | None = None  # config field c: logits = c * tanh(logits / c)
    logit_divisor: str | None = None  # config field s: logits = logits / s
    eager_attention_if: str | None = None  # config field that only eager attention honours (SDPA drops it)
    # rope_scaling types whose config check uses hidden_size // num_attention_heads as the head size (Phi-3's
    # longrope): those two must keep that ratio, or the saved config refuses to load.
    rope_checks_hidden_over_heads: tuple[str, ...] = field(default_factory=tuple)
    # The head size is always hidden_size // num_attention_heads (no head_dim in the config): GPT-NeoX.
    head_dim_from_hidden: bool = False
    # transformers 5 requires hidden_size % num_attention_heads == 0 for this family (Llama, Gemma-2/3) even with
    # an explicit head_dim; the planner keeps it on every transformers line, so students move between them.
    hidden_divisible_by_heads: bool = False
    # Config attribute holding the decoder's sizes when the model wraps the decoder (multimodal Gemma-3).
    sub_config: str | None = None
    # Parameters outside the decoder layers whose last dimension writes the residual stream (Gemma-3's
    # image-token projection): sliced with hidden channels, scaled with the embeddings by compensate_hidden.
    stream_inputs: tuple[str, ...] = field(default_factory=tuple)
    # Set by discovered_layout(): only base, layers, embed and lm_head are known (a family without an adapter).
    paths_only: bool = False

    def __post_init__(self) -> None:
        if self.embed_scale not in (None, "sqrt_hidden"):
            raise ConfigError(f"DecoderAdapter.embed_scale should be None or 'sqrt_hidden', got {self.embed_scale!r}")
        unknown = set(self.residual_norms) - set(self.layer_norms)
        if unknown:
            raise ConfigError(f"DecoderAdapter.residual_norms {sorted(unknown)} are not among layer_norms")
        if self.embed_scale and not self.residual_norms:
            raise ConfigError("DecoderAdapter with embed_scale needs residual_norms to compensate hidden pruning")
        if self.qkv_layout not in ("stacked", "per_head"):
            raise ConfigError(f"DecoderAdapter.qkv_layout should be 'stacked' or 'per_head', got {self.qkv_layout!r}")
        if self.qkv_layout == "per_head" and not self.qkv:
            raise ConfigError("DecoderAdapter.qkv_layout='per_head' describes a fused qkv projection; set qkv too")
        if "layer_types" not in self.layer_lists:
            raise ConfigError(
                "DecoderAdapter.layer_lists must include 'layer_types': transformers checks its length "
                "against num_hidden_layers, so depth pruning has to slice it"
            )
        if isinstance(self.families, str) or not all(isinstance(f, str) and f for f in self.families):
            raise ConfigError(f"DecoderAdapter.families should be a tuple of model_type names, got {self.families!r}")
        if self.gate is None and self.gate_up:
            raise ConfigError(
                "DecoderAdapter: gate=None (an MLP without a gate) cannot be combined with a fused gate_up"
            )

    def shape_config(self, config):
        """The config that holds the decoder's sizes: ``config`` itself, or its ``sub_config`` attribute."""
        return getattr(config, self.sub_config) if self.sub_config else config

    # -- module access -------------------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return cast(nn.ModuleList, model.get_submodule(self.layers))

    def attention_inputs(self, layer: nn.Module) -> list[nn.Linear]:
        """The q, k, v projections (or the one fused q|k|v projection)."""
        return [_linear(layer, p) for p in ((self.qkv,) if self.qkv else (self.q, self.k, self.v))]

    def mlp_inputs(self, layer: nn.Module) -> list[nn.Linear]:
        """The gate and up projections (or the one fused gate|up projection, or up alone without a gate)."""
        return [_linear(layer, p) for p in self._mlp_input_paths()]

    def _mlp_input_paths(self) -> tuple[str, ...]:
        if self.gate_up:
            return (self.gate_up,)
        return (self.gate, self.up) if self.gate else (self.up,)

    def hidden_in_linears(self, layer: nn.Module) -> list[nn.Linear]:
        """Linears that read the residual stream (their input dim is the hidden size)."""
        return self.attention_inputs(layer) + self.mlp_inputs(layer)

    @staticmethod
    def _per_head_rows(rows: torch.Tensor, head_dim: int, part: int) -> torch.Tensor:
        """Rows of a per-head fused qkv projection (``[q_h | k_h | v_h]`` for each head h) that hold part ``part``
        (0 q, 1 k, 2 v) of the rows ``rows`` of an unfused projection (``h * head_dim + d``)."""
        return rows // head_dim * 3 * head_dim + part * head_dim + rows % head_dim

    def _head_dim(self, layer: nn.Module, head_dim: int | None) -> int:
        if head_dim is not None:
            return head_dim
        attn = layer.get_submodule(self.attention)
        found = getattr(attn, "head_dim", None) or getattr(attn, "head_size", None)
        if not isinstance(found, int):
            raise ConfigError(f"{type(attn).__name__} has no head_dim attribute: pass head_dim explicitly")
        return found

    def query_weight(self, layer: nn.Module, head_dim: int | None = None) -> torch.Tensor:
        """The query projection's weight ``[heads * head_dim, hidden]`` (rows of the fused one, if fused).
        ``head_dim`` is needed for a per-head fused projection (read from the attention module if not given)."""
        if self.qkv and self.qkv_layout == "per_head":
            head_dim = self._head_dim(layer, head_dim)
            width = _linear(layer, self.o).in_features
            return _linear(layer, self.qkv).weight[self._per_head_rows(torch.arange(width), head_dim, 0)]
        if self.qkv:
            return _linear(layer, self.qkv).weight[: _linear(layer, self.o).in_features]
        return _linear(layer, self.q).weight

    def mlp_input_weights(self, layer: nn.Module) -> list[torch.Tensor]:
        """The gate and up weights, ``[intermediate, hidden]`` each (halves of the fused one, if fused)."""
        if self.gate_up:
            return list(_linear(layer, self.gate_up).weight.chunk(2, dim=0))
        return [lin.weight for lin in self.mlp_inputs(layer)]

    def expected_shapes(self, hidden: int, intermediate: int, q_out: int, kv_out: int) -> dict[str, tuple]:
        """Weight shape of every projection of a layer with these sizes (what a standard config describes)."""
        attn = (
            {self.qkv: (q_out + 2 * kv_out, hidden)}
            if self.qkv
            else {self.q: (q_out, hidden), self.k: (kv_out, hidden), self.v: (kv_out, hidden)}
        )
        mlp = (
            {self.gate_up: (2 * intermediate, hidden)}
            if self.gate_up
            else {path: (intermediate, hidden) for path in self._mlp_input_paths()}
        )
        return {**attn, self.o: (hidden, q_out), **mlp, self.down: (hidden, intermediate)}

    # -- slicing (the axes call these; fused projections are sliced by row ranges) ----------------------------
    def slice_mlp(self, layer: nn.Module, keep: torch.Tensor) -> None:
        """Keep MLP neurons ``keep``: rows of gate and up, columns of down."""
        down = _linear(layer, self.down)
        if self.gate_up:
            slice_linear(_linear(layer, self.gate_up), out_idx=torch.cat([keep, keep + down.in_features]))
        else:
            for path in self._mlp_input_paths():
                slice_linear(_linear(layer, path), out_idx=keep)
        slice_linear(down, in_idx=keep)

    def slice_heads(
        self, layer: nn.Module, q_rows: torch.Tensor, kv_rows: torch.Tensor, head_dim: int | None = None
    ) -> None:
        """Keep query-projection rows ``q_rows`` and key/value rows ``kv_rows`` (and the matching o columns).
        ``head_dim`` is needed for a per-head fused projection (read from the attention module if not given)."""
        o = _linear(layer, self.o)
        if self.qkv_layout == "per_head":  # no grouped-query attention: q, k and v keep the same heads
            if not torch.equal(q_rows, kv_rows):
                raise ConfigError("a per-head fused qkv projection keeps the same heads for q, k and v")
            head_dim = self._head_dim(layer, head_dim)
            heads = q_rows.view(-1, head_dim)[:, 0] // head_dim  # the kept heads, in order
            assert self.qkv is not None  # __post_init__: qkv_layout="per_head" requires qkv
            slice_linear(_linear(layer, self.qkv), out_idx=head_rows(heads.tolist(), 3 * head_dim))
        elif self.qkv:
            qkv = _linear(layer, self.qkv)
            q_width = o.in_features
            kv_width = (qkv.out_features - q_width) // 2
            slice_linear(qkv, out_idx=torch.cat([q_rows, q_width + kv_rows, q_width + kv_width + kv_rows]))
        else:
            slice_linear(_linear(layer, self.q), out_idx=q_rows)
            slice_linear(_linear(layer, self.k), out_idx=kv_rows)
            slice_linear(_linear(layer, self.v), out_idx=kv_rows)
        slice_linear(o, in_idx=q_rows)
        for path, rows in ((self.q_proj_norm, q_rows), (self.k_proj_norm, kv_rows)):
            if path:
                slice_norm(layer.get_submodule(path), rows)

    def hidden_out_linears(self, layer: nn.Module) -> list[nn.Linear]:
        """Linears that write the residual stream (their output dim is the hidden size)."""
        return [_linear(layer, p) for p in (self.o, self.down)]

    def slice_stream_inputs(self, model: nn.Module, keep: torch.Tensor) -> None:
        """Keep hidden channels ``keep`` of the ``stream_inputs`` (their last dimension)."""
        for path in self.stream_inputs:
            owner_path, _, name = path.rpartition(".")
            owner = model.get_submodule(owner_path)
            old = getattr(owner, name)
            setattr(
                owner,
                name,
                nn.Parameter(
                    old.detach().index_select(-1, keep.to(old.device)).clone(), requires_grad=old.requires_grad
                ),
            )

    def hidden_norms(self, model: nn.Module) -> list[nn.Module]:
        """Every norm whose weight has one entry per hidden channel, the final norm last."""
        norms = [layer.get_submodule(n) for layer in self.decoder_layers(model) for n in self.layer_norms]
        return norms + [model.get_submodule(self.final_norm)]

    # -- what pruning must do besides slicing ----------------------------------------------------------------
    def compensate_hidden(self, model: nn.Module, old_hidden: int, new_hidden: int) -> None:
        """After hidden channels were sliced: keep the model's function where a factor depends on hidden_size.

        With ``embed_scale="sqrt_hidden"`` a reload multiplies the embeddings by √new instead of √old, a factor
        ``k = √(new/old)`` on the whole residual stream. The norms that read the stream are scale-invariant; the
        ``residual_norms`` that write into it are multiplied by ``k`` so every write keeps its proportion, and so
        are the ``stream_inputs`` (image features enter the stream beside the scaled token embeddings). The
        in-memory model then computes exactly what the reloaded one will (an ``embed_scale`` buffer is set too).
        """
        if self.embed_scale != "sqrt_hidden" or new_hidden == old_hidden:
            return
        k = (new_hidden / old_hidden) ** 0.5
        for layer in self.decoder_layers(model):
            for name in self.residual_norms:
                weight = cast(torch.Tensor, layer.get_submodule(name).weight)
                with torch.no_grad():
                    weight.copy_((weight.float() + self.norm_offset) * k - self.norm_offset)
        with torch.no_grad():
            for path in self.stream_inputs:
                model.get_parameter(path).mul_(k)
        embed_scale = getattr(model.get_submodule(self.embed), "embed_scale", None)
        if isinstance(embed_scale, torch.Tensor):
            embed_scale.fill_(new_hidden**0.5)

    def shape_constraint(self, config):
        """A function ``shape -> reason or None`` for shapes this family's config cannot describe, or None.

        ``config`` is the decoder's config (:meth:`shape_config`). A :class:`ShapeRules`: the family's own rules
        (fused per-head qkv, a head size computed from hidden, a rope type checked against hidden / heads), then
        the rules of loading: the one transformers 5 applies to the family (``hidden_divisible_by_heads``,
        enforced on every transformers line so that a student saved on one loads on the other), and whatever
        architecture check the installed transformers' config class runs on load.
        """
        family = [
            c
            for c in (_no_gqa_check if self.qkv_layout == "per_head" else None, self._hidden_over_heads_check(config))
            if c
        ]
        loading = [
            c
            for c in (_hidden_divisible_check if self.hidden_divisible_by_heads else None, _config_class_check(config))
            if c
        ]
        return ShapeRules(tuple(family), tuple(loading)) if family or loading else None

    def _hidden_over_heads_check(self, config):
        kind = _rope_type(config)
        if self.head_dim_from_hidden:
            why = "this family computes the head size as hidden_size // num_attention_heads"
        elif kind in self.rope_checks_hidden_over_heads:
            why = f"its {kind} rope scaling is validated against hidden_size // num_attention_heads"
        else:
            return None

        def check(shape) -> str | None:
            if shape.hidden_size // shape.num_attention_heads != shape.head_dim or (
                self.head_dim_from_hidden and shape.hidden_size % shape.num_attention_heads
            ):
                return (
                    f"{why}, which must stay {shape.head_dim} (got {shape.hidden_size} / "
                    f"{shape.num_attention_heads}); prune hidden channels and heads together, or keep both"
                )
            return None

        return check

    def attention_implementation(self, config) -> str | None:
        """``"eager"`` when the config uses a feature other attention kernels silently ignore, else None."""
        if self.eager_attention_if and getattr(config, self.eager_attention_if, None):
            return "eager"
        return None

    def logit_transform(self, config):
        """The transform this family applies to its logits, read from ``config`` (a :class:`.logits.LogitTransform`)."""
        softcap = getattr(config, self.logit_softcap, None) if self.logit_softcap else None
        divisor = getattr(config, self.logit_divisor, None) if self.logit_divisor else None
        return LogitTransform(scale=1.0 / divisor if divisor else 1.0, softcap=softcap or None)


@dataclass(frozen=True)
class ShapeRules:
    """Why a shape cannot be saved as a config this family loads: ``rules(shape)`` is the first reason, or None.

    ``family`` rules describe the architecture itself and explain a refusal best; ``loading`` rules are those of
    the transformers config class, so a planner checks an explicit shape's bounds before them (a shape larger
    than the teacher is refused as that, not for its head ratio).
    """

    family: tuple[Callable[[Any], str | None], ...] = ()
    loading: tuple[Callable[[Any], str | None], ...] = ()

    def __call__(self, shape) -> str | None:
        return self.family_reason(shape) or next((r for c in self.loading if (r := c(shape))), None)

    def family_reason(self, shape) -> str | None:
        return next((r for c in self.family if (r := c(shape))), None)


def _rope_type(config) -> str | None:
    """The rope type of ``config``: ``rope_parameters`` (transformers 5) or ``rope_scaling`` (4.57)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return None
    return rope.get("rope_type") or rope.get("type")


def _no_gqa_check(shape) -> str | None:
    if shape.num_key_value_heads != shape.num_attention_heads:
        return (
            "this family has no grouped-query attention (q, k and v are fused head by head): "
            "num_key_value_heads must equal num_attention_heads"
        )
    return None


def _hidden_divisible_check(shape) -> str | None:
    if shape.num_attention_heads and shape.hidden_size % shape.num_attention_heads:
        return (
            f"transformers 5 requires hidden_size ({shape.hidden_size}) to be a multiple of num_attention_heads "
            f"({shape.num_attention_heads}) for this family, or the saved config refuses to load"
        )
    return None


_SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")


def _config_class_check(config):
    """The installed transformers' own architecture check of ``config``'s class, run on a copy with a candidate
    shape's sizes, as a shape constraint (None when the class has none). Results are cached per shape: the
    planner asks for every shape of its grid."""
    validate = getattr(type(config), "validate_architecture", None)
    if validate is None:
        return None
    results: dict[tuple, str | None] = {}

    def check(shape) -> str | None:
        key = tuple(getattr(shape, f) for f in _SHAPE_FIELDS)
        if key not in results:
            probe = copy.copy(config)
            for name, value in zip(_SHAPE_FIELDS, key):
                if hasattr(probe, name):
                    object.__setattr__(probe, name, value)
            try:
                validate(probe)
                results[key] = None
            except (ValueError, TypeError) as exc:
                results[key] = f"transformers' {type(config).__name__} refuses it ({exc})"
        return results[key]

    return check


LLAMA = DecoderAdapter(families=("llama",), hidden_divisible_by_heads=True)
# Mistral and Qwen2: Llama's layout (Qwen2 adds q/k/v biases), with no hidden / heads rule in their configs.
LLAMA_LIKE = DecoderAdapter(families=("mistral", "qwen2"))
QWEN3 = DecoderAdapter(families=("qwen3",), head_norms=("self_attn.q_norm", "self_attn.k_norm"))
_GEMMA_NORMS: dict[str, Any] = dict(
    layer_norms=(
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ),
    residual_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    norm_offset=1.0,
    embed_scale="sqrt_hidden",
    logit_softcap="final_logit_softcapping",
    hidden_divisible_by_heads=True,
)
GEMMA3_TEXT = DecoderAdapter(
    families=("gemma3_text",), head_norms=("self_attn.q_norm", "self_attn.k_norm"), **_GEMMA_NORMS
)
# Gemma-2 also soft-caps attention logits, which only eager attention applies (SDPA ignores the softcap).
GEMMA2 = DecoderAdapter(families=("gemma2",), eager_attention_if="attn_logit_softcapping", **_GEMMA_NORMS)
# Granite's embedding, residual and attention multipliers are constants that pruning leaves valid; its logits
# are divided by logits_scaling.
GRANITE = DecoderAdapter(families=("granite",), logit_divisor="logits_scaling")
# OLMo-2: norms after the sublayers (no input norm), and q/k norms over the whole projection width. Removing
# heads changes the RMS those norms divide by, so head pruning is not exact for OLMo-2 (the others are).
OLMO2 = DecoderAdapter(
    families=("olmo2",),
    layer_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    q_proj_norm="self_attn.q_norm",
    k_proj_norm="self_attn.k_norm",
)
# Phi-3 / Phi-3.5 / Phi-4-mini: fused q|k|v and gate|up projections.
PHI3 = DecoderAdapter(
    families=("phi3",),
    qkv="self_attn.qkv_proj",
    gate_up="mlp.gate_up_proj",
    rope_checks_hidden_over_heads=("longrope",),
)
# GPT-NeoX / Pythia: q, k, v fused and interleaved head by head, an MLP without a gate, LayerNorms with biases,
# parallel residual (nothing to do for pruning), and a head size always computed as hidden_size // heads.
GPT_NEOX = DecoderAdapter(
    families=("gpt_neox",),
    base="gpt_neox",
    layers="gpt_neox.layers",
    embed="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm",
    lm_head="lm_head" if transformers_version() >= (5, 14) else "embed_out",  # renamed in transformers 5.14
    attention="attention",
    qkv="attention.query_key_value",
    qkv_layout="per_head",
    o="attention.dense",
    gate=None,
    up="mlp.dense_h_to_4h",
    down="mlp.dense_4h_to_h",
    head_dim_from_hidden=True,
)
# Multimodal Gemma-3 (Gemma3ForConditionalGeneration): the text decoder is pruned, its sizes live in text_config;
# the vision tower is kept whole, and the projection of image features into the residual stream follows the
# hidden channels. Unlike Gemma3ForCausalLM, it applies no final-logit soft-capping, whatever text_config says.
GEMMA3 = DecoderAdapter(
    families=("gemma3",),
    base="model.language_model",
    layers="model.language_model.layers",
    embed="model.language_model.embed_tokens",
    final_norm="model.language_model.norm",
    head_norms=("self_attn.q_norm", "self_attn.k_norm"),
    sub_config="text_config",
    stream_inputs=("model.multi_modal_projector.mm_input_projection_weight",),
    **{**_GEMMA_NORMS, "logit_softcap": None},
)
# SmolLM3 turns RoPE off in every 4th layer: no_rope_layers has one entry per layer.
SMOLLM3 = DecoderAdapter(families=("smollm3",), layer_lists=("layer_types", "no_rope_layers"))
# Ministral 3: Mistral's layout. Its queries are scaled by a factor of the position alone (llama_4_scaling_beta past
# the rope's original context) and every layer may use a sliding window: nothing that depends on a width.
MINISTRAL3 = DecoderAdapter(families=("ministral3",))
# Seed-OSS: Llama's layout with q/k/v biases and a separate o_proj bias (attention_out_bias), sliced with their rows.
# Its attention and residual dropout (0.1 by default) are active while a student trains, as in any training loop.
SEED_OSS = DecoderAdapter(families=("seed_oss",))
# ERNIE 4.5 (dense): Llama's layout, biases on every projection when use_bias, tied embeddings in the small models,
# GLM-style interleaved rotary over the whole head (head_dim is never pruned).
ERNIE4_5 = DecoderAdapter(families=("ernie4_5",))
# InternLM3 loads as LlamaForCausalLM (its config subclasses LlamaConfig and keeps its hidden / heads rule, and
# requires attention_bias == mlp_bias, which pruning never changes).
INTERNLM3 = DecoderAdapter(families=("internlm3",), hidden_divisible_by_heads=True)
# HunYuan dense: Llama's layout plus per-head q/k norms over head_dim, applied after RoPE (query_layernorm,
# key_layernorm). Its NTK-alpha rope reads head_dim, which pruning keeps.
HUNYUAN_DENSE = DecoderAdapter(
    families=("hunyuan_v1_dense",), head_norms=("self_attn.query_layernorm", "self_attn.key_layernorm")
)
# EXAONE 4: OLMo-2's norm placement (after each sublayer, no input norm) with Qwen3's per-head q/k norms; sliding
# and full layers (layer_types, sliced by depth pruning; the full ones use no RoPE when a window is set).
EXAONE4 = DecoderAdapter(
    families=("exaone4",),
    layer_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    residual_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    head_norms=("self_attn.q_norm", "self_attn.k_norm"),
)
# OLMo-3: OLMo-2 (norms after the sublayers, q/k norms over the whole projection, so head pruning is not exact)
# with sliding and full layers (layer_types, one rope per layer type).
OLMO3 = replace(OLMO2, families=("olmo3",), residual_norms=OLMO2.layer_norms)
# GLM-4: a fused gate|up projection (Phi-3's MLP), four norms per layer (the extra post_self_attn_layernorm and
# post_mlp_layernorm sit on the sublayers' outputs, before the residual add), q/k/v biases, partial rotary.
GLM4 = DecoderAdapter(
    families=("glm4",),
    gate_up="mlp.gate_up_proj",
    layer_norms=("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm"),
    residual_norms=("post_self_attn_layernorm", "post_mlp_layernorm"),
)
# Apertus: an MLP without a gate (up -> xIELU -> down; xIELU's two learned scalars are per layer, not per neuron),
# norms named attention_layernorm / feedforward_layernorm, per-head q/k norms over head_dim.
APERTUS = DecoderAdapter(
    families=("apertus",),
    gate=None,
    layer_norms=("attention_layernorm", "feedforward_layernorm"),
    head_norms=("self_attn.q_norm", "self_attn.k_norm"),
)


def _gemma4_refusal(config) -> str:
    """What Gemma 4 (text decoder or multimodal) has that one DecoderAdapter and one ModelShape cannot describe."""
    text = getattr(config, "text_config", None) or config
    missing = []
    geometry: dict[str, tuple] = {}
    for kind in sorted(set(getattr(text, "layer_types", None) or ())):
        try:  # the layer config of each layer type (transformers 5's per_layer_config view)
            layer = text.per_layer_config[kind]
            geometry[kind] = (layer.head_dim, layer.num_key_value_heads)
        except Exception:  # noqa: BLE001 - a layer type whose layers differ among themselves: say so below
            geometry[kind] = ("varies", "varies")
    if len(set(geometry.values())) > 1:
        sizes = ", ".join(f"{kind} head_dim {hd} with {kv} KV heads" for kind, (hd, kv) in geometry.items())
        missing.append(f"attention whose head size and KV heads differ by layer type (per_layer_config: {sizes})")
    if getattr(text, "hidden_size_per_layer_input", 0):
        missing.append(
            "per-layer embeddings (embed_tokens_per_layer and per_layer_model_projection pack one slice per layer, "
            "and each layer's per_layer_input_gate / per_layer_projection read and write the residual stream), "
            "which depth and hidden pruning would have to slice"
        )
    if getattr(text, "num_kv_shared_layers", 0):
        missing.append(
            f"KV sharing (the last {text.num_kv_shared_layers} layers have no k/v projections and attend with an "
            "earlier layer's keys and values, so heads and layers cannot be removed layer by layer)"
        )
    if getattr(text, "attention_k_eq_v", False):
        missing.append("keys reused as values in the full-attention layers (attention_k_eq_v: no v_proj)")
    if getattr(text, "enable_moe_block", False):
        missing.append("a mixture-of-experts block beside the MLP (enable_moe_block)")
    if not missing:
        missing.append("the per_layer_config every Gemma 4 config carries (per-layer attention sizes)")
    return "Gemma 4's decoder layers are not one uniform shape, and compress cannot yet prune " + "; ".join(missing)


def _exaone4_5_refusal(config) -> str:
    return (
        "EXAONE 4.5 is an image-text model that transformers does not load as a causal LM (AutoModelForCausalLM "
        "has no class for it), while every student compress saves must reload with "
        "AutoModelForCausalLM.from_pretrained; its vision merger also writes the residual stream through a Linear "
        "sized by vision_config.out_hidden_size, which hidden pruning cannot slice. Its text decoder is EXAONE 4 "
        "(supported as 'exaone4'): build Exaone4ForCausalLM(config.text_config), load the language model's and "
        "lm_head's weights into it, and compress that"
    )


# Families compress recognises and cannot prune correctly: refused before any work with what is missing, unless an
# installed package declares an adapter for them (the compress.plugins entry points).
_UNSUPPORTED: dict[str, Callable[[Any], str]] = {
    **dict.fromkeys(
        (
            "gemma4",
            "gemma4_text",
            "gemma4_unified",
            "gemma4_unified_text",
            "gemma4_assistant",
            "gemma4_unified_assistant",
        ),
        _gemma4_refusal,
    ),
    "exaone4_5": _exaone4_5_refusal,
}

_ADAPTERS: dict[str, DecoderAdapter] = {}


def register_adapter(
    adapter: DecoderAdapter, *, replace: bool = False, _from_entry_point: bool = False
) -> DecoderAdapter:
    """Make ``adapter`` the one used for each of its ``families`` (config ``model_type`` values).

    A family that already has an adapter (a built-in one included) is only taken over with ``replace=True``:
    silently changing how a supported family is pruned would be a surprise.
    """
    if not _from_entry_point:
        _load_declared_adapters()  # so that a built-in one is there to be replaced (or to refuse the call)
    taken = [f for f in adapter.families if f in _ADAPTERS and _ADAPTERS[f] is not adapter]
    if taken and not replace:
        raise UnsupportedModelError(f"families {taken} already have an adapter; pass replace=True to replace it")
    for family in adapter.families:
        _ADAPTERS[family] = adapter
    return adapter


# The built-in adapters are registered through the compress.plugins entry points in setup.cfg, the same way a
# third-party package declares its own: the registry hands every adapter it finds there to this function.


def _adapter_entry_point(name: str, obj: Any, dist: str) -> bool:
    """A model family's adapter (a ``DecoderAdapter`` instance) declared in the entry-point group: the entry
    point's name must be one of its families. Taking over a family that already has an adapter is refused."""
    if not isinstance(obj, DecoderAdapter):
        return False
    if name not in obj.families:
        raise PluginError(
            f"entry point {name!r} of {dist} points at an adapter for {list(obj.families)}; the "
            "entry-point name must be one of the families it describes"
        )
    try:
        register_adapter(obj, _from_entry_point=True)
    except Exception as exc:  # noqa: BLE001 - say which package tried to take over which family
        raise PluginError(
            f"{dist} declares an adapter for {list(obj.families)}: {exc}. To replace a built-in "
            "adapter, call compress.register_adapter(adapter, replace=True) explicitly"
        ) from exc
    return True


registry.add_entry_point_handler(_adapter_entry_point)


# Config fields that count the experts of a mixture-of-experts layer (Mixtral, Qwen-MoE, DeepSeek, OLMoE, ...).
_EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _load_declared_adapters() -> None:
    """Adapters that installed packages declare in the ``compress.plugins`` entry-point group."""
    registry.load_entry_point_plugins()


def supported_families() -> list[str]:
    _load_declared_adapters()
    return sorted(_ADAPTERS)


def _refuse_unsupported_family(model: nn.Module, model_type: str | None) -> None:
    """Refuse a family of ``_UNSUPPORTED`` that no installed package declares an adapter for: say what is missing."""
    refusal = _UNSUPPORTED.get(model_type) if model_type is not None else None
    if refusal is None:
        return
    _load_declared_adapters()
    if model_type in _ADAPTERS:
        return
    raise UnsupportedModelError(
        f"compress does not support {model_type!r} ({type(model).__name__}): {refusal(model.config)}. "
        "Nothing was changed."
    )


def find_adapter(model: nn.Module) -> DecoderAdapter | None:
    """The adapter for ``model``'s family, or None when the family has none.

    Models no uniform pruning can describe (mixture-of-experts layers, per-layer sizes) are refused here, with
    an adapter or without one.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    _refuse_unsupported_family(model, model_type)
    if getattr(config, "is_heterogeneous", False):  # transformers 5's per_layer_config
        raise UnsupportedModelError(
            f"{model_type!r} has per-layer {sorted(cast(Any, config).per_layer_attributes or [])} in its config "
            "(per_layer_config); compress prunes models with one size per axis for all layers (what a standard "
            "config describes). Nothing was changed."
        )
    experts = next((getattr(config, f) for f in _EXPERT_FIELDS if (getattr(config, f, None) or 0) > 1), None)
    if experts:
        raise UnsupportedModelError(
            f"{model_type!r} ({type(model).__name__}) is a mixture-of-experts model ({experts} experts per layer): "
            "compress prunes dense decoders only (uniform MLP neurons, heads, hidden channels and layers); expert "
            "pruning does not exist yet. Nothing was changed."
        )
    per_layer = [
        f
        for f in ("num_attention_heads", "num_key_value_heads", "intermediate_size")
        if isinstance(getattr(config, f, None), (list, tuple))
    ]
    if per_layer:
        raise UnsupportedModelError(
            f"{model_type!r} has per-layer {per_layer} in its config; compress prunes models with one size per axis "
            "for all layers (what a standard config describes). Nothing was changed."
        )
    adapter = _ADAPTERS.get(model_type) if model_type is not None else None
    if adapter is None:
        _load_declared_adapters()
        adapter = _ADAPTERS.get(model_type) if model_type is not None else None
    return adapter


def _path_of(model: nn.Module, module: nn.Module | None) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None) if module is not None else None


def discovered_layout(model: nn.Module) -> DecoderAdapter | None:
    """Where a decoder without an adapter keeps its layers, embeddings and LM head, found by transformers'
    conventions: the ``nn.ModuleList`` of ``num_hidden_layers`` blocks, ``get_input_embeddings()``,
    ``get_output_embeddings()`` and ``base_model_prefix``. None when any of them cannot be found.

    That is what distillation and export need (they run the decoder stack and the head). The pruning axes need
    every role inside a layer, which only an adapter gives; without one, ``compress.prune`` prunes MLP and
    hidden widths through Torch-Pruning's dependency graph (:mod:`compress.pruning.generic`).
    """
    config = getattr(model, "config", None)
    n_layers = getattr(config, "num_hidden_layers", None)
    base = getattr(model, "base_model_prefix", "") or ""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    embed = _path_of(model, get_in() if get_in else None)
    lm_head = _path_of(model, get_out() if get_out else None)
    layers = [
        name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and n_layers and len(m) == n_layers
    ]
    sizes = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers")
    if not all(isinstance(getattr(config, f, None), int) for f in sizes):
        return None  # the stages that use a layout read these sizes
    if not (base and hasattr(model, base) and embed and lm_head and len(layers) == 1):
        return None
    return DecoderAdapter(
        families=(getattr(config, "model_type", None) or type(model).__name__,),
        base=base,
        layers=layers[0],
        embed=embed,
        lm_head=lm_head,
        final_norm="",
        paths_only=True,
    )


def check_plain_logits(model: nn.Module, layout: DecoderAdapter) -> None:
    """Distillation computes logits as ``lm_head(decoder output)`` (fused with the loss, plus the adapter's
    logit transform). A family without an adapter may transform them further (Cohere multiplies them by
    ``logit_scale``): compare on a few tokens, and refuse what the loss would get wrong."""
    if not layout.paths_only:
        return
    param = next(model.parameters())
    ids = (
        torch.arange(1, 9, device=param.device) % cast(nn.Embedding, model.get_submodule(layout.embed)).num_embeddings
    )[None]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            full = model(input_ids=ids, use_cache=False).logits.float()
            hidden = model.get_submodule(layout.base)(input_ids=ids, use_cache=False)[0]
            plain = model.get_submodule(layout.lm_head)(hidden).float()
    finally:
        model.train(was_training)
    err = (full - plain).abs().max().item()
    if not err <= 1e-3 * max(1.0, full.abs().max().item()):
        raise UnsupportedModelError(
            f"{getattr(model.config, 'model_type', type(model).__name__)!r} has no adapter, and its logits are not "
            f"its LM head applied to its decoder's output (they differ by {err:.3g}: a logit transform such as "
            "Cohere's logit_scale). Distillation would train against the wrong logits; register an adapter that "
            "declares the transform (logit_divisor / logit_softcap). Nothing was changed."
        )


def layout_for(model: nn.Module) -> DecoderAdapter:
    """The family's adapter, or else the :func:`discovered_layout` of a decoder without one (for the stages that
    only run the model: distillation and export)."""
    adapter = find_adapter(model)
    if adapter is None:
        adapter = discovered_layout(model)
    return adapter if adapter is not None else adapter_for(model)  # the error names the supported families


def adapter_for(model: nn.Module) -> DecoderAdapter:
    """The adapter for ``model``'s family, or an error that names the supported ones."""
    adapter = find_adapter(model)
    if adapter is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise UnsupportedModelError(
            f"no adapter for model_type {model_type!r} ({type(model).__name__}); supported families: "
            f"{', '.join(supported_families())}. To add one, describe where its modules live: "
            "compress.models.register_adapter(DecoderAdapter(families=('your_type',), q='...', ...))"
        )
    return adapter
