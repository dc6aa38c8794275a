"""The pruning stage: resolve plugins, calibrate, score, plan, select, slice — in that order, nothing mutated
until every check has passed and every selection is made and checked; and if slicing still fails, the model is
put back as it was (:class:`_Snapshot`)."""

from __future__ import annotations

import copy
import operator
import time
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from .. import registry
from ..data import TextSource
from ..errors import CompressError, ConfigError, PluginError
from ..models import adapter_for, find_adapter
from ..plugin_api import AXES, AxisPlugin, ImportancePlugin, PruneContext
from ..report import PruneReport
from ..validate import check_finite_weights, weight_sums
from .calibrate import Calibration, CalibrationConfig, Importance, prepare_calibration
from .plan import STRATEGIES, PlanConfig, Target, plan_shape
from .shape import ModelShape, ParamFormula, changed_axes, count_params

PluginsArg = Mapping[str, Any] | Sequence[str] | None
DEFAULT_IMPORTANCE = "activation"
_SCORE_FIELDS = ("mlp", "heads", "hidden", "layers")


def _normalize_plugins(plugins: PluginsArg) -> dict[str, Any]:
    if plugins is None:
        return {}
    if isinstance(plugins, str):
        return {plugins: None}
    if isinstance(plugins, Mapping):
        chosen = dict(plugins)
    elif isinstance(plugins, (list, tuple, set, frozenset)):
        chosen = {name: None for name in plugins}
    else:
        raise ConfigError(
            f"plugins should be a plugin name, a list of names or a dict of name -> config, got "
            f"{type(plugins).__name__} {plugins!r}"
        )
    bad = [name for name in chosen if not isinstance(name, str) or not name]
    if bad:
        raise ConfigError(f"plugin names should be non-empty strings, got {bad[0]!r} in plugins={plugins!r}")
    return chosen


def resolve_plugins(plugins: PluginsArg, needed_axes: Sequence[str]) -> tuple[ImportancePlugin, dict[str, AxisPlugin]]:
    """Build the importance plugin and one axis plugin per needed axis.

    ``plugins`` maps plugin names to configs (a Config, a dict of its fields, or None), or lists names. Naming an
    importance plugin replaces ``activation``; naming an axis plugin replaces the built-in one for its axis.
    """
    chosen = _normalize_plugins(plugins)
    importance: ImportancePlugin | None = None
    axes: dict[str, AxisPlugin] = {}
    for name, config in chosen.items():
        cls = registry.get_plugin(name)
        if cls.kind not in ("importance", "axis"):
            raise PluginError(
                f"{name!r} is a {cls.kind} plugin, which runs after pruning, not during it: pass "
                f"reconstruct={name!r} to compress.compress (or call compress.pruning.reconstruct) instead of "
                "naming it in plugins"
            )
        plugin = registry.build_plugin(name, cls.kind, config)
        if cls.kind == "importance":
            if importance is not None:
                raise PluginError(f"two importance plugins given ({importance.name!r}, {name!r}); choose one")
            importance = plugin
        else:
            if plugin.axis not in AXES:
                raise PluginError(f"axis plugin {name!r} declares axis {plugin.axis!r}; expected one of {AXES}")
            if plugin.axis in axes:
                raise PluginError(
                    f"two plugins given for the {plugin.axis!r} axis ({axes[plugin.axis].name!r}, {name!r})"
                )
            axes[plugin.axis] = plugin
    if importance is None:
        importance = registry.build_plugin(DEFAULT_IMPORTANCE, "importance")
    for axis in needed_axes:
        if axis not in axes:
            axes[axis] = registry.build_plugin(axis, "axis")
    return importance, {a: axes[a] for a in AXES if a in needed_axes}


# -- checks of what plugins hand back --------------------------------------------------------------------------


def _who(plugin: Any) -> str:
    return f"{getattr(plugin, 'kind', 'importance')} plugin {getattr(plugin, 'name', type(plugin).__name__)!r}"


def _call(plugin: Any, method: str, *args: Any) -> Any:
    """Run one plugin method. A :class:`CompressError` keeps its type and gains the plugin's name (unless it
    already says it); any other exception becomes a :class:`PluginError` naming the plugin and the method, with
    the original as ``__cause__``."""
    try:
        return getattr(plugin, method)(*args)
    except CompressError as exc:
        name = repr(getattr(plugin, "name", None))
        if name not in str(exc) and len(exc.args) == 1 and isinstance(exc.args[0], str):
            exc.args = (f"{_who(plugin)}: {exc.args[0]}",)
        raise
    except Exception as exc:  # noqa: BLE001 - a plugin's bug, reported as the plugin's
        raise PluginError(f"{_who(plugin)} failed in {method}(): {type(exc).__name__}: {exc}") from exc


def expected_importance_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """The shape of each :class:`Importance` field for a model of ``shape``."""
    return {
        "mlp": (shape.num_hidden_layers, shape.intermediate_size),
        "heads": (shape.num_hidden_layers, shape.num_attention_heads),
        "hidden": (shape.hidden_size,),
        "layers": (shape.num_hidden_layers,),
    }


def check_importance(importance: Any, shape: ModelShape, plugin: Any = None) -> None:
    """Refuse scores that cannot rank this model's channels: not an :class:`Importance`, a field that is not a
    tensor, of the wrong shape, not floating point, or with NaN/inf. ``plugin``: the importance plugin that
    computed them (errors are then :class:`PluginError` naming it), or None for scores passed in as
    ``importance=`` (:class:`ConfigError`)."""
    error: type[CompressError]
    if plugin is not None:
        who, error = _who(plugin), PluginError
        fix = (
            "an importance plugin must return finite floating-point scores of the model's shape (from a "
            "built-in plugin, non-finite scores mean the model's activations overflowed: score it in float32)"
        )
    else:
        method = getattr(importance, "method", None)
        who = "precomputed importance" + (f" (from {method!r})" if isinstance(method, str) else "")
        error, fix = ConfigError, "recompute them with compress.score_importance on this unpruned model"
    if not isinstance(importance, Importance):
        raise error(f"{who} should be a compress.Importance, got {type(importance).__name__}")
    for name, dims in expected_importance_shapes(shape).items():
        value = getattr(importance, name)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise error(
                f"{who} gave {name!r} scores as {type(value).__name__}; they should be a torch.Tensor of "
                f"shape {dims}; {fix}"
            )
        if tuple(value.shape) != dims:
            raise error(
                f"{who} gave {name!r} scores of shape {tuple(value.shape)}, but this model needs {dims}: "
                f"scores must come from this same unpruned model; {fix}"
            )
        if not value.is_floating_point():
            raise error(
                f"{who} gave {name!r} scores of dtype {value.dtype}; scores must be floating point "
                f"(ties between integer scores make the ranking arbitrary); {fix}"
            )
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            bad = (~finite).nonzero()
            first = tuple(bad[0].tolist())
            raise error(
                f"{who} gave {name!r} scores with {bad.shape[0]} NaN/inf value(s) (the first at index "
                f"{first[0] if len(first) == 1 else first}: {value[first].item()}); scores must be finite "
                f"to rank channels; {fix}"
            )


def _indices(values: Any, count: int, limit: int, what: str, plugin: Any) -> list[int]:
    """Check one list of kept indices: exactly ``count`` distinct integers in ``0..limit-1``."""
    if isinstance(values, torch.Tensor) and not values.is_floating_point() and values.dtype != torch.bool:
        values = values.tolist()
    if not isinstance(values, (list, tuple, range)):
        raise PluginError(
            f"{_who(plugin)} selected {what} as {type(values).__name__}; select() must return a list of integer indices"
        )
    if len(values) != count:
        raise PluginError(
            f"{_who(plugin)} keeps {len(values)} {what}, but the plan keeps {count}: select() must "
            "keep exactly the planned number"
        )
    out = []
    for v in values:
        if isinstance(v, bool) or not hasattr(v, "__index__"):
            raise PluginError(
                f"{_who(plugin)} selected {what} with the index {v!r} of type {type(v).__name__}; "
                "indices must be integers"
            )
        out.append(operator.index(v))
    outside = [i for i in out if not 0 <= i < limit]
    if outside:
        raise PluginError(
            f"{_who(plugin)} selected {what} with the index {outside[0]}, out of range: the teacher "
            f"has {limit} (indices 0..{limit - 1})"
        )
    if len(set(out)) != len(out):
        seen: set[int] = set()
        for dup in out:  # the first index met a second time
            if dup in seen:
                break
            seen.add(dup)
        raise PluginError(f"{_who(plugin)} keeps index {dup} of the {what} more than once; indices must be distinct")
    return out


def _field(selection: Any, key: str, axis: str, plugin: Any) -> Any:
    if not isinstance(selection, Mapping):
        raise PluginError(
            f"{_who(plugin)} returned a selection of type {type(selection).__name__}; select() must "
            "return a dict (see compress.AxisPlugin.select)"
        )
    if key not in selection:
        raise PluginError(
            f"{_who(plugin)} returned a selection without {key!r} (keys: {sorted(map(str, selection))}); "
            f"the {axis} axis needs it (see compress.AxisPlugin.select)"
        )
    return selection[key]


def _per_layer(values: Any, layers: int, what: str, plugin: Any) -> list:
    if not isinstance(values, (list, tuple)) or len(values) != layers:
        got = f"{len(values)} entries" if isinstance(values, (list, tuple)) else type(values).__name__
        raise PluginError(
            f"{_who(plugin)} selected {what} as {got}; select() must give one list per layer of the teacher ({layers})"
        )
    return list(values)


def check_selection(axis: str, selection: Any, before: ModelShape, after: ModelShape, plugin: Any) -> None:
    """Refuse a selection that does not describe the planned shape (see :meth:`AxisPlugin.select`)."""
    n = before.num_hidden_layers
    if axis == "mlp":
        for i, keep in enumerate(_per_layer(_field(selection, "keep", axis, plugin), n, "MLP neurons", plugin)):
            _indices(keep, after.intermediate_size, before.intermediate_size, f"MLP neurons in layer {i}", plugin)
    elif axis == "heads":
        queries = _per_layer(_field(selection, "query_heads", axis, plugin), n, "query heads", plugin)
        groups = _per_layer(_field(selection, "kv_heads", axis, plugin), n, "KV heads", plugin)
        g_before, g_after = before.group_size, after.group_size
        for i, (q, kv) in enumerate(zip(queries, groups)):
            q = _indices(q, after.num_attention_heads, before.num_attention_heads, f"query heads in layer {i}", plugin)
            kv = set(
                _indices(kv, after.num_key_value_heads, before.num_key_value_heads, f"KV heads in layer {i}", plugin)
            )
            per_group = {k: 0 for k in kv}
            for h in q:
                if h // g_before not in per_group:
                    raise PluginError(
                        f"{_who(plugin)} keeps query head {h} in layer {i}, whose KV group "
                        f"{h // g_before} it removes; every kept query head must be in a kept group"
                    )
                per_group[h // g_before] += 1
            uneven = {k: c for k, c in per_group.items() if c != g_after}
            if uneven:
                raise PluginError(
                    f"{_who(plugin)} keeps {uneven} query heads per KV group in layer {i}; the plan "
                    f"keeps {g_after} in each kept group (GQA needs the same number in every group)"
                )
    elif axis == "hidden":
        _indices(
            _field(selection, "keep", axis, plugin), after.hidden_size, before.hidden_size, "hidden channels", plugin
        )
    elif axis == "depth":
        _indices(_field(selection, "keep", axis, plugin), after.num_hidden_layers, n, "layers", plugin)


_AXIS_FIELDS = {
    "mlp": ("intermediate_size",),
    "heads": ("num_attention_heads", "num_key_value_heads"),
    "hidden": ("hidden_size",),
    "depth": ("num_hidden_layers",),
}


def _structure_problem(model: nn.Module, adapter, shape: ModelShape) -> str | None:
    """How the layers and the embedding of ``model`` differ from the sizes of ``shape``, or None."""
    layers = adapter.decoder_layers(model)
    if len(layers) != shape.num_hidden_layers:
        return f"the model has {len(layers)} layers, but the plan has {shape.num_hidden_layers}"
    hd = shape.head_dim
    expected = adapter.expected_shapes(
        shape.hidden_size, shape.intermediate_size, shape.num_attention_heads * hd, shape.num_key_value_heads * hd
    )
    for i, layer in enumerate(layers):
        for path, want in expected.items():
            got = tuple(layer.get_submodule(path).weight.shape)
            if got != want:
                return f"layer {i}'s {path} has weight shape {got}, but the plan needs {want}"
    width = cast(nn.Embedding, model.get_submodule(adapter.embed)).weight.shape[-1]
    if width != shape.hidden_size:
        return f"the embedding has {width} channels, but the plan has {shape.hidden_size}"
    return None


# -- undoing a failed prune ------------------------------------------------------------------------------------


class _Snapshot:
    """What pruning may change, kept so that a failure can be undone — without copying any weight.

    :mod:`compress.pruning.surgery` (and a well-behaved axis plugin) *replaces* parameters rather than writing into
    them, so keeping every module's attributes (its ``_parameters``/``_buffers``/``_modules`` dicts, sizes such
    as ``in_features``, train/eval mode), every parameter object with its ``.data``, ``requires_grad`` and
    ``.grad``, and every config's fields is enough to put the model back: the old parameter objects are put back
    in place. Buffers are small and are copied (Gemma's ``embed_scale`` is filled in place). The parameters'
    float64 sums (taken anyway by the NaN/inf check) then tell whether something was written into a weight in
    place, which cannot be undone without a copy; :meth:`restore` returns those names.

    The cost: the teacher's tensors stay alive until pruning succeeds, so the peak memory of the apply step is
    the teacher plus the student.
    """

    def __init__(self, model: nn.Module, sums: dict[str, float]) -> None:
        from transformers import PretrainedConfig

        self.model, self.sums = model, sums
        self.modules = []
        for module in model.modules():
            attrs = dict(vars(module))
            self.modules.append((module, attrs, {k: dict(v) for k, v in attrs.items() if isinstance(v, dict)}))
        self.params = [(p, p.data, p.requires_grad, p.grad) for p in model.parameters()]
        self.buffers = [(b, b.data, b.detach().clone()) for b in model.buffers()]
        configs: dict[int, Any] = {}
        stack = [getattr(model, "config", None)] + [getattr(m, "config", None) for m in model.modules()]
        while stack:
            cfg = stack.pop()
            if isinstance(cfg, PretrainedConfig) and id(cfg) not in configs:
                configs[id(cfg)] = cfg
                stack.extend(v for v in vars(cfg).values() if isinstance(v, PretrainedConfig))
        self.configs = [
            (cfg, {k: v if isinstance(v, PretrainedConfig) else _copy(v) for k, v in vars(cfg).items()})
            for cfg in configs.values()
        ]

    def restore(self) -> list[str]:
        """Put everything back; return the names of parameters whose values were changed in place."""
        with torch.no_grad():
            for module, attrs, dicts in self.modules:
                for key, items in dicts.items():
                    attrs[key].clear()
                    attrs[key].update(items)
                current = vars(module)
                current.clear()
                current.update(attrs)
            for p, data, requires_grad, grad in self.params:  # touch only what changed (inference tensors)
                if not p.data.is_set_to(data):
                    p.data = data
                if p.requires_grad != requires_grad:
                    p.requires_grad_(requires_grad)
                if p.grad is not grad:
                    p.grad = grad
            for b, data, saved in self.buffers:
                if not b.data.is_set_to(data):
                    b.data = data
                if not torch.equal(b, saved):
                    b.copy_(saved)
        for cfg, fields in self.configs:
            vars(cfg).clear()
            vars(cfg).update(fields)
        now = weight_sums(self.model)
        return [name for name, value in self.sums.items() if now.get(name) != value]  # sums are finite here

    def undo(self, exc: BaseException) -> None:
        """Restore the model after ``exc`` and say in its message whether that fully worked."""
        try:
            changed = self.restore()
        except Exception as failure:  # noqa: BLE001 - the original error matters more; say the restore failed
            changed = [f"(the restore itself failed: {type(failure).__name__}: {failure})"]
        if changed:
            shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
            note = (
                f" The model could not be fully restored: {shown} were written into in place (a plugin must "
                "replace parameters, as compress.pruning.surgery does); reload the model."
            )
        elif "Nothing was changed" in str(exc):
            return
        else:
            note = " Nothing was changed: the model was restored as it was."
        if isinstance(exc, CompressError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
            message = exc.args[0].rstrip()
            exc.args = (message + ("" if message.endswith((".", "!", "?")) else ".") + note,)
        elif isinstance(exc, Exception) and hasattr(exc, "add_note"):  # Python 3.11+; 3.10 keeps the error bare
            exc.add_note(note.strip())


def _copy(value: Any) -> Any:
    try:
        return copy.deepcopy(value)
    except Exception:  # noqa: BLE001 - an uncopyable config value is kept by reference
        return value


def _check_arguments(model: Any, strategy: Any, calibration_config: Any, plan_config: Any, importance: Any) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model should be a torch.nn.Module (a Hugging Face causal LM), got "
            f"{type(model).__name__} {str(model)[:80]!r}; load one first, e.g. "
            "model, tok = compress.load_teacher(...)"
        )
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ConfigError(f"strategy should be one of {STRATEGIES}, got {strategy!r}")
    for name, value, cls in (
        ("calibration_config", calibration_config, CalibrationConfig),
        ("plan_config", plan_config, PlanConfig),
    ):
        if value is not None and not isinstance(value, cls):
            raise ConfigError(
                f"{name} should be a compress.{cls.__name__} (or None), got {type(value).__name__}"
                + (f"; build one: compress.{cls.__name__}(**{name})" if isinstance(value, dict) else "")
            )
    if importance is not None and not isinstance(importance, Importance):
        raise ConfigError(
            f"importance= should be a compress.Importance (from compress.score_importance), got "
            f"{type(importance).__name__}"
        )


def prune(
    model: nn.Module,
    target: Any,
    calibration: TextSource | torch.Tensor | Calibration | None,
    *,
    strategy: str = "width",
    plugins: PluginsArg = None,
    tokenizer=None,
    calibration_config: CalibrationConfig | None = None,
    plan_config: PlanConfig | None = None,
    importance: Importance | None = None,
) -> PruneReport:
    """Prune ``model`` **in place** to ``target`` and return a :class:`PruneReport`.

    ``target``: ``{"params": 0.5}``, ``{"params": 70_000_000}`` or an explicit shape (see :mod:`compress.pruning.plan`).
    ``calibration``: text (path, string or documents; needs ``tokenizer``), token ids ``[N, seq_len]`` or a
    :class:`Calibration`; may be None only with a data-free importance plugin. ``strategy``: ``"width"``,
    ``"depth"`` or ``"width+depth"``. ``plugins``: plugin names → configs (see :func:`resolve_plugins`).
    ``importance``: scores computed earlier for this same (unpruned) model, e.g. by a previous call's plugin,
    to sweep several targets with one calibration pass; the importance plugin is then not run.

    Transactional: every input is checked before the model is touched (arguments, target, plan, plugins, a
    model with NaN/inf weights, data, tokenizer), scores are checked (shape, floating dtype, finite) before any
    selection, and every axis's selection is checked against the plan (counts per layer, range, duplicates,
    integer type) before any axis is applied. If anything still fails — a plugin raises, or leaves shapes other
    than the plan's — the model is put back as it was (weights, ``requires_grad``, train/eval mode, device,
    config, layer list) and the error says so. An exception a plugin raises becomes a :class:`PluginError` naming
    the plugin, with the original as ``__cause__`` (a :class:`CompressError` keeps its type and gains the name).
    """
    start = time.perf_counter()
    _check_arguments(model, strategy, calibration_config, plan_config, importance)
    sums = check_finite_weights(model, "model to prune")  # also the fingerprint that checks a restore
    adapter = find_adapter(model)
    if adapter is None:  # no adapter for this family: MLP and hidden widths through Torch-Pruning's graph
        from .generic import prune_generic

        snapshot = _Snapshot(model, sums)
        try:
            return prune_generic(
                model,
                target,
                calibration,
                strategy=strategy,
                plugins=plugins,
                tokenizer=tokenizer,
                calibration_config=calibration_config,
                plan_config=plan_config,
                importance=importance,
            )
        except BaseException as exc:
            snapshot.undo(exc)
            raise
    formula = ParamFormula.from_model(model, adapter)
    config = adapter.shape_config(model.config)
    before = ModelShape.from_config(config)
    params_before = count_params(model)
    parsed = Target.parse(target, params_before)
    if parsed.shape and "num_key_value_heads" not in parsed.shape and not hasattr(config, "num_key_value_heads"):
        # multi-head attention without a KV-head count in its config (GPT-NeoX): KV heads follow query heads
        parsed = Target(
            shape={
                **parsed.shape,
                "num_key_value_heads": parsed.shape.get("num_attention_heads", before.num_attention_heads),
            },
            requested=parsed.requested,
        )
    plan = plan_shape(before, formula, parsed, strategy, plan_config, adapter.shape_constraint(config))
    after = plan.shape
    importance_plugin, axes = resolve_plugins(plugins, changed_axes(before, after))
    for axis in axes.values():
        for need in axis.needs:
            if need not in _SCORE_FIELDS:
                raise PluginError(f"axis plugin {axis.name!r} needs unknown importance field {need!r}")

    scoring = importance is None and any(axis.needs for axis in axes.values())
    block_search = "depth" in axes and getattr(axes["depth"].config, "method", None) == "contiguous_block"
    wants_data = (scoring and importance_plugin.needs_calibration) or block_search
    calib = None
    if calibration is not None or wants_data:
        if calibration is None:
            who = (
                f"importance plugin {importance_plugin.name!r}"
                if scoring and importance_plugin.needs_calibration
                else "the depth axis's contiguous-block search"
            )
            raise ConfigError(
                f"{who} needs calibration data; got None (pass text or token windows, or use "
                "plugins={'depth': {'method': 'block_influence'}} with precomputed importance)"
            )
        calib = prepare_calibration(model, tokenizer, calibration, calibration_config or CalibrationConfig())
    if importance is not None:
        check_importance(importance, before)

    # The shapes every axis must leave behind are checked where the adapter's layout describes the teacher
    # (a third-party adapter over modules that are not nn.Linear-shaped is checked by parameter count only).
    structured = _structure_problem(model, adapter, before) is None
    snapshot = _Snapshot(model, sums)
    try:
        if scoring:
            importance = _call(importance_plugin, "score", model, adapter, calib)
            check_importance(importance, before, importance_plugin)
        ctx = PruneContext(model, adapter, importance, calib, before, after)
        selections = {name: _call(axis, "select", ctx) for name, axis in axes.items()}
        for name, axis in axes.items():
            check_selection(name, selections[name], before, after, axis)

        current = before
        for name, axis in axes.items():
            _call(axis, "apply", model, adapter, selections[name])
            current = current.replace(**{f: getattr(after, f) for f in _AXIS_FIELDS[name]})
            problem = _structure_problem(model, adapter, current) if structured else None
            if problem:
                raise PluginError(
                    f"after {_who(axis)} applied its selection, {problem}: apply() must slice exactly "
                    "what select() chose"
                )
        after.apply_to_config(config)
        params_after = count_params(model)
        if params_after != plan.params:
            raise PluginError(
                f"the pruned model has {params_after:,} parameters, but the plan has {plan.params:,}; "
                f"one of the axis plugins {[a.name for a in axes.values()]} changed more than its "
                "selection"
            )
        removed = {
            name: {"plugin": axes[name].name, **_call(axes[name], "summarize", sel)} for name, sel in selections.items()
        }
    except BaseException as exc:
        snapshot.undo(exc)
        raise
    del snapshot  # the teacher's tensors can go now

    return PruneReport(
        strategy=strategy,
        importance=importance.method if importance is not None else importance_plugin.name,
        target=parsed.requested,
        plan_reason=plan.reason,
        shape_before=before.to_dict(),
        shape_after=after.to_dict(),
        params_before=params_before,
        params_after=params_after,
        removed=removed,
        importance_summary=importance.summary() if importance is not None else {},
        calibration={
            "source": calib.source,
            "samples": calib.num_samples,
            "tokens": calib.num_tokens,
            "seq_len": calib.input_ids.shape[1],
        }
        if calib is not None
        else {},
        seconds=round(time.perf_counter() - start, 3),
        kept=_kept(selections),
        scores=importance,
    )


def _kept(selections: dict) -> dict:
    """What :attr:`PruneReport.kept` holds: teacher indices, per layer of the teacher for "mlp" (kept neurons)
    and "heads" (kept query heads), for the whole model for "hidden" (channels) and "layers"."""
    kept: dict[str, list] = {
        name: [operator.index(i) for i in selections[axis]["keep"]]
        for name, axis in (("hidden", "hidden"), ("layers", "depth"))
        if axis in selections and "keep" in selections[axis]
    }
    for name, axis, key in (("mlp", "mlp", "keep"), ("heads", "heads", "query_heads")):
        if axis in selections and key in selections[axis]:
            kept[name] = [[operator.index(i) for i in layer] for layer in selections[axis][key]]
    return kept


def score_importance(
    model: nn.Module,
    calibration: TextSource | torch.Tensor | Calibration | None,
    *,
    tokenizer=None,
    plugin: str = DEFAULT_IMPORTANCE,
    config: Any = None,
    calibration_config: CalibrationConfig | None = None,
) -> Importance:
    """Run one importance plugin over ``model`` without pruning; pass the result to :func:`prune`'s
    ``importance=`` to try several targets from one calibration pass. The scores are checked as :func:`prune`
    checks them (shape, floating dtype, finite), and the model is left as it was whatever happens."""
    _check_arguments(model, "width", calibration_config, None, None)
    sums = check_finite_weights(model, "model to score")
    adapter = adapter_for(model)
    scorer = registry.build_plugin(plugin, "importance", config)
    calib = None
    if calibration is not None or scorer.needs_calibration:
        if calibration is None:
            raise ConfigError(f"importance plugin {plugin!r} needs calibration data; got None")
        calib = prepare_calibration(model, tokenizer, calibration, calibration_config or CalibrationConfig())
    shape = ModelShape.from_config(adapter.shape_config(model.config))
    snapshot = _Snapshot(model, sums)
    try:
        scores = _call(scorer, "score", model, adapter, calib)
        check_importance(scores, shape, scorer)
    except BaseException as exc:
        snapshot.undo(exc)
        raise
    return scores
