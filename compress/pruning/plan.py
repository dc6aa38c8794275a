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
"""

from __future__ import annotations

import heapq
import itertools
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, TargetError
from .shape import SHAPE_FIELDS, ModelShape, ParamFormula

STRATEGIES = ("width", "depth", "width+depth")
#: Share of the teacher's parameters in the embedding (+ untied LM head) above which the plan says so.
EMBEDDING_HEAVY = 0.3


@dataclass(frozen=True)
class Target:
    """A parsed pruning target: exactly one of ``params`` (a count) or ``shape`` (explicit fields) is set."""

    params: int | None = None
    shape: Mapping[str, int] | None = None
    requested: Any = None

    @classmethod
    def parse(cls, target: Any, teacher_params: int) -> Target:
        """Accept ``0.5``, ``{"params": 0.5}``, ``{"params": 70_000_000}``, a shape dict, or a :class:`Target`.

        ``params``: a float in (0, 1) is a fraction of the teacher; an integer (or an integral float such as
        ``7e7``) is a count. Anything else is refused with its value named: a fraction of 1 or more
        (``1.5`` is neither a fraction nor a plausible count), NaN/inf, booleans and strings. Shape fields must
        be integers (not ``True``, ``"448"`` or ``448.0``).
        """
        if isinstance(target, Target):
            return target
        if _is_number(target):
            target = {"params": target}
        if not isinstance(target, Mapping) or not target:
            raise TargetError(
                f"target should be a dict like {{'params': 0.5}} or {{'hidden_size': 448}}, got {target!r}"
            )
        unknown = set(target) - set(SHAPE_FIELDS) - {"params"}
        if unknown:
            raise TargetError(
                f"unknown target key(s) {sorted(unknown, key=repr)}; use 'params' or {list(SHAPE_FIELDS)}"
            )
        if "params" in target:
            if len(target) > 1:
                raise TargetError("give either 'params' or shape fields in a target, not both")
            count = _params_count(target["params"], teacher_params)
            if count >= teacher_params:
                raise TargetError(
                    f"target of {count:,} parameters is not smaller than the teacher's {teacher_params:,}; "
                    "give a fraction below 1 or a smaller count"
                )
            return cls(params=count, requested=dict(target))
        for name, value in target.items():
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TargetError(f"target {name} should be an integer, got {value!r}{_quoted_hint(value)}")
        return cls(shape={k: int(v) for k, v in target.items()}, requested=dict(target))


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _quoted_hint(value: Any) -> str:
    """A hint for a number written as a string ("0.5", "448")."""
    if isinstance(value, str):
        try:
            float(value.replace("_", ""))
        except ValueError:
            return ""
        return " (a string: write the number without quotes)"
    return ""


def _params_count(value: Any, teacher_params: int) -> int:
    """The parameter count a ``params`` target asks for (see :meth:`Target.parse`)."""
    if not _is_number(value):
        raise TargetError(
            f"target params should be a positive fraction like 0.5 or a count like 70_000_000, "
            f"got {value!r}{_quoted_hint(value)}"
        )
    if not math.isfinite(float(value)):
        raise TargetError(
            f"target params should be a positive fraction or count, got {value!r}: it must be a finite number"
        )
    if value <= 0:
        raise TargetError(f"target params should be a positive fraction or count, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    value = float(value)
    if value <= 1:
        return int(value * teacher_params)
    if not value.is_integer():
        raise TargetError(
            f"target params={value!r} is neither a fraction nor a count: a fraction must be in "
            "(0, 1); a count must be an integer like 70_000_000"
        )
    return int(value)  # an integral float such as 7e7 is a count


@dataclass(frozen=True)
class PlanConfig:
    """Knobs of the budget planner; the default weights come from a measured sweep (see the module docstring)."""

    weights: Mapping[str, float] = field(
        default_factory=lambda: {"mlp": 1.0, "hidden": 32.0, "heads": 2.0, "depth": 8.0}
    )
    tolerance: float = 0.03
    multiple_of: int = 64
    min_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.weights, Mapping):
            raise ConfigError(f"PlanConfig.weights should be a dict of axis -> weight, got {self.weights!r}")
        missing = {"mlp", "hidden", "heads", "depth"} - set(self.weights)
        if missing:
            raise ConfigError(f"PlanConfig.weights is missing {sorted(missing)}")
        for axis, w in self.weights.items():
            if not _is_number(w) or not math.isfinite(w) or w < 0:
                raise ConfigError(f"PlanConfig.weights[{axis!r}] should be a non-negative number, got {w!r}")
        if not _is_number(self.tolerance) or not 0 < self.tolerance < 1:
            raise ConfigError(f"PlanConfig.tolerance should be in (0, 1), got {self.tolerance!r}")
        if isinstance(self.multiple_of, bool) or not isinstance(self.multiple_of, int) or self.multiple_of < 1:
            raise ConfigError(f"PlanConfig.multiple_of should be a positive integer, got {self.multiple_of!r}")
        if not _is_number(self.min_fraction) or not 0 < self.min_fraction <= 1:
            raise ConfigError(f"PlanConfig.min_fraction should be in (0, 1], got {self.min_fraction!r}")


@dataclass(frozen=True)
class Plan:
    shape: ModelShape
    params: int
    reason: str
    candidates: int = 0


def _grid(size: int, multiple: int, min_fraction: float) -> list[int]:
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


def _cost(teacher: ModelShape, s: ModelShape, weights: Mapping[str, float]) -> float:
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
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy should be one of {STRATEGIES}, got {strategy!r}")
    if target.shape is not None:
        candidate = teacher.replace(**target.shape)
        # The family's own constraint first: its reason is more telling than a generic bounds or GQA message.
        problem = constraint(candidate) if constraint and candidate.num_attention_heads > 0 else None
        if problem:
            raise TargetError(f"the shape {target.requested} cannot be saved for this model: {problem}")
        return [_explicit(teacher, formula, target, strategy)]

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
    hiddens = _grid(teacher.hidden_size, config.multiple_of, f) if width else [teacher.hidden_size]
    inters = _grid(teacher.intermediate_size, config.multiple_of, f) if width else [teacher.intermediate_size]
    heads = _head_options(teacher) if width else [(teacher.num_attention_heads, teacher.num_key_value_heads)]
    depths = list(range(teacher.num_hidden_layers, 0, -1)) if depth else [teacher.num_hidden_layers]

    smallest = ModelShape(min(hiddens), min(inters), *min(heads), min(depths), teacher.head_dim)
    if formula.total(smallest) > target.params:
        raise TargetError(
            f"target of {target.params:,} parameters is below the smallest shape strategy {strategy!r} allows "
            f"({formula.total(smallest):,} at {smallest.to_dict()}); raise the target"
            + ("" if strategy == "width+depth" else " or use strategy='width+depth'")
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
        _keep(best, ((-_cost(teacher, s, config.weights), p, -order), s, p), k)
    if best:
        top = sorted(best, key=lambda item: (-item[0][0], -item[0][1], -item[0][2]))
        return [(-key[0], p, s) for key, s, p in top], count, True
    if not below:
        raise TargetError(
            f"no {strategy} shape on the grid below {target.params:,} parameters can be saved for "
            f"this model ({constraint(smallest) if constraint else 'none fits'})"
        )
    largest = sorted(below, key=lambda item: (-item[0][0], -item[0][1]))
    return [(_cost(teacher, s, config.weights), key[0], s) for key, s in largest], 0, False


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
        raise TargetError("the target shape removes layers but strategy='width'; use 'depth' or 'width+depth'")
    if width_changed and strategy == "depth":
        raise TargetError("the target shape changes widths but strategy='depth'; use 'width' or 'width+depth'")
    return Plan(shape, formula.total(shape), f"explicit shape {dict(target.shape)} requested", 1)
