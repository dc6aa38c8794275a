"""Targets and the planner that turns a parameter budget into a concrete, hardware-friendly shape.

A target is either a parameter budget — ``{"params": 0.5}`` (a fraction of the teacher) or
``{"params": 70_000_000}`` (a count; a float in (0, 1) is a fraction, an integer or integral float a count, and a
non-integral float above 1 such as ``1.5`` is refused) — or an explicit shape (any of ``hidden_size``,
``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``, ``num_hidden_layers``; unnamed fields keep
the teacher's value).

For a budget, the planner enumerates every shape on a grid of hardware-friendly sizes that the strategy allows,
keeps those within ``tolerance`` below the budget, and picks the one with the lowest *damage cost*:
``sum(weight[axis] * removed_fraction[axis] ** 2)``; the squares spread the cut over several axes rather than
gutting one. The default weights are measured, not assumed: on SmolLM2-135M (``benchmarks/shape_sweep.py``,
BENCHMARKS.md) hidden channels were by far the most damaging axis to prune, then MLP neurons, with attention
heads cheapest per parameter — unlike Minitron's multi-billion-parameter models, where hidden pruning is
milder. Tune ``PlanConfig.weights`` for other families.

:func:`plan_for` is the one way from a model to its plan (adapter, shape, parameter formula, parsed target,
planned shapes), used by :func:`compress.prune` and the shape search alike; it reads no weight. The configs and
the target (:class:`PlanConfig`, :class:`Target`, :data:`STRATEGIES`) live in :mod:`compress.pruning.config` and
are re-exported here.
"""

from __future__ import annotations

import heapq
import itertools
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import ConfigError, TargetError, spelled
from ..models import DecoderAdapter, adapter_for
from .config import STRATEGIES as STRATEGIES  # re-exported: the strategies used to be written here
from .config import PlanConfig, Target, check_config, check_strategy
from .shape import ModelShape, ParamFormula, count_params

#: Share of the teacher's parameters in the embedding (+ untied LM head) above which the plan says so.
EMBEDDING_HEAVY = 0.3


@dataclass(frozen=True)
class Plan:
    """One shape the planner chose: its exact parameter count, why it was chosen, and how many shapes on the grid
    were considered (1 for an explicit shape, 0 when none landed within tolerance)."""

    shape: ModelShape
    params: int
    reason: str
    candidates: int = 0


@dataclass(frozen=True)
class ModelPlan:
    """What :func:`plan_for` found for a model: everything pruning or the shape search needs before any weight is
    read. ``shape_config``: the config the shape is read from and written to (a multimodal model's text config);
    ``shape``: the teacher's shape; ``params``: its parameter count; ``plans``: the planner's best shapes, best
    first (``plan`` is the first, what :func:`plan_shape` picks)."""

    adapter: DecoderAdapter
    shape_config: Any
    shape: ModelShape
    formula: ParamFormula
    params: int
    target: Target
    plans: tuple[Plan, ...]

    @property
    def plan(self) -> Plan:
        """The planner's choice (the best candidate)."""
        return self.plans[0]


def plan_for(
    model: nn.Module, target: Any, strategy: str = "width", plan: PlanConfig | None = None, *, candidates: int = 1
) -> ModelPlan:
    """The plan for pruning ``model`` to ``target`` with ``strategy``: the family's adapter, the teacher's shape,
    its exact parameter formula, the parsed target and the planner's ``candidates`` best shapes.

    Reads no weight, only module structure, shapes and the config, so it runs on a skeleton built on the meta
    device (``with torch.device("meta"): AutoModelForCausalLM.from_config(cfg)``): a pipeline can refuse an
    impossible target (:class:`TargetError`), a bad strategy or plan (:class:`ConfigError`) or a family without an
    adapter (:class:`~compress.errors.UnsupportedModelError`) before any weight is loaded. :func:`compress.prune`
    and :func:`compress.pruning.search.search_shapes` plan through it.
    """
    check_strategy(strategy)
    check_config("plan", plan, PlanConfig)
    adapter = adapter_for(model)
    shape_config = adapter.shape_config(model.config)
    before = ModelShape.from_config(shape_config)
    formula = ParamFormula.from_model(model, adapter)
    params = count_params(model)
    parsed = Target.parse(target, params)
    if parsed.shape and "num_key_value_heads" not in parsed.shape and not hasattr(shape_config, "num_key_value_heads"):
        # multi-head attention without a KV-head count in its config (GPT-NeoX): KV heads follow query heads
        parsed = Target(
            shape={
                **parsed.shape,
                "num_key_value_heads": parsed.shape.get("num_attention_heads", before.num_attention_heads),
            },
            requested=parsed.requested,
        )
    constraint = adapter.shape_constraint(shape_config)
    plans = candidate_shapes(before, formula, parsed, strategy, plan, constraint, k=candidates)
    return ModelPlan(adapter, shape_config, before, formula, params, parsed, tuple(plans))


def size_grid(size: int, multiple: int, min_fraction: float) -> list[int]:
    """Sizes from ``size`` down to ``min_fraction * size`` in steps of ``multiple`` (smaller steps for tiny sizes)."""
    step = multiple
    while step > 1 and size < 4 * step:
        step //= 2
    low = max(1, int(size * min_fraction))
    values = {size} | {v for v in range(step, size, step) if v >= low}
    return sorted(values, reverse=True)


def _head_options(teacher: ModelShape) -> list[tuple[int, int]]:
    """Every (query heads, KV heads) pair that keeps GQA groups valid."""
    return [(kv * g, kv) for kv in range(1, teacher.num_key_value_heads + 1) for g in range(1, teacher.group_size + 1)]


def damage_cost(teacher: ModelShape, s: ModelShape, weights: Mapping[str, float]) -> float:
    """The planner's guess at how much pruning ``teacher`` to ``s`` hurts: ``sum(weight[axis] *
    removed_fraction[axis] ** 2)`` over MLP neurons, hidden channels, query heads and layers."""
    removed = {
        "mlp": 1 - s.intermediate_size / teacher.intermediate_size,
        "hidden": 1 - s.hidden_size / teacher.hidden_size,
        "heads": 1 - s.num_attention_heads / teacher.num_attention_heads,
        "depth": 1 - s.num_hidden_layers / teacher.num_hidden_layers,
    }
    return sum(weights[a] * r * r for a, r in removed.items())


def plan_shape(
    teacher: ModelShape,
    formula: ParamFormula,
    target: Target,
    strategy: str,
    config: PlanConfig | None = None,
    constraint: Callable[[ModelShape], str | None] | None = None,
) -> Plan:
    """Resolve ``target`` to a concrete shape for ``strategy``; raises :class:`TargetError` when impossible.

    ``constraint`` (from the family's adapter) says why a shape cannot be saved as a loadable config, or None:
    budget searches skip such shapes, and an explicit one is refused.
    """
    return candidate_shapes(teacher, formula, target, strategy, config, constraint, k=1)[0]


def candidate_shapes(
    teacher: ModelShape,
    formula: ParamFormula,
    target: Target,
    strategy: str,
    config: PlanConfig | None = None,
    constraint: Callable[[ModelShape], str | None] | None = None,
    k: int = 4,
) -> list[Plan]:
    """The ``k`` best distinct shapes the planner considers for ``target``, best first (the first is what
    :func:`plan_shape` returns for the same inputs).

    The ranking is the planner's own: among the grid shapes within ``tolerance`` below the budget, the lowest
    damage cost ``sum(w * removed_fraction**2)`` first (ties: more parameters first, then grid order). When no
    grid shape lands within tolerance, the planner takes the largest shape below the budget, and the candidates
    are then the ``k`` largest below it. Fewer than ``k`` come back when fewer exist; an explicit shape target
    gives just that shape. Raises :class:`TargetError` when no shape fits, :class:`ConfigError` for a bad ``k``.
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ConfigError(f"k should be a positive integer (how many candidate shapes), got {k!r}")
    config = config or PlanConfig()
    check_strategy(strategy)
    if target.shape is not None:
        # The family's own rules first (their reason is more telling than a generic bounds or GQA message), then
        # bounds and strategy, then the rules of loading (a shape larger than the teacher is refused as that).
        candidate = teacher.replace(**target.shape)
        family = getattr(constraint, "family_reason", None)
        problem = family(candidate) if family and candidate.num_attention_heads > 0 else None
        if problem:
            raise TargetError(f"the shape {target.requested} cannot be saved for this model: {problem}")
        plan = _explicit(teacher, formula, target, strategy)
        problem = constraint(plan.shape) if constraint else None
        if problem:
            raise TargetError(f"the shape {target.requested} cannot be saved for this model: {problem}")
        return [plan]

    ranked, count, within = _ranked_grid(teacher, formula, target, strategy, config, constraint, int(k))
    plans = []
    for rank, (cost, p, s) in enumerate(ranked):
        if not within:  # nothing on the grid lands within tolerance; took the largest below it
            reason = (
                f"no {strategy} shape on the grid (multiples of {config.multiple_of}) lands within "
                f"{config.tolerance:.0%} below {target.params:,}; took the "
                + ("largest below it" if rank == 0 else f"{_ordinal(rank + 1)} largest below it")
            )
            plans.append(Plan(s, p, reason + _embedding_note(teacher, formula, s), 0))
            continue
        reason = (
            f"{count} {strategy} shapes on the grid (multiples of {config.multiple_of}, valid GQA head counts) land "
            f"within {config.tolerance:.0%} below the budget of {target.params:,} params; chose the one with the "
            + ("lowest" if rank == 0 else f"{_ordinal(rank + 1)} lowest (cost {cost:.4g})")
            + f" damage cost sum(w*removed^2) with weights {dict(config.weights)} (measured on SmolLM2: "
            f"hidden channels hurt most, then MLP neurons, then heads)"
        )
        plans.append(Plan(s, p, reason + _embedding_note(teacher, formula, s), count))
    return plans


def _ordinal(n: int) -> str:
    """``1st``, ``2nd``, ``3rd``, ``4th``, ..."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _ranked_grid(
    teacher: ModelShape,
    formula: ParamFormula,
    target: Target,
    strategy: str,
    config: PlanConfig,
    constraint: Callable[[ModelShape], str | None] | None,
    k: int,
) -> tuple[list[tuple[float, int, ModelShape]], int, bool]:
    """The planner's grid search for a parameter budget: ``(ranked, count, within)``.

    ``ranked`` holds the ``k`` best ``(damage cost, params, shape)`` of the shapes within tolerance below the
    budget, ordered by ``(cost, -params)`` and then grid order (``within`` is True, ``count`` how many there
    were); when none is within tolerance, the ``k`` largest below the budget, largest first (``within`` False,
    ``count`` 0; their cost is still given).
    """
    assert target.params is not None  # a budget target (a Target has params or a shape, exactly one)
    width = strategy in ("width", "width+depth")
    depth = strategy in ("depth", "width+depth")
    f = config.min_fraction
    hiddens = size_grid(teacher.hidden_size, config.multiple_of, f) if width else [teacher.hidden_size]
    inters = size_grid(teacher.intermediate_size, config.multiple_of, f) if width else [teacher.intermediate_size]
    heads = _head_options(teacher) if width else [(teacher.num_attention_heads, teacher.num_key_value_heads)]
    depths = list(range(teacher.num_hidden_layers, 0, -1)) if depth else [teacher.num_hidden_layers]

    smallest = ModelShape(min(hiddens), min(inters), *min(heads), min(depths), teacher.head_dim)
    if formula.total(smallest) > target.params:
        raise TargetError(
            f"target of {target.params:,} parameters is below the smallest shape strategy {strategy!r} allows "
            f"({formula.total(smallest):,} at {smallest.to_dict()}); raise the target"
            + ("" if strategy == "width+depth" else f" or use {_strategy('width+depth')}")
        )
    low = target.params * (1 - config.tolerance)
    # Bounded heaps of the k best so far (the grid of an 8B model under width+depth has millions of shapes; the
    # grid values are distinct, so no shape comes twice). Heap tops are the worst kept: negated sort keys.
    best: list[tuple[tuple[float, int, int], ModelShape, int]] = []  # ((-cost, params, -order), shape, params)
    below: list[tuple[tuple[int, int], ModelShape]] = []  # ((params, -order), shape): the largest are kept
    count = 0
    for order, (d, i, (h, kv), n) in enumerate(itertools.product(hiddens, inters, heads, depths)):
        s = ModelShape(d, i, h, kv, n, teacher.head_dim)
        p = formula.total(s)
        if p > target.params or s == teacher or (constraint is not None and constraint(s)):
            continue
        if p < low:
            if not count:  # only needed when nothing lands within tolerance
                _keep(below, ((p, -order), s), k)
            continue
        count += 1
        _keep(best, ((-damage_cost(teacher, s, config.weights), p, -order), s, p), k)
    if best:
        top = sorted(best, key=lambda item: (-item[0][0], -item[0][1], -item[0][2]))
        return [(-key[0], p, s) for key, s, p in top], count, True
    if not below:
        raise TargetError(
            f"no {strategy} shape on the grid below {target.params:,} parameters can be saved for "
            f"this model ({constraint(smallest) if constraint else 'none fits'})"
        )
    largest = sorted(below, key=lambda item: (-item[0][0], -item[0][1]))
    return [(damage_cost(teacher, s, config.weights), key[0], s) for key, s in largest], 0, False


def _keep(heap: list, item: tuple, k: int) -> None:
    """Keep the ``k`` largest items (by their first element) in the min-heap ``heap``."""
    if len(heap) < k:
        heapq.heappush(heap, item)
    elif item[0] > heap[0][0]:
        heapq.heapreplace(heap, item)


def _embedding_note(teacher: ModelShape, formula: ParamFormula, chosen: ModelShape) -> str:
    """What to know when the vocabulary holds much of the model (Gemma's 262k tokens): only hidden pruning
    shrinks the embedding (and an untied LM head), so budgets are reached mainly through the hidden size."""
    share = formula.embedding_params(teacher) / formula.total(teacher)
    if share < EMBEDDING_HEAVY or chosen.hidden_size == teacher.hidden_size:
        return ""
    what = "embedding holds" if formula.tied else "embedding and LM head hold"
    return (
        f". The {what} {share:.0%} of the parameters (vocabulary {formula.vocab_size:,}) and only hidden "
        "channels shrink them, so parameter budgets are reached mainly through the hidden size "
        f"({teacher.hidden_size} -> {chosen.hidden_size} here), whatever the damage weights prefer"
    )


def _explicit(teacher: ModelShape, formula: ParamFormula, target: Target, strategy: str) -> Plan:
    """The plan of an explicit shape target, refused when the shape is not a sub-shape of the teacher or
    changes what ``strategy`` keeps."""
    assert target.shape is not None  # called for a shape target only
    shape = teacher.replace(**target.shape)
    shape.check_within(teacher)
    width_changed = (
        shape.hidden_size,
        shape.intermediate_size,
        shape.num_attention_heads,
        shape.num_key_value_heads,
    ) != (teacher.hidden_size, teacher.intermediate_size, teacher.num_attention_heads, teacher.num_key_value_heads)
    depth_changed = shape.num_hidden_layers != teacher.num_hidden_layers
    if depth_changed and strategy == "width":
        raise TargetError(f"the target shape removes layers but {_strategy('width')}; use 'depth' or 'width+depth'")
    if width_changed and strategy == "depth":
        raise TargetError(f"the target shape changes widths but {_strategy('depth')}; use 'width' or 'width+depth'")
    return Plan(shape, formula.total(shape), f"explicit shape {dict(target.shape)} requested", 1)


def _strategy(name: str) -> str:
    """``strategy='name'`` in the spelling of the interface in use (``--strategy name`` on the command line)."""
    return spelled(f"strategy={name!r}", f"--strategy {name}", f"strategy: {name}")
