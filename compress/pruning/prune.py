"""The pruning stage: resolve plugins, calibrate, score, plan, select, slice — in that order, nothing mutated
until every check has passed and every selection is made and checked; and if slicing still fails, the model is
put back as it was (:mod:`.transaction`).

:func:`prune` is a sequence of named steps: check the arguments (:func:`~.arguments.check_prune_args`), plan
(:func:`~.plan.plan_for`), resolve the plugins (:func:`_resolve_axes`), prepare the data
(:func:`_calibration_for`), then, inside one transaction, score and select (:func:`_select`) and slice
(:func:`_apply`), and report (:func:`_report`). A family without an adapter goes to :mod:`.generic` instead.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from .. import registry
from ..data import TextSource
from ..errors import ConfigError, PluginError
from ..models import DecoderAdapter, adapter_for, find_adapter
from ..plugin_api import AXES, AxisPlugin, ImportancePlugin, PruneContext
from ..report import PruneReport
from ..validate import check_finite_weights
from .arguments import REQUIRED, Keywords, check_prune_args, normalize_plugins, resolve_keywords
from .arguments import PluginsArg as PluginsArg  # re-exported: callers import it from here
from .calibrate import Calibration, Importance, calibration_summary, prepare_calibration
from .config import CalibrationConfig, PlanConfig
from .plan import ModelPlan, plan_for
from .selection import check_importance, check_selection
from .selection import expected_importance_shapes as expected_importance_shapes  # re-exported
from .shape import ModelShape, changed_axes, count_params
from .transaction import call_plugin, plugin_label, transaction

DEFAULT_IMPORTANCE = "activation"
_SCORE_FIELDS = ("mlp", "heads", "hidden", "layers")
#: The config fields each axis changes.
_AXIS_FIELDS = {
    "mlp": ("intermediate_size",),
    "heads": ("num_attention_heads", "num_key_value_heads"),
    "hidden": ("hidden_size",),
    "depth": ("num_hidden_layers",),
}


def resolve_plugins(plugins: PluginsArg, needed_axes: Sequence[str]) -> tuple[ImportancePlugin, dict[str, AxisPlugin]]:
    """Build the importance plugin and one axis plugin per needed axis.

    ``plugins`` maps plugin names to configs (a Config, a dict of its fields, or None), or lists names. Naming an
    importance plugin replaces ``activation``; naming an axis plugin replaces the built-in one for its axis.
    """
    chosen = normalize_plugins(plugins)
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


def _structure_problem(model: nn.Module, adapter: DecoderAdapter, shape: ModelShape) -> str | None:
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
            got = tuple(cast(torch.Tensor, layer.get_submodule(path).weight).shape)
            if got != want:
                return f"layer {i}'s {path} has weight shape {got}, but the plan needs {want}"
    width = cast(nn.Embedding, model.get_submodule(adapter.embed)).weight.shape[-1]
    if width != shape.hidden_size:
        return f"the embedding has {width} channels, but the plan has {shape.hidden_size}"
    return None


def prune(
    model: nn.Module,
    target: Any,
    data: TextSource | torch.Tensor | Calibration | None = REQUIRED,
    *,
    strategy: str = "width",
    plugins: PluginsArg = None,
    tokenizer: Any = None,
    calibration: CalibrationConfig | None = None,
    plan: PlanConfig | None = None,
    importance: Importance | None = None,
    **renamed: Any,
) -> PruneReport:
    """Prune ``model`` **in place** to ``target`` and return a :class:`PruneReport`.

    ``target``: ``{"params": 0.5}``, ``{"params": 70_000_000}`` or an explicit shape (see :mod:`compress.pruning.plan`).
    ``data``: the calibration data — text (path, string or documents; needs ``tokenizer``), token ids
    ``[N, seq_len]`` or a :class:`Calibration`; may be None only with a data-free importance plugin.
    ``strategy``: ``"width"``, ``"depth"`` or ``"width+depth"``. ``plugins``: plugin names → configs (see
    :func:`resolve_plugins`). ``calibration``: a :class:`CalibrationConfig` (how ``data`` is packed), ``plan``: a
    :class:`PlanConfig`, as :func:`compress.compress` takes them. ``importance``: scores computed earlier for this
    same (unpruned) model, e.g. by a previous call's plugin, to sweep several targets with one calibration pass;
    the importance plugin is then not run.

    Renamed keywords, accepted for one release with a :class:`DeprecationWarning`: ``calibration_config=``
    (now ``calibration=``), ``plan_config=`` (now ``plan=``), and ``calibration=<data>`` (now ``data``, the third
    positional argument as before).

    Transactional: every input is checked before the model is touched (arguments, target, plan, plugins, a
    model with NaN/inf weights, data, tokenizer), scores are checked (shape, floating dtype, finite) before any
    selection, and every axis's selection is checked against the plan (counts per layer, range, duplicates,
    integer type) before any axis is applied. If anything still fails — a plugin raises, or leaves shapes other
    than the plan's — the model is put back as it was (weights, ``requires_grad``, train/eval mode, device,
    config, layer list) and the error says so. An exception a plugin raises becomes a :class:`PluginError` naming
    the plugin, with the original as ``__cause__`` (a :class:`CompressError` keeps its type and gains the name).
    """
    start = time.perf_counter()
    args = resolve_keywords("prune", data, calibration, plan, renamed)
    check_prune_args(
        model,
        strategy=strategy,
        plugins=plugins,
        calibration=args.calibration,
        plan=args.plan,
        importance=importance,
        spelled=args.spelled,
    )
    sums = check_finite_weights(model, "model to prune")  # also the fingerprint that checks a restore
    if find_adapter(model) is None:  # no adapter for this family: MLP and hidden widths through Torch-Pruning
        from .generic import prune_generic

        with transaction(model, sums):
            return prune_generic(
                model,
                target,
                args.data,
                strategy=strategy,
                plugins=plugins,
                tokenizer=tokenizer,
                calibration=args.calibration,
                plan=args.plan,
                importance=importance,
            )
    planned = plan_for(model, target, strategy, args.plan)
    importance_plugin, axes = _resolve_axes(plugins, planned)
    scoring = importance is None and any(axis.needs for axis in axes.values())
    calib = _calibration_for(model, tokenizer, args, importance_plugin, axes, scoring)
    if importance is not None:
        check_importance(importance, planned.shape)

    # The shapes every axis must leave behind are checked where the adapter's layout describes the teacher
    # (a third-party adapter over modules that are not nn.Linear-shaped is checked by parameter count only).
    structured = _structure_problem(model, planned.adapter, planned.shape) is None
    with transaction(model, sums):
        if scoring:
            importance = call_plugin(importance_plugin, "score", model, planned.adapter, calib)
            check_importance(importance, planned.shape, importance_plugin)
        selections = _select(model, planned, axes, importance, calib)
        params_after, removed = _apply(model, planned, axes, selections, structured)
    # the snapshot is gone with the transaction: the teacher's tensors can go now
    return _report(strategy, planned, importance, importance_plugin, calib, params_after, removed, selections, start)


def _resolve_axes(plugins: PluginsArg, planned: ModelPlan) -> tuple[ImportancePlugin, dict[str, AxisPlugin]]:
    """The importance plugin and the axis plugins the plan needs, refused when an axis plugin needs an
    importance field that does not exist."""
    importance_plugin, axes = resolve_plugins(plugins, changed_axes(planned.shape, planned.plan.shape))
    for axis in axes.values():
        for need in axis.needs:
            if need not in _SCORE_FIELDS:
                raise PluginError(f"axis plugin {axis.name!r} needs unknown importance field {need!r}")
    return importance_plugin, axes


def _calibration_for(
    model: nn.Module,
    tokenizer: Any,
    args: Keywords,
    importance_plugin: ImportancePlugin,
    axes: Mapping[str, AxisPlugin],
    scoring: bool,
) -> Calibration | None:
    """The calibration windows of ``args.data`` (None when no data was given and none is needed), refused when
    the importance plugin (``scoring``: it will run) or the depth axis's contiguous-block search needs data and
    none was given."""
    block_search = "depth" in axes and getattr(axes["depth"].config, "method", None) == "contiguous_block"
    wants_data = (scoring and importance_plugin.needs_calibration) or block_search
    if args.data is None and not wants_data:
        return None
    if args.data is None:
        who = (
            f"importance plugin {importance_plugin.name!r}"
            if scoring and importance_plugin.needs_calibration
            else "the depth axis's contiguous-block search"
        )
        raise ConfigError(
            f"{who} needs calibration data; got None (pass text or token windows, or use "
            "plugins={'depth': {'method': 'block_influence'}} with precomputed importance)"
        )
    return prepare_calibration(model, tokenizer, args.data, args.calibration or CalibrationConfig())


def _select(
    model: nn.Module,
    planned: ModelPlan,
    axes: Mapping[str, AxisPlugin],
    importance: Importance | None,
    calib: Calibration | None,
) -> dict[str, Any]:
    """Every axis's selection on the still unpruned model, each checked against the plan before any is applied."""
    ctx = PruneContext(model, planned.adapter, importance, calib, planned.shape, planned.plan.shape)
    selections = {name: call_plugin(axis, "select", ctx) for name, axis in axes.items()}
    for name, axis in axes.items():
        check_selection(name, selections[name], planned.shape, planned.plan.shape, axis)
    return selections


def _apply(
    model: nn.Module,
    planned: ModelPlan,
    axes: Mapping[str, AxisPlugin],
    selections: Mapping[str, Any],
    structured: bool,
) -> tuple[int, dict[str, Any]]:
    """Apply every axis's selection in :data:`AXES` order, checking after each that the model has the shapes
    the plan says (where ``structured``), then write the new shape into the config and check the parameter count.
    Returns the pruned model's parameter count and what each axis's plugin says it removed."""
    after, current = planned.plan.shape, planned.shape
    for name, axis in axes.items():
        call_plugin(axis, "apply", model, planned.adapter, selections[name])
        current = current.replace(**{f: getattr(after, f) for f in _AXIS_FIELDS[name]})
        problem = _structure_problem(model, planned.adapter, current) if structured else None
        if problem:
            raise PluginError(
                f"after {plugin_label(axis)} applied its selection, {problem}: apply() must slice exactly "
                "what select() chose"
            )
    after.apply_to_config(planned.shape_config)
    params_after = count_params(model)
    if params_after != planned.plan.params:
        raise PluginError(
            f"the pruned model has {params_after:,} parameters, but the plan has {planned.plan.params:,}; "
            f"one of the axis plugins {[a.name for a in axes.values()]} changed more than its "
            "selection"
        )
    removed = {
        name: {"plugin": axes[name].name, **call_plugin(axes[name], "summarize", sel)}
        for name, sel in selections.items()
    }
    return params_after, removed


def _report(
    strategy: str,
    planned: ModelPlan,
    importance: Importance | None,
    importance_plugin: ImportancePlugin,
    calib: Calibration | None,
    params_after: int,
    removed: dict[str, Any],
    selections: Mapping[str, Any],
    start: float,
) -> PruneReport:
    """The :class:`PruneReport` of a finished prune."""
    return PruneReport(
        strategy=strategy,
        importance=importance.method if importance is not None else importance_plugin.name,
        target=planned.target.requested,
        plan_reason=planned.plan.reason,
        shape_before=planned.shape.to_dict(),
        shape_after=planned.plan.shape.to_dict(),
        params_before=planned.params,
        params_after=params_after,
        removed=removed,
        importance_summary=importance.summary() if importance is not None else {},
        calibration=calibration_summary(calib),
        seconds=round(time.perf_counter() - start, 3),
        kept=_kept(selections),
        scores=importance,
    )


def _kept(selections: Mapping[str, Any]) -> dict:
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
    data: TextSource | torch.Tensor | Calibration | None = REQUIRED,
    *,
    tokenizer: Any = None,
    plugin: str = DEFAULT_IMPORTANCE,
    config: Any = None,
    calibration: CalibrationConfig | None = None,
    **renamed: Any,
) -> Importance:
    """Run one importance plugin over ``model`` without pruning; pass the result to :func:`prune`'s
    ``importance=`` to try several targets from one calibration pass. ``data``: the calibration data, packed by
    ``calibration`` (a :class:`CalibrationConfig`; ``calibration_config=`` is its old, deprecated keyword);
    ``config``: the plugin's config. The scores are checked as :func:`prune` checks them (shape, floating dtype,
    finite), and the model is left as it was whatever happens."""
    args = resolve_keywords("score_importance", data, calibration, renamed=renamed)
    check_prune_args(model, calibration=args.calibration, spelled=args.spelled)
    sums = check_finite_weights(model, "model to score")
    adapter = adapter_for(model)
    scorer = registry.build_plugin(plugin, "importance", config)
    calib = None
    if args.data is not None or scorer.needs_calibration:
        if args.data is None:
            raise ConfigError(f"importance plugin {plugin!r} needs calibration data; got None")
        calib = prepare_calibration(model, tokenizer, args.data, args.calibration or CalibrationConfig())
    shape = ModelShape.from_config(adapter.shape_config(model.config))
    with transaction(model, sums):
        scores = call_plugin(scorer, "score", model, adapter, calib)
        check_importance(scores, shape, scorer)
    return scores
