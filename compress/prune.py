"""The pruning stage: resolve plugins, calibrate, score, plan, select, slice — in that order, nothing mutated
until every check has passed and every selection is made."""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from . import registry
from .calibrate import Calibration, CalibrationConfig, Importance, prepare_calibration
from .data import TextSource
from .errors import ConfigError, PluginError
from .models import adapter_for, find_adapter
from .plan import STRATEGIES, PlanConfig, Target, plan_shape
from .plugin_api import AXES, AxisPlugin, ImportancePlugin, PruneContext
from .report import PruneReport
from .shape import ModelShape, ParamFormula, changed_axes, count_params

PluginsArg = Mapping[str, Any] | Sequence[str] | None
DEFAULT_IMPORTANCE = "activation"


def _normalize_plugins(plugins: PluginsArg) -> dict[str, Any]:
    if plugins is None:
        return {}
    if isinstance(plugins, str):
        return {plugins: None}
    if isinstance(plugins, Mapping):
        return dict(plugins)
    return {name: None for name in plugins}


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
        plugin = registry.build_plugin(name, cls.kind, config)
        if cls.kind == "importance":
            if importance is not None:
                raise PluginError(f"two importance plugins given ({importance.name!r}, {name!r}); choose one")
            importance = plugin
        else:
            if plugin.axis not in AXES:
                raise PluginError(f"axis plugin {name!r} declares axis {plugin.axis!r}; expected one of {AXES}")
            if plugin.axis in axes:
                raise PluginError(f"two plugins given for the {plugin.axis!r} axis ({axes[plugin.axis].name!r}, {name!r})")
            axes[plugin.axis] = plugin
    if importance is None:
        importance = registry.build_plugin(DEFAULT_IMPORTANCE, "importance")
    for axis in needed_axes:
        if axis not in axes:
            axes[axis] = registry.build_plugin(axis, "axis")
    return importance, {a: axes[a] for a in AXES if a in needed_axes}


def _check_importance_fits(importance: Importance, shape: ModelShape) -> None:
    expected = {"mlp": (shape.num_hidden_layers, shape.intermediate_size),
                "heads": (shape.num_hidden_layers, shape.num_attention_heads),
                "hidden": (shape.hidden_size,), "layers": (shape.num_hidden_layers,)}
    for name, dims in expected.items():
        value = getattr(importance, name)
        if value is not None and tuple(value.shape) != dims:
            raise ConfigError(f"precomputed importance {name!r} has shape {tuple(value.shape)}, but this model "
                              f"needs {dims}: scores must come from the same unpruned model")


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

    ``target``: ``{"params": 0.5}``, ``{"params": 70_000_000}`` or an explicit shape (see :mod:`compress.plan`).
    ``calibration``: text (path, string or documents; needs ``tokenizer``), token ids ``[N, seq_len]`` or a
    :class:`Calibration`; may be None only with a data-free importance plugin. ``strategy``: ``"width"``,
    ``"depth"`` or ``"width+depth"``. ``plugins``: plugin names → configs (see :func:`resolve_plugins`).
    ``importance``: scores computed earlier for this same (unpruned) model, e.g. by a previous call's plugin,
    to sweep several targets with one calibration pass; the importance plugin is then not run.

    Every input is checked before the model is touched; on error the model is unchanged.
    """
    start = time.perf_counter()
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy should be one of {STRATEGIES}, got {strategy!r}")
    adapter = find_adapter(model)
    if adapter is None:  # no adapter for this family: MLP and hidden widths through Torch-Pruning's graph
        from .generic import prune_generic

        return prune_generic(model, target, calibration, strategy=strategy, plugins=plugins, tokenizer=tokenizer,
                             calibration_config=calibration_config, plan_config=plan_config, importance=importance)
    formula = ParamFormula.from_model(model, adapter)
    config = adapter.shape_config(model.config)
    before = ModelShape.from_config(config)
    params_before = count_params(model)
    parsed = Target.parse(target, params_before)
    if parsed.shape and "num_key_value_heads" not in parsed.shape and not hasattr(config, "num_key_value_heads"):
        # multi-head attention without a KV-head count in its config (GPT-NeoX): KV heads follow query heads
        parsed = Target(shape={**parsed.shape, "num_key_value_heads": parsed.shape.get(
            "num_attention_heads", before.num_attention_heads)}, requested=parsed.requested)
    plan = plan_shape(before, formula, parsed, strategy, plan_config, adapter.shape_constraint(config))
    after = plan.shape
    importance_plugin, axes = resolve_plugins(plugins, changed_axes(before, after))
    for axis in axes.values():
        for need in axis.needs:
            if need not in ("mlp", "heads", "hidden", "layers"):
                raise PluginError(f"axis plugin {axis.name!r} needs unknown importance field {need!r}")

    scoring = importance is None and any(axis.needs for axis in axes.values())
    block_search = "depth" in axes and getattr(axes["depth"].config, "method", None) == "contiguous_block"
    wants_data = (scoring and importance_plugin.needs_calibration) or block_search
    calib = None
    if calibration is not None or wants_data:
        if calibration is None:
            who = (f"importance plugin {importance_plugin.name!r}" if scoring and importance_plugin.needs_calibration
                   else "the depth axis's contiguous-block search")
            raise ConfigError(f"{who} needs calibration data; got None (pass text or token windows, or use "
                              "plugins={'depth': {'method': 'block_influence'}} with precomputed importance)")
        calib = prepare_calibration(model, tokenizer, calibration, calibration_config or CalibrationConfig())

    if importance is not None:
        _check_importance_fits(importance, before)
    elif any(axis.needs for axis in axes.values()):
        importance = importance_plugin.score(model, adapter, calib)
    ctx = PruneContext(model, adapter, importance, calib, before, after)
    selections = {name: axis.select(ctx) for name, axis in axes.items()}

    for name, axis in axes.items():
        axis.apply(model, adapter, selections[name])
    after.apply_to_config(config)
    params_after = count_params(model)
    if params_after != plan.params:
        raise RuntimeError(f"internal error: planned {plan.params:,} params but the pruned model has {params_after:,}")

    return PruneReport(
        strategy=strategy,
        importance=importance.method if importance is not None else importance_plugin.name,
        target=parsed.requested,
        plan_reason=plan.reason,
        shape_before=before.to_dict(),
        shape_after=after.to_dict(),
        params_before=params_before,
        params_after=params_after,
        removed={name: {"plugin": axes[name].name, **axes[name].summarize(sel)} for name, sel in selections.items()},
        importance_summary=importance.summary() if importance is not None else {},
        calibration={"source": calib.source, "samples": calib.num_samples, "tokens": calib.num_tokens,
                     "seq_len": calib.input_ids.shape[1]} if calib is not None else {},
        seconds=round(time.perf_counter() - start, 3),
        kept={name: selections[axis]["keep"] for name, axis in (("hidden", "hidden"), ("layers", "depth"))
              if axis in selections and "keep" in selections[axis]},
    )


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
    ``importance=`` to try several targets from one calibration pass."""
    scorer = registry.build_plugin(plugin, "importance", config)
    calib = None
    if calibration is not None or scorer.needs_calibration:
        if calibration is None:
            raise ConfigError(f"importance plugin {plugin!r} needs calibration data; got None")
        calib = prepare_calibration(model, tokenizer, calibration, calibration_config or CalibrationConfig())
    return scorer.score(model, adapter_for(model), calib)
