"""The pruning stage's configs and the vocabulary they share: a leaf module.

Everything here is plain data with its checks, importable without a model, torch or the stage's machinery, so
that a recipe, the command line or a pipeline can build and check a config before anything is loaded. This module
imports only :mod:`compress.errors` and other config modules (:mod:`compress.distillation.config`, for the short
distillations of :class:`SearchConfig`); the stage's modules re-export these names where they used to live.

* :data:`STRATEGIES` — the pruning strategies, the one tuple every caller checks against;
* :data:`SHAPE_FIELDS` — the five sizes a pruning target may name;
* :class:`CalibrationConfig` — how much text importance estimation sees;
* :class:`Target` — a parsed pruning target (a parameter budget or an explicit shape);
* :class:`PlanConfig` — the knobs of the budget planner (:mod:`compress.pruning.plan`);
* :class:`SearchConfig` — how the candidate-shape search tests shapes (:mod:`compress.pruning.search`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..distillation.config import DistillConfig
from ..errors import ConfigError, TargetError

#: The pruning strategies: widths only, layers only, or both.
STRATEGIES = ("width", "depth", "width+depth")
#: The sizes a pruning target may name (unnamed ones keep the teacher's value).
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")
#: How the candidate-shape search scores a candidate (lower wins).
SCORES = ("kl", "perplexity")


def check_strategy(strategy: Any) -> None:
    """Refuse a strategy that is not one of :data:`STRATEGIES`, naming it."""
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ConfigError(f"strategy should be one of {STRATEGIES}, got {strategy!r}")


def check_config(name: str, value: Any, cls: type) -> None:
    """Refuse a config argument ``name`` that is neither None nor a ``cls``; a dict gets the line that builds one
    (``compress.CalibrationConfig(**calibration)``)."""
    if value is not None and not isinstance(value, cls):
        raise ConfigError(
            f"{name} should be a compress.{cls.__name__} (or None), got {type(value).__name__}"
            + (f"; build one: compress.{cls.__name__}(**{name})" if isinstance(value, dict) else "")
        )


@dataclass
class CalibrationConfig:
    """How much text importance estimation sees. Minitron uses 1024 samples; fewer is faster and noisier."""

    num_samples: int = 1024
    seq_len: int = 512
    batch_size: int = 8
    min_samples: int = 8

    def __post_init__(self) -> None:
        for name in ("num_samples", "seq_len", "batch_size", "min_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"CalibrationConfig.{name} should be a positive integer, got {value!r}")
        if self.seq_len < 2:
            raise ConfigError(f"CalibrationConfig.seq_len should be at least 2, got {self.seq_len}")
        if self.min_samples > self.num_samples:
            raise ConfigError(
                f"CalibrationConfig.min_samples={self.min_samples} exceeds num_samples={self.num_samples}"
            )


# -- targets ---------------------------------------------------------------------------------------------------


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
        if is_number(target):
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


def is_number(value: Any) -> bool:
    """A real number that is not a boolean (``True`` is an ``int`` to Python, never a size or a weight here)."""
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
    if not is_number(value):
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


# -- the planner -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanConfig:
    """Knobs of the budget planner; the default weights come from a measured sweep (see
    :mod:`compress.pruning.plan`'s docstring)."""

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
            if not is_number(w) or not math.isfinite(w) or w < 0:
                raise ConfigError(f"PlanConfig.weights[{axis!r}] should be a non-negative number, got {w!r}")
        if not is_number(self.tolerance) or not 0 < self.tolerance < 1:
            raise ConfigError(f"PlanConfig.tolerance should be in (0, 1), got {self.tolerance!r}")
        if isinstance(self.multiple_of, bool) or not isinstance(self.multiple_of, int) or self.multiple_of < 1:
            raise ConfigError(f"PlanConfig.multiple_of should be a positive integer, got {self.multiple_of!r}")
        if not is_number(self.min_fraction) or not 0 < self.min_fraction <= 1:
            raise ConfigError(f"PlanConfig.min_fraction should be in (0, 1], got {self.min_fraction!r}")


# -- the candidate-shape search --------------------------------------------------------------------------------


def default_short_distill(tokens: int, seq_len: int = 256, **changes: Any) -> DistillConfig:
    """Small batches (many optimizer steps from few tokens) and a high learning rate, the warm-up a tenth of the
    run (DistillConfig's default): what a few thousand tokens per candidate can use. ``changes`` override."""
    steps = max(1, tokens // (4 * seq_len))
    settings = dict(
        max_tokens=tokens, seq_len=seq_len, batch_size=4, lr=5e-4, progress=False, log_every=max(1, min(10, steps))
    )
    return DistillConfig(**{**settings, **changes})


@dataclass
class SearchConfig:
    """How :func:`compress.pruning.search.search_shapes` tests candidate shapes.

    ``candidates``: how many of the planner's best shapes to try (K). ``tokens_per_candidate``: the short
    distillation budget of each (the same windows for every candidate). ``eval_windows``: held-out windows of
    ``distill.seq_len`` tokens the score is computed on. ``score``: ``"kl"`` (mean per-token KL(teacher ||
    student), default) or ``"perplexity"``; lower wins. ``distill``: the :class:`DistillConfig` of the short
    runs, whose budget is replaced by ``tokens_per_candidate`` (None: 4 windows of 256 tokens per step, lr 5e-4,
    a warm-up of a tenth of the steps, at least one); it may not write files (``output_dir``) or train the teacher
    (``teacher_correction_steps``). ``progress``: a bar over the candidates.

    Every field is checked at construction and again when the search starts; a bad value raises
    :class:`~compress.errors.ConfigError` naming the field.
    """

    candidates: int = 4
    tokens_per_candidate: int = 16384
    eval_windows: int = 8
    score: str = "kl"
    distill: DistillConfig | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (see the class docstring); fill in the default short distillation and give it this
        config's token budget."""
        for name in ("candidates", "tokens_per_candidate", "eval_windows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ConfigError(f"SearchConfig.{name} should be a positive integer, got {value!r}")
            setattr(self, name, int(value))
        if not isinstance(self.score, str) or self.score not in SCORES:
            raise ConfigError(f"SearchConfig.score should be one of {SCORES}, got {self.score!r}")
        if self.progress is not True and self.progress is not False:
            raise ConfigError(f"SearchConfig.progress should be True or False, got {self.progress!r}")
        if self.distill is None:
            self.distill = default_short_distill(self.tokens_per_candidate)
        if not isinstance(self.distill, DistillConfig):
            raise ConfigError(
                f"SearchConfig.distill should be a compress.DistillConfig (or None), got "
                f"{type(self.distill).__name__}"
                + ("; build one: compress.DistillConfig(**your_dict)" if isinstance(self.distill, dict) else "")
            )
        self._check_short_runs(self.distill)
        d = self.distill
        if d.max_tokens != self.tokens_per_candidate or d.max_steps is not None:
            self.distill = dataclasses.replace(d, max_tokens=self.tokens_per_candidate, max_steps=None)
        self.distill.validate()

    def _check_short_runs(self, d: DistillConfig) -> None:
        """Refuse what the short runs cannot do: write files, read a teacher cache, train the teacher, or take
        less than one optimizer step."""
        writes = {
            "output_dir": d.output_dir,
            "resume": d.resume,
            "checkpoint_every": d.checkpoint_every,
            "tensorboard": d.tensorboard,
        }
        for name, value in writes.items():
            if value:
                raise ConfigError(
                    f"SearchConfig.distill.{name}={value!r}: the short runs of the search write no "
                    "files (every candidate would write over the last one's); leave it unset"
                )
        if d.teacher_cache is not None:
            raise ConfigError(
                f"SearchConfig.distill.teacher_cache={d.teacher_cache!r}: a cache holds the teacher's "
                "scores of other windows than the search's short runs use; leave it unset"
            )
        if d.teacher_correction_steps:
            raise ConfigError(
                f"SearchConfig.distill.teacher_correction_steps={d.teacher_correction_steps!r}: "
                "teacher correction trains the teacher in place, and the search gives the teacher "
                "back unchanged; correct the teacher first, then search with it"
            )
        if self.tokens_per_candidate < d.tokens_per_step:
            raise ConfigError(
                f"SearchConfig.tokens_per_candidate={self.tokens_per_candidate} is less than one "
                f"optimizer step of SearchConfig.distill ({d.batch_size} x {d.grad_accum} windows of "
                f"{d.seq_len} tokens = {d.tokens_per_step}); raise it or shrink the batch"
            )

    def to_dict(self) -> dict:
        """Plain values, the short distillation's config included (for reports and recipes)."""
        out = asdict(self)
        assert self.distill is not None  # set by validate()
        out["distill"] = self.distill.to_dict()
        return out
