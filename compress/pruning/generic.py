"""The generic backend: width pruning (MLP neurons, hidden channels) of a decoder family that has no adapter.

Without an adapter nothing says where a family keeps its projections, so Torch-Pruning's ``DependencyGraph``
finds out: it traces one forward pass and returns, for a root channel, every tensor slice coupled to it. Two
kinds of group are pruned, uniformly across layers: each decoder layer's MLP group (rooted at the input
channels of the Linear that consumes the MLP activation, so fused gate|up projections are sliced in pairs) and
the hidden group (rooted at the input embedding's columns: norms, the LM head, and the hidden-side rows/columns
of every projection). Attention heads are never pruned. Every Linear inside an attention module is excluded
from being a group root: Torch-Pruning's walk never returns on RoPE attention (upstream issue #527), and
neither group needs to enter attention (a Linear's input and output channels are not coupled).

Importance is compress's *activation* importance expressed as a ``tp.importance.Importance``: one streamed
calibration pass records, for every Linear inside the decoder layers that a group reads, the sum of ``|x|``
per input channel; a channel's score is the sum, over the group's Linear input-channel dependencies, of
that Linear's mean ``|x|`` (MLP neuron: the down projection's input, as in Minitron; hidden channel: the normed
hidden states entering q/k/v/gate/up). Under ``torchrun`` the sums are all-reduced: every rank selects alike.

Reload safety is proven before the caller's model is touched: a tiny random model of the same config class
goes through the same code with the same fractions removed, is saved, reloaded with plain
``AutoModelForCausalLM.from_pretrained`` and must give the same logits (the MLP step must also equal the
unpruned model with the removed neurons zeroed). Families that tie a shape to hidden_size (StableLM and
Persimmon derive head_dim from it, Helium sizes o_proj hidden x hidden, OLMo's weightless LayerNorm keeps its
width) fail this for hidden channels: the call refuses, or for a budget plans with MLP neurons only.
Parameter counts are exact: which dimension of which tensor each group prunes is read off the graph.
"""

from __future__ import annotations

import copy
import gc
import itertools
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
import torch_pruning as tp
from torch import nn

from ..errors import ConfigError, TargetError, UnsupportedModelError
from ..models import supported_families
from ..report import PruneReport
from ..validate import embedding_rows
from .calibrate import (
    Calibration,
    accumulator_dtype,
    calibration_summary,
    hooks,
    prepare_calibration,
    streamed_pass,
)
from .config import CalibrationConfig, PlanConfig, Target
from .plan import damage_cost, size_grid
from .shape import ModelShape, count_params
from .surgery import top_k_sorted

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_IN, _EMBED_OUT = tp.prune_linear_in_channels, tp.prune_embedding_out_channels
_UNCHANGED = "Nothing was changed."


class InputMagnitudeImportance(tp.importance.Importance):
    """Activation importance of a Torch-Pruning group: per root channel, the sum over the group's Linear
    input-channel dependencies of the mean ``|input|`` that Linear saw on calibration data (``mean_abs``)."""

    def __init__(self, mean_abs: Mapping[nn.Module, torch.Tensor]):
        self.mean_abs = mean_abs

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor:
        roots = list(group[0].root_idxs)
        score = torch.zeros(max(roots) + 1, dtype=torch.float64)
        for item in group:
            stat = self.mean_abs.get(item.dep.target.module)
            if item.dep.handler != _IN or stat is None or any(r is None for r in item.root_idxs):
                continue
            score.index_add_(0, torch.as_tensor(item.root_idxs), stat[torch.as_tensor(item.idxs)].double().cpu())
        return score[roots]


class _Structure:
    """One model as Torch-Pruning's dependency graph sees it: its MLP and hidden groups, the exact parameter
    count of any (hidden, intermediate) shape, activation statistics, and the in-place pruning."""

    def __init__(self, model: nn.Module):
        hf = cast("PreTrainedModel", model)  # a transformers model: the generic backend reads its config
        cfg, self.model = hf.config, hf
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == cfg.num_hidden_layers]
        children = [[[c for c in layer.children() if "Attention" in type(c).__name__] for layer in ml] for ml in lists]
        found = [(ml, [a[0] for a in att]) for ml, att in zip(lists, children) if all(len(a) == 1 for a in att)]
        if len(found) != 1:
            raise UnsupportedModelError(
                f"cannot find the decoder layers of {type(model).__name__}: expected one ModuleList of "
                f"{cfg.num_hidden_layers} layers, each with one child whose class name contains 'Attention'. "
                f"Register an adapter (compress.models.register_adapter). {_UNCHANGED}"
            )
        self.layers, attention = found[0]
        embed, self.head = hf.get_input_embeddings(), hf.get_output_embeddings()
        if not isinstance(embed, nn.Embedding):
            raise UnsupportedModelError(
                f"the input embedding is a {type(embed).__name__}, not an nn.Embedding;"
                f" the generic backend cannot prune it. {_UNCHANGED}"
            )
        self.embed = embed
        in_attn = {id(m) for a in attention for m in itertools.chain(a.modules(), a.parameters())}
        self.layer_of = {m: k for k, layer in enumerate(self.layers) for m in layer.modules()}
        self.dg = _trace(model)
        ignored = [m for a in attention for m in a.modules() if isinstance(m, nn.Linear)]
        ignored += [self.head] if self.head is not None else []  # roots only: the graph is traced whole
        roots: list[list[nn.Linear]] = [[] for _ in self.layers]
        for group in self.dg.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Linear]):
            k = self.layer_of.get(group[0].dep.target.module)
            readers = [it.dep.target.module for it in group if it.dep.handler == _IN]
            if k is None or len(readers) != 1 or readers[0].in_features != cfg.intermediate_size:
                continue  # not an MLP group (left alone)
            if any(id(it.dep.target.module) in in_attn for it in group):
                raise UnsupportedModelError(f"layer {k}'s MLP group reaches into attention; {_UNCHANGED}")
            roots[k].append(readers[0])
        if any(len(r) != 1 for r in roots):
            raise UnsupportedModelError(
                f"expected one MLP of {cfg.intermediate_size} neurons per decoder layer (a Linear reading them), "
                f"found {[len(r) for r in roots]} per layer; the generic backend cannot prune this family. "
                f"Register an adapter. {_UNCHANGED}"
            )
        self.mlp_roots = [r[0] for r in roots]
        self.mlp_groups = [self.dg.get_pruning_group(r, _IN, list(range(r.in_features))) for r in self.mlp_roots]
        self.hidden_group = self.dg.get_pruning_group(self.embed, _EMBED_OUT, list(range(self.embed.embedding_dim)))
        self.poly = self._polynomial(cfg.hidden_size, cfg.intermediate_size)

    def release(self) -> None:
        """Drop the traced autograd nodes, which hold the unpruned weights as saved tensors."""
        for node in self.dg.module2node.values():
            node.grad_fn = None
        self.dg = None

    def _polynomial(self, hidden: int, inter: int) -> dict[tuple[int, int], int]:
        """Parameters as ``{(a, b): c}`` with count = sum c * hidden^a * inter^b: every dimension each group
        prunes, found by running its handler on a meta-device stand-in of the module and seeing what shrinks."""
        roles: dict[int, dict[int, str]] = {}
        for axis, groups in (("hidden", [self.hidden_group]), ("mlp", self.mlp_groups)):
            for item in itertools.chain.from_iterable(groups):
                for param, dim in _pruned_dims(self.dg, item.dep):
                    if roles.setdefault(id(param), {}).setdefault(dim, axis) != axis:
                        raise UnsupportedModelError(
                            f"a tensor dimension is coupled to both MLP and hidden "
                            f"channels; the generic backend cannot prune it. {_UNCHANGED}"
                        )
        poly: dict[tuple[int, int], int] = {}
        for p in self.model.parameters():
            dims, coeff, powers = roles.get(id(p), {}), 1, {"hidden": 0, "mlp": 0}
            for dim, size in enumerate(p.shape):
                base = hidden if dims.get(dim) == "hidden" else inter
                if dim not in dims:
                    coeff *= size
                elif size % base:  # a fused projection holds a multiple (gate|up: 2 x intermediate)
                    raise UnsupportedModelError(
                        f"a {dims[dim]} dimension of size {size} does not match the config ({base}); {_UNCHANGED}"
                    )
                else:
                    coeff, powers[dims[dim]] = coeff * (size // base), powers[dims[dim]] + 1
            key = (powers["hidden"], powers["mlp"])
            poly[key] = poly.get(key, 0) + coeff
        return poly

    def count(self, hidden: int, inter: int) -> int:
        """Exact parameters at hidden size ``hidden`` and intermediate size ``inter``."""
        return sum(c * hidden**a * inter**b for (a, b), c in self.poly.items())

    def calibrate(self, calib: Calibration) -> tuple[dict[nn.Module, torch.Tensor], dict]:
        """Mean ``|x|`` per input channel of every in-layer Linear a group reads, from one streamed pass."""
        readers = {
            it.dep.target.module
            for g in [self.hidden_group, *self.mlp_groups]
            for it in g
            if it.dep.handler == _IN and it.dep.target.module in self.layer_of
        }
        device = next(self.model.parameters()).device
        dtype = accumulator_dtype(device)
        acc = {m: torch.zeros(m.in_features, dtype=dtype, device=device) for m in readers}

        def hook(sums: torch.Tensor):
            def pre(_mod, args):
                sums.add_(args[0].detach().reshape(-1, args[0].shape[-1]).abs().sum(0, dtype=dtype))

            return pre

        prefix = getattr(self.model, "base_model_prefix", "")
        base = prefix if prefix and isinstance(getattr(self.model, prefix, None), nn.Module) else None
        with hooks([lambda m=m, s=s: m.register_forward_pre_hook(hook(s)) for m, s in acc.items()]):
            stats = streamed_pass(self.model, calib, desc="activation importance", base=base, reduce=list(acc.values()))
        return {m: s.cpu() / calib.num_tokens for m, s in acc.items()}, stats

    def apply(self, keep_mlp: list[list[int]] | None, keep_hidden: list[int] | None, head_dim: int) -> None:
        """Prune in place to the kept channels; re-tie the LM head, keep requires_grad, update the config."""
        model, cfg = self.model, self.model.config
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        tied = self.head is not None and self.head.weight is self.embed.weight
        with torch.no_grad():
            for root, keep in zip(self.mlp_roots, keep_mlp or []):
                self.dg.get_pruning_group(root, _IN, sorted(set(range(root.in_features)) - set(keep))).prune()
            if keep_hidden is not None:
                dropped = sorted(set(range(self.embed.embedding_dim)) - set(keep_hidden))
                self.dg.get_pruning_group(self.embed, _EMBED_OUT, dropped).prune()
        if tied:
            self.head.weight = self.embed.weight
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        cfg.intermediate_size = self.mlp_roots[0].in_features
        if keep_hidden is not None:
            cfg.hidden_size = self.embed.embedding_dim
            cfg.head_dim = head_dim


def _pruned_dims(dg: tp.DependencyGraph, dep) -> list[tuple[nn.Parameter, int]]:
    """The (parameter, dimension) pairs a dependency's handler prunes, found on a meta-device stand-in of its
    module (nothing real is sliced)."""
    target = dep.target.module
    if isinstance(target, nn.Parameter):
        return [(target, dg.module2node[target].pruning_dim % target.dim())]
    if not isinstance(target, nn.Module) or not target._parameters:
        return []
    fake = copy.copy(target)  # shallow: attributes the handler rewrites land on the copy only
    fake._parameters = {
        n: None if p is None else nn.Parameter(torch.empty(p.shape, device="meta"), False)
        for n, p in target._parameters.items()
    }
    fake._buffers = dict(target._buffers)
    dep.handler(fake, [0])
    return [
        (p, d)
        for n, p in target._parameters.items()
        if p is not None and fake._parameters.get(n) is not None
        for d in range(p.dim())
        if cast(nn.Parameter, fake._parameters[n]).shape[d] != p.shape[d]  # not None: checked above
    ]


def _trace(model: nn.Module) -> tp.DependencyGraph:
    """Build the dependency graph; requires_grad, mode and hooks of the model are as before, also on error."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    hooks_before = {m: set(m._forward_hooks) for m in model.modules()}
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(True)
        with torch.enable_grad():  # the graph is read off autograd
            example = torch.arange(1, 9, device=device).unsqueeze(0) % embedding_rows(model)
            return tp.DependencyGraph().build_dependency(
                model, example, forward_fn=lambda m, x: m(input_ids=x, use_cache=False).logits, verbose=False
            )
    finally:
        for m, before in hooks_before.items():  # Torch-Pruning leaves its hooks behind when the forward fails
            for key in set(m._forward_hooks) - before:
                del m._forward_hooks[key]
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


class _PreflightFailed(Exception):
    """The reload preflight failed at ``axis`` (``"setup"``, ``"mlp"`` or ``"hidden"``) because of ``cause``."""

    def __init__(self, axis: str, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {' '.join(str(cause).split())[:300]}")
        self.axis, self.cause = axis, cause


def _tiny_like(model: nn.Module) -> PreTrainedModel:
    """A 2-layer float32 random model of the same class: hidden 64, at most 2 KV heads and 2 query heads per
    KV head, head_dim kept equal to hidden/heads where the teacher's is (so families that derive it agree)."""
    hf = cast("PreTrainedModel", model)  # a transformers model (the generic backend's input)
    cfg, d = hf.config, hf.config.to_dict()
    heads, shape = cfg.num_attention_heads, ModelShape.from_config(cfg)
    kv = min(shape.num_key_value_heads, 2)
    q = kv * min(heads // shape.num_key_value_heads, 2)
    new = dict(hidden_size=64, intermediate_size=128, num_attention_heads=q, num_hidden_layers=2, vocab_size=256)
    if "num_key_value_heads" in d:
        new["num_key_value_heads"] = kv
    if "head_dim" in d:
        new["head_dim"] = 64 // q if shape.head_dim * heads == cfg.hidden_size else 24
    for key, value in d.items():
        if isinstance(value, list) and len(value) == cfg.num_hidden_layers:
            new[key] = value[:2]
        elif key.endswith("_token_id") and isinstance(value, int) and value >= 256:
            new[key] = None
    d.pop("quantization_config", None)
    tiny_cfg = type(cfg).from_dict({**d, **new})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tiny = type(hf)._from_config(tiny_cfg, attn_implementation="eager", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights large enough that a wrong slice changes the logits visibly
        for p in tiny.parameters():
            p.normal_(0, 0.2, generator=g) if p.dim() > 1 else p.uniform_(0.5, 1.5, generator=g)
    return tiny.eval()


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits of ``ids``, without gradients."""
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def _check_close(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """Raise an AssertionError naming ``what`` when ``got`` and ``want`` differ beyond float noise."""
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    if not err <= 1e-4 * max(1.0, scale):
        raise AssertionError(f"{what} differ by {err:.3g} (logit scale {scale:.3g})")


def _preflight(model: nn.Module, remove_mlp: float, remove_hidden: float) -> None:
    """Prune a tiny model of the same class by the same fractions, save, reload and compare; raises
    :class:`_PreflightFailed` naming the axis ("setup", "mlp" or "hidden") that broke."""
    from transformers import AutoModelForCausalLM

    try:
        tiny = _tiny_like(model)
        s = _Structure(tiny)
    except Exception as exc:  # noqa: BLE001 - any failure is a refusal with its cause
        raise _PreflightFailed("setup", exc) from exc
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 12), generator=g)
    hidden, inter, head_dim = 64, 128, ModelShape.from_config(tiny.config).head_dim
    with tempfile.TemporaryDirectory() as tmp:
        for axis, frac in (("mlp", remove_mlp), ("hidden", remove_hidden)):
            if frac <= 0:
                continue
            try:
                size = inter if axis == "mlp" else hidden
                k = min(size - 1, max(1, round(size * (1 - frac))))
                if axis == "mlp":
                    keep = [sorted(torch.randperm(size, generator=g)[:k].tolist()) for _ in s.mlp_roots]
                    with torch.no_grad():  # zeroing the removed neurons' readers must equal removing them
                        for root, kept in zip(s.mlp_roots, keep):
                            for it in s.dg.get_pruning_group(root, _IN, sorted(set(range(size)) - set(kept))):
                                if it.dep.handler == _IN:
                                    it.dep.target.module.weight[:, it.idxs] = 0
                    masked = _logits(tiny, ids)
                    s.apply(keep, None, head_dim)
                    _check_close(
                        "logits of the MLP-pruned model and of the model with those neurons zeroed",
                        _logits(tiny, ids),
                        masked,
                    )
                    inter = k
                else:
                    s.apply(None, sorted(torch.randperm(size, generator=g)[:k].tolist()), head_dim)
                    hidden = k
                    _check_hidden_size_not_read_at_runtime(tiny, ids, size)
                pruned = _logits(tiny, ids)
                if count_params(tiny) != s.count(hidden, inter):
                    raise AssertionError(f"{count_params(tiny)} parameters, {s.count(hidden, inter)} planned")
                tiny.save_pretrained(f"{tmp}/{axis}")
                back = AutoModelForCausalLM.from_pretrained(
                    f"{tmp}/{axis}", attn_implementation="eager", dtype=torch.float32
                ).eval()
                _check_close("logits of the reloaded and the in-memory pruned model", _logits(back, ids), pruned)
            except Exception as exc:  # noqa: BLE001
                raise _PreflightFailed(axis, exc) from exc


def _check_hidden_size_not_read_at_runtime(tiny: PreTrainedModel, ids: torch.Tensor, old_hidden: int) -> None:
    """A family that reads ``config.hidden_size`` while it runs (Gemma scales its embeddings by √hidden_size)
    computes something else once hidden channels are gone, in memory and after a reload alike: the sliced
    weights must give the same logits whatever ``hidden_size`` the config says."""
    new_hidden = tiny.config.hidden_size
    pruned = _logits(tiny, ids)
    try:
        tiny.config.hidden_size = old_hidden
        as_before = _logits(tiny, ids)
    finally:
        tiny.config.hidden_size = new_hidden
    err = (pruned - as_before).abs().max().item()
    if not err <= 1e-4 * max(1.0, as_before.abs().max().item()):
        raise AssertionError(
            f"the model reads config.hidden_size while it runs (logits change by {err:.3g} with "
            "it; e.g. an embedding scale of sqrt(hidden_size)), so pruning hidden channels would "
            "change what it computes"
        )


def _plan(
    teacher: ModelShape, count: Callable[[int, int], int], budget: int, config: PlanConfig, hidden: bool
) -> tuple[int, int, str]:
    """The (hidden, intermediate) grid shape within tolerance below ``budget`` with the lowest damage cost
    (:func:`compress.pruning.plan.damage_cost`), or the largest below it; heads and layers are kept."""
    f, m = config.min_fraction, config.multiple_of
    hiddens = size_grid(teacher.hidden_size, m, f) if hidden else [teacher.hidden_size]
    inters = size_grid(teacher.intermediate_size, m, f)
    smallest = count(min(hiddens), min(inters))
    if smallest > budget:
        raise TargetError(
            f"target of {budget:,} parameters is below the smallest shape the generic backend allows ({smallest:,}: "
            f"hidden {min(hiddens)}, intermediate {min(inters)}; heads and layers are kept"
            + ("" if hidden else ", and hidden channels cannot be pruned for this family")
            + f"). {_UNCHANGED}"
        )
    low, best, fallback, n = budget * (1 - config.tolerance), None, None, 0
    for d, i in itertools.product(hiddens, inters):
        p = count(d, i)
        if p > budget or (d, i) == (teacher.hidden_size, teacher.intermediate_size):
            continue
        if p < low:
            fallback = max(fallback or (p, d, i), (p, d, i))
            continue
        n += 1
        key = (damage_cost(teacher, teacher.replace(hidden_size=d, intermediate_size=i), config.weights), -p, d, i)
        best = min(best or key, key)
    if best is None and fallback is None:
        raise TargetError(f"no (hidden, intermediate) shape on the grid lies below {budget:,} params. {_UNCHANGED}")
    if best is None:
        assert fallback is not None  # refused above when both are None
        return (
            fallback[1],
            fallback[2],
            (
                f"no grid shape (multiples of {m}) lands within {config.tolerance:.0%} "
                f"below {budget:,}; took the largest below it"
            ),
        )
    return (
        best[2],
        best[3],
        (
            f"{n} (hidden, intermediate) shapes on the grid (multiples of {m}) land within "
            f"{config.tolerance:.0%} below {budget:,} params; chose the lowest damage cost "
            f"sum(w*removed^2) with weights {dict(config.weights)}"
        ),
    )


def _check_request(
    model: nn.Module, family: str, target: Any, data: Any, strategy: str, plugins: Any, importance: Any
) -> tuple[ModelShape, Target]:
    """Refuse, before any work, what the generic backend cannot do; returns the teacher shape and the target."""
    cfg = model.config
    if strategy != "width":
        raise ConfigError(
            f"{family} has no adapter, and the generic backend prunes widths only (MLP neurons and "
            f"hidden channels); strategy={strategy!r} needs an adapter to remove layers. Use "
            f"strategy='width', or register one (compress.models.register_adapter). {_UNCHANGED}"
        )
    if plugins:
        raise ConfigError(
            f"plugins={plugins!r} given, but {family} has no adapter: the generic Torch-Pruning backend "
            f"has its own fixed MLP/hidden path and activation importance. Drop plugins. {_UNCHANGED}"
        )
    if importance is not None:
        raise ConfigError(
            f"precomputed importance= cannot be used for {family} (no adapter): the generic backend "
            f"scores Torch-Pruning groups itself from calibration data. {_UNCHANGED}"
        )
    if data is None:
        raise ConfigError(
            f"{family} has no adapter; the generic backend uses activation importance, which needs "
            f"calibration data (text with a tokenizer, or token ids). {_UNCHANGED}"
        )
    missing = [
        f
        for f in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers")
        if not isinstance(getattr(cfg, f, None), int)
    ]
    if missing or getattr(cfg, "quantization_config", None) is not None:
        raise UnsupportedModelError(
            f"{family} has no adapter (supported families: {', '.join(supported_families())}) and its config "
            + (f"has no integer {missing}" if missing else "is quantized")
            + ", so the generic backend cannot "
            f"prune it either. To add one: compress.models.register_adapter(DecoderAdapter(...)). {_UNCHANGED}"
        )
    teacher = ModelShape.from_config(cfg)
    parsed = Target.parse(target, count_params(model))
    if parsed.shape is not None:
        other = {
            k: v
            for k, v in parsed.shape.items()
            if k not in ("hidden_size", "intermediate_size") and v != getattr(teacher, k)
        }
        if other:
            raise TargetError(
                f"target changes {sorted(other)}, but {family} has no adapter: the generic backend "
                f"keeps attention heads and layers and prunes only hidden_size / intermediate_size. "
                f"{_UNCHANGED}"
            )
        teacher.replace(**parsed.shape).check_within(teacher)
    return teacher, parsed


def _choose_shape(
    model: nn.Module, family: str, s: _Structure, teacher: ModelShape, parsed: Target, config: PlanConfig
) -> tuple[int, int, str]:
    """(hidden, intermediate, reason) for the target, proven by :func:`_preflight` to survive a reload; a budget
    falls back to MLP neurons only where hidden pruning does not survive it, an explicit hidden target is refused."""
    if parsed.shape is not None:
        d = parsed.shape.get("hidden_size", teacher.hidden_size)
        i = parsed.shape.get("intermediate_size", teacher.intermediate_size)
        reason = f"explicit shape {dict(parsed.shape)} requested"
    else:
        assert parsed.params is not None  # a budget target: params is set when shape is not
        d, i, reason = _plan(teacher, s.count, parsed.params, config, hidden=True)
    try:
        try:
            _preflight(model, 1 - i / teacher.intermediate_size, 1 - d / teacher.hidden_size)
        except _PreflightFailed as failed:
            if failed.axis != "hidden":
                raise
            if parsed.shape is not None:
                alt = next(
                    (
                        n
                        for n in size_grid(teacher.intermediate_size, config.multiple_of, 0.01)
                        if s.count(teacher.hidden_size, n) <= s.count(d, i)
                    ),
                    None,
                )
                raise UnsupportedModelError(
                    f"hidden channels of {family} cannot be pruned without an adapter: a tiny model of this class "
                    f"pruned the same way fails its save/reload check ({failed}). Prune MLP neurons only, "
                    + (f"e.g. target={{'intermediate_size': {alt}}} (about the same size), " if alt else "")
                    + f"or register an adapter. {_UNCHANGED}"
                ) from failed
            assert parsed.params is not None  # a budget target (an explicit shape was refused just above)
            d, i, reason = _plan(teacher, s.count, parsed.params, config, hidden=False)
            reason += f"; hidden channels kept: they fail the reload preflight for this family ({failed})"
            _preflight(model, 1 - i / teacher.intermediate_size, 0.0)
    except _PreflightFailed as failed:
        raise UnsupportedModelError(
            f"the generic Torch-Pruning backend cannot prune {family}: a tiny model of this class, pruned the same "
            f"way, failed at the {failed.axis} step of its save/reload check ({failed}). Register an adapter. "
            f"{_UNCHANGED}"
        ) from failed
    return d, i, reason


@torch.inference_mode(False)  # called under inference mode, it still builds autograd graphs and normal weights
def prune_generic(
    model: nn.Module,
    target: Any,
    data: Any,
    *,
    strategy: str = "width",
    plugins: Any = None,
    tokenizer: Any = None,
    calibration: CalibrationConfig | None = None,
    plan: PlanConfig | None = None,
    importance: Any = None,
) -> PruneReport:
    """Prune MLP neurons and hidden channels of a model whose family has no adapter, in place (see the module
    docstring). Every check, the reload preflight and the selection happen before the model is modified.

    The arguments are :func:`compress.prune`'s, checked by it (``data``: the calibration data; ``calibration``
    and ``plan``: the configs); ``prune`` also puts the model back if this raises."""
    start = time.perf_counter()
    family = f"{getattr(model.config, 'model_type', None)!r} ({type(model).__name__})"
    if any(p.is_inference() for p in model.parameters()):
        raise ConfigError(
            f"{family}'s weights were created under torch.inference_mode(); Torch-Pruning traces "
            "the model with autograd, which inference tensors cannot join. Load the model outside "
            f"inference_mode. {_UNCHANGED}"
        )
    teacher, parsed = _check_request(model, family, target, data, strategy, plugins, importance)
    params_before = count_params(model)
    calib = prepare_calibration(model, tokenizer, data, calibration or CalibrationConfig())
    try:
        s = _Structure(model)
    except Exception as exc:  # noqa: BLE001 - a model Torch-Pruning cannot trace is refused with the cause
        if isinstance(exc, UnsupportedModelError):
            raise
        raise UnsupportedModelError(
            f"Torch-Pruning could not trace {family} ({type(exc).__name__}: {exc}); register an adapter. {_UNCHANGED}"
        ) from exc
    d, i, reason = _choose_shape(model, family, s, teacher, parsed, plan or PlanConfig())

    mean_abs, stats = s.calibrate(calib)
    scorer = InputMagnitudeImportance(mean_abs)
    mlp_scores = torch.stack([scorer(g) for g in s.mlp_groups])
    hidden_scores = scorer(s.hidden_group)
    keep_mlp = [top_k_sorted(sc, i).tolist() for sc in mlp_scores] if i < teacher.intermediate_size else None
    keep_hidden = top_k_sorted(hidden_scores, d).tolist() if d < teacher.hidden_size else None
    planned = s.count(d, i)
    s.apply(keep_mlp, keep_hidden, teacher.head_dim)
    s.release()
    del s, scorer, mean_abs
    gc.collect()  # the graph's nodes reference each other: without a collection the old weights stay alive
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    after = teacher.replace(hidden_size=d, intermediate_size=i)
    params_after = count_params(model)
    if params_after != planned or ModelShape.from_config(model.config) != after:
        raise RuntimeError(
            f"internal error: planned {planned:,} params at {after}, but the pruned model has "
            f"{params_after:,} at {ModelShape.from_config(model.config)}"
        )
    removed = {
        axis: {"plugin": "generic", "backend": "torch-pruning", "kept": new, "removed": old - new}
        for axis, old, new in (("mlp", teacher.intermediate_size, i), ("hidden", teacher.hidden_size, d))
        if new != old
    }
    spread = {
        name: {"min": float(v.min()), "median": float(v.median()), "max": float(v.max())}
        for name, v in (("mlp", mlp_scores), ("hidden", hidden_scores))
    }
    return PruneReport(
        strategy=strategy,
        importance="activation",
        target=parsed.requested,
        plan_reason=(
            f"generic Torch-Pruning backend ({family} has no adapter): MLP neurons and hidden channels "
            f"pruned through torch-pruning's DependencyGraph, attention heads kept; {reason}"
        ),
        shape_before=teacher.to_dict(),
        shape_after=after.to_dict(),
        params_before=params_before,
        params_after=params_after,
        removed=removed,
        importance_summary={
            "method": "activation",
            "backend": "torch-pruning",
            "statistic": "mean |input| per channel of the group's Linear readers",
            **stats,
            **spread,
        },
        calibration=calibration_summary(calib),
        seconds=round(time.perf_counter() - start, 3),
        kept={"hidden": keep_hidden} if keep_hidden is not None else {},
    )
