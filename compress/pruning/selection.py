"""Checks of what pruning keeps, before anything is sliced: importance scores (from a plugin or passed in), each
axis plugin's selection against the plan, and lists of kept indices.

:func:`check_indices` is the one check of a list of kept indices (a list of exactly ``count`` distinct integers
in ``0..limit-1``); :func:`check_selection` (what an axis plugin selected, :class:`PluginError`) and
:func:`compress.pruning.reconstruct.check_kept` (what a :class:`PruneReport` says was kept, :class:`ConfigError`)
word its :class:`IndexProblem` for their callers.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import CompressError, ConfigError, PluginError
from .calibrate import Importance
from .shape import ModelShape
from .transaction import plugin_label


class IndexProblem(Exception):
    """What :func:`check_indices` found wrong, for its caller to word: ``kind`` is ``"container"`` (``value``:
    the values, not a list), ``"count"`` (``value``: how many there are), ``"element"`` (``value``: the first
    element that is not an integer), ``"range"`` (``value``: the first index out of range) or ``"duplicate"``
    (``value``: the first index met a second time)."""

    def __init__(self, kind: str, value: Any) -> None:
        super().__init__(kind, value)
        self.kind, self.value = kind, value


def check_indices(values: Any, count: int, limit: int) -> list[int]:
    """``values`` as a list of exactly ``count`` distinct integers in ``0..limit-1``.

    Accepts a list, tuple or range of integers (anything with ``__index__`` but ``bool``) or an integer tensor.
    Checked in this order, the first problem raised as an :class:`IndexProblem`: the container, the count, the
    element types, the range, duplicates.
    """
    if isinstance(values, torch.Tensor) and not values.is_floating_point() and values.dtype != torch.bool:
        values = values.tolist()
    if not isinstance(values, (list, tuple, range)):
        raise IndexProblem("container", values)
    if len(values) != count:
        raise IndexProblem("count", len(values))
    out = []
    for v in values:
        if isinstance(v, bool) or not hasattr(v, "__index__"):
            raise IndexProblem("element", v)
        out.append(operator.index(v))
    outside = [i for i in out if not 0 <= i < limit]
    if outside:
        raise IndexProblem("range", outside[0])
    if len(set(out)) != len(out):
        seen: set[int] = set()
        for dup in out:  # the first index met a second time
            if dup in seen:
                raise IndexProblem("duplicate", dup)
            seen.add(dup)
    return out


# -- importance scores -----------------------------------------------------------------------------------------


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
        who, error = plugin_label(plugin), PluginError
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


# -- axis selections --------------------------------------------------------------------------------------------


def _indices(values: Any, count: int, limit: int, what: str, plugin: Any) -> list[int]:
    """Check one list of kept indices a plugin selected (:func:`check_indices`), worded for the plugin's author."""
    try:
        return check_indices(values, count, limit)
    except IndexProblem as problem:
        who, v = plugin_label(plugin), problem.value
        message = {
            "container": f"{who} selected {what} as {type(v).__name__}; select() must return a list of integer indices",
            "count": f"{who} keeps {v} {what}, but the plan keeps {count}: select() must keep exactly the planned "
            "number",
            "element": f"{who} selected {what} with the index {v!r} of type {type(v).__name__}; indices must be "
            "integers",
            "range": f"{who} selected {what} with the index {v}, out of range: the teacher has {limit} (indices "
            f"0..{limit - 1})",
            "duplicate": f"{who} keeps index {v} of the {what} more than once; indices must be distinct",
        }[problem.kind]
    raise PluginError(message)


def _field(selection: Any, key: str, axis: str, plugin: Any) -> Any:
    """The ``key`` entry of a selection, refused when the selection is not a dict or lacks it."""
    if not isinstance(selection, Mapping):
        raise PluginError(
            f"{plugin_label(plugin)} returned a selection of type {type(selection).__name__}; select() must "
            "return a dict (see compress.AxisPlugin.select)"
        )
    if key not in selection:
        raise PluginError(
            f"{plugin_label(plugin)} returned a selection without {key!r} (keys: {sorted(map(str, selection))}); "
            f"the {axis} axis needs it (see compress.AxisPlugin.select)"
        )
    return selection[key]


def _per_layer(values: Any, layers: int, what: str, plugin: Any) -> list:
    """``values`` as one entry per layer of the teacher, refused otherwise."""
    if not isinstance(values, (list, tuple)) or len(values) != layers:
        got = f"{len(values)} entries" if isinstance(values, (list, tuple)) else type(values).__name__
        raise PluginError(
            f"{plugin_label(plugin)} selected {what} as {got}; select() must give one list per layer of the teacher "
            f"({layers})"
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
                        f"{plugin_label(plugin)} keeps query head {h} in layer {i}, whose KV group "
                        f"{h // g_before} it removes; every kept query head must be in a kept group"
                    )
                per_group[h // g_before] += 1
            uneven = {k: c for k, c in per_group.items() if c != g_after}
            if uneven:
                raise PluginError(
                    f"{plugin_label(plugin)} keeps {uneven} query heads per KV group in layer {i}; the plan "
                    f"keeps {g_after} in each kept group (GQA needs the same number in every group)"
                )
    elif axis == "hidden":
        _indices(
            _field(selection, "keep", axis, plugin), after.hidden_size, before.hidden_size, "hidden channels", plugin
        )
    elif axis == "depth":
        _indices(_field(selection, "keep", axis, plugin), after.num_hidden_layers, n, "layers", plugin)
