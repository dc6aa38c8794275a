"""The distillation config: one validated dataclass, Minitron's choices as defaults."""

from __future__ import annotations

import difflib
import functools
import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, cast

from ..errors import ConfigError

#: The divergences between the teacher's and the student's next-token distributions (see
#: :func:`compress.distillation.losses.divergence`).
LOGIT_LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")
#: The hidden-state losses (see :func:`compress.distillation.losses.hidden_state_loss`).
HIDDEN_LOSSES = ("cosine", "mse")
#: The logit losses a teacher cache can serve (top-k log-probabilities at temperature 1: the two KLs).
CACHED_LOSSES = ("forward_kl", "reverse_kl")
DTYPES = ("auto", "bf16", "fp32")
#: Below this many optimizer steps of the default 8 x 512 batch, the default batch shape becomes 4 x 256.
MIN_DEFAULT_STEPS = 32
PARALLEL = ("auto", "ddp", "fsdp")


@dataclass
class DistillConfig:
    """How to distill a student from its teacher.

    Objective: ``logit_loss`` (``forward_kl`` — Minitron's —, ``reverse_kl``, ``jsd`` with ``jsd_beta`` (GKD's
    generalized JSD), or DistiLLM's skew KLs ``skew_forward_kl`` = KL(t ‖ α t + (1-α) s) and ``skew_reverse_kl``
    = KL(s ‖ α s + (1-α) t) with α = ``skew_alpha``) at ``temperature``, optionally on the teacher's ``top_k``
    logits, plus ``alpha_ce`` × the LM cross-entropy (Minitron: 0). ``on_policy_fraction`` of the batches
    (GKD's λ) are on-policy: the student samples the second half of each window (after
    ``on_policy_prompt_tokens``, default half the window) at ``on_policy_temperature``, and the loss is taken
    on the sampled tokens only, as the teacher scores them (no cross-entropy on those batches; one process or
    DDP). ``teacher_cache`` (a folder written by :func:`compress.build_teacher_cache` for the same windows and
    teacher) replaces the teacher's forward pass with its stored top-k log-probabilities. ``hidden_loss``
    (``cosine``/``mse``, weight ``hidden_weight``) adds hidden-state matching on ``hidden_layers`` (student layer
    indices; default: every layer), through a learned projection when widths differ; ``layer_map`` overrides
    which teacher layer each student layer learns from.

    Budget: ``max_steps`` optimizer steps, or ``max_tokens`` tokens in all (set one of them, not both). Each step
    takes ``batch_size × grad_accum`` windows of ``seq_len`` tokens *on every process* (by default 8 × 512, or
    4 × 256 when ``max_tokens`` would give fewer than 32 steps of 8 × 512: small budgets need steps more than
    long windows), so under ``torchrun``
    with N processes a step is N times larger and ``max_tokens`` gives N times fewer steps: the token budget
    is global. Speed: ``dtype`` (``auto`` = bf16 compute with fp32 master weights on CUDA, fp32 on CPU),
    ``compile`` (the student's decoder layers and the fused loss), ``gradient_checkpointing`` (per decoder
    layer), ``chunk_tokens`` (token chunk of the fused logit loss). Scale: ``parallel`` picks the multi-process
    engine — ``ddp`` replicates the student, ``fsdp`` shards its weights, gradients and optimizer state
    (FSDP2), ``auto`` takes DDP unless the memory plan says a replica does not fit; ``shard_teacher`` (default:
    only when it does not fit whole) shards the frozen teacher too under ``fsdp``. ``memory_budget_gib``
    overrides the per-device memory the plan checks against (default: the GPU's memory; no check on CPU).
    Robustness: ``output_dir`` receives ``metrics.jsonl`` (and TensorBoard event files in
    ``output_dir/tensorboard`` with ``tensorboard=True``), written every ``log_every`` steps (the only steps
    on which the loop waits for the device), and, every ``checkpoint_every`` steps, a checkpoint;
    ``resume=True`` continues from the last one. ``teacher_correction_steps`` first fine-tunes the teacher on
    the distillation data (Minitron does this when the original pretraining data is unavailable).
    Optimizer: AdamW at ``lr`` (default 5e-4: on SmolLM2 at 32k tokens it beat 1e-4 at both batch shapes, and
    1e-3 was 4% better still at 4 × 256; large students on large budgets usually want less, Minitron used 1e-4
    for 8B) with a linear warm-up over ``warmup_ratio`` of the run's steps (or exactly
    ``warmup_steps``, when set), then a cosine decay to ``min_lr_ratio`` × ``lr`` at the last step: the schedule
    scales with the run. A ``warmup_steps`` that would take the whole run is cut to ``warmup_ratio`` of it, with
    a warning and a note in the report's ``schedule``. ``max_grad_norm`` clips the global gradient norm
    (``None``: no clipping).

    Every field is checked at construction (and again when :func:`~compress.distill` starts): a bad value
    raises :class:`~compress.errors.ConfigError` naming the field and the value, as does an unknown field name.
    """

    logit_loss: str = "forward_kl"
    temperature: float = 1.0
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    top_k: int | None = None
    alpha_ce: float = 0.0
    logit_weight: float = 1.0
    hidden_loss: str | None = None
    hidden_weight: float = 1.0
    hidden_layers: list[int] | None = None
    layer_map: dict[int, int] | None = None
    on_policy_fraction: float = 0.0
    on_policy_prompt_tokens: int | None = None
    on_policy_temperature: float = 1.0
    teacher_cache: str | None = None

    seq_len: int | None = None
    batch_size: int | None = None
    grad_accum: int = 1
    max_steps: int | None = None
    max_tokens: int | None = None

    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    dtype: str = "auto"
    parallel: str = "auto"
    shard_teacher: bool | None = None
    memory_budget_gib: float | None = None
    compile: bool = False
    gradient_checkpointing: bool = False
    chunk_tokens: int = 1024

    output_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    log_every: int = 10
    tensorboard: bool = False
    seed: int = 0
    teacher_correction_steps: int = 0
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (run at construction, and again by :func:`~compress.distill` in case a field was
        changed since). Raises :class:`~compress.errors.ConfigError` naming the field, its value and what it
        should be. What needs the models (``top_k`` against the vocabulary, ``layer_map`` and
        ``hidden_layers`` against the depths) is checked when training starts."""
        self._check_objective()
        self._check_on_policy_and_cache()
        self._check_budget()
        self._check_optimizer()
        self._check_engine()
        self._check_output()

    # -- the checks, by group (in this order: the first bad field is the one named)

    def _check_objective(self) -> None:
        """The logit loss, its temperature and mixtures, the weights, the hidden-state loss and its layers, and
        that at least one term is on."""
        self._choice("logit_loss", LOGIT_LOSSES)
        self._number("temperature", positive=True)
        self._number("jsd_beta", high=1.0)
        self._number("skew_alpha", high=1.0)
        if self.skew_alpha >= 1.0:
            self._bad("skew_alpha", "a number in [0, 1) (at 1 the skewed mixture is the teacher itself: no signal)")
        self._integer("top_k", 1, optional=True)
        for name in ("alpha_ce", "logit_weight", "hidden_weight"):
            self._number(name)
        self._choice("hidden_loss", HIDDEN_LOSSES, optional=True)
        self._check_layers()
        hidden_on = self.hidden_loss is not None and self.hidden_weight > 0
        if not (self.logit_weight > 0 or self.alpha_ce > 0 or hidden_on):
            raise ConfigError(
                f"DistillConfig has no objective: logit_weight={self.logit_weight!r}, alpha_ce={self.alpha_ce!r}, "
                f"hidden_loss={self.hidden_loss!r} (hidden_weight={self.hidden_weight!r}); make one of them non-zero"
            )

    def _check_on_policy_and_cache(self) -> None:
        """On-policy batches and the teacher cache: their own fields, and what each rules out."""
        self._number("on_policy_fraction", high=1.0)
        if self.on_policy_fraction > 0 and self.logit_weight == 0:
            raise ConfigError(
                f"DistillConfig.on_policy_fraction={self.on_policy_fraction} trains on the student's "
                "own samples as the teacher scores them, but logit_weight=0 turns the teacher's score "
                "off (those batches would teach the student nothing): set logit_weight > 0"
            )
        self._integer("on_policy_prompt_tokens", 1, optional=True)
        self._number("on_policy_temperature", positive=True)
        if self.teacher_cache is None:
            return
        if not isinstance(self.teacher_cache, (str, os.PathLike)) or not os.fspath(self.teacher_cache):
            self._bad("teacher_cache", "None or the folder of a teacher cache")
        self.teacher_cache = os.fspath(self.teacher_cache)
        if self.on_policy_fraction > 0:
            raise ConfigError(
                "DistillConfig.teacher_cache holds the teacher's scores of the data windows, but "
                f"on_policy_fraction={self.on_policy_fraction} asks it to score the student's own "
                "samples: use one or the other"
            )
        if self.hidden_loss is not None or self.temperature != 1.0 or self.top_k is not None:
            raise ConfigError(
                "DistillConfig.teacher_cache stores top-k log-probabilities at temperature 1: it "
                "cannot serve hidden_loss, temperature != 1 or top_k (the cache's own k applies); "
                f"got hidden_loss={self.hidden_loss!r}, temperature={self.temperature!r}, "
                f"top_k={self.top_k!r}"
            )
        if self.teacher_correction_steps:
            raise ConfigError(
                "DistillConfig.teacher_cache was written by the teacher as it is, but "
                f"teacher_correction_steps={self.teacher_correction_steps} would change that "
                "teacher first: correct the teacher, build the cache from it, then distill"
            )
        if self.logit_loss not in CACHED_LOSSES:
            raise ConfigError(
                f"DistillConfig.teacher_cache supports logit_loss 'forward_kl' or 'reverse_kl', got {self.logit_loss!r}"
            )

    def _check_budget(self) -> None:
        """The batch shape (defaults filled in first) and the budget: exactly one of max_steps / max_tokens."""
        self._default_batch_shape()
        self._integer("seq_len", 2)
        assert self.seq_len is not None  # set by _default_batch_shape, checked by _integer()
        if self.on_policy_prompt_tokens is not None and self.on_policy_prompt_tokens >= self.seq_len:
            self._bad(
                "on_policy_prompt_tokens",
                f"None or fewer than seq_len={self.seq_len} tokens (the student samples the rest of each window)",
            )
        for name in ("batch_size", "grad_accum"):
            self._integer(name, 1)
        self._integer("max_steps", 1, optional=True)
        self._integer("max_tokens", 1, optional=True)
        if self.max_steps is None and self.max_tokens is None:
            raise ConfigError("DistillConfig needs a budget: set max_steps or max_tokens")
        if self.max_steps is not None and self.max_tokens is not None:
            raise ConfigError(
                f"DistillConfig has two budgets, max_steps={self.max_steps!r} and "
                f"max_tokens={self.max_tokens!r}: set only one of them"
            )

    def _check_optimizer(self) -> None:
        """AdamW and the learning-rate schedule."""
        self._number("lr", positive=True)
        self._number("min_lr_ratio", high=1.0)
        self._integer("warmup_steps", 0, optional=True)
        self._number("warmup_ratio", high=1.0)
        if self.warmup_ratio >= 1.0:
            self._bad("warmup_ratio", "a number in [0, 1) (a warm-up of the whole run never reaches the peak lr)")
        self._number("weight_decay")
        self._number("max_grad_norm", positive=True, optional=True)

    def _check_engine(self) -> None:
        """Precision, the multi-process engine, and the speed switches."""
        self._choice("dtype", DTYPES)
        self._choice("parallel", PARALLEL)
        self._flag("shard_teacher", optional=True)
        self._number("memory_budget_gib", positive=True, optional=True)
        self._flag("compile")
        self._flag("gradient_checkpointing")
        self._integer("chunk_tokens", 1)

    def _check_output(self) -> None:
        """Output folder, checkpoints, logging, seed, teacher correction, ``extra``; and what needs output_dir."""
        if self.output_dir is not None:
            if not isinstance(self.output_dir, (str, os.PathLike)) or not os.fspath(self.output_dir):
                self._bad("output_dir", "None or a folder path")
            self.output_dir = os.fspath(self.output_dir)  # a Path -> str (the config is written to JSON)
        self._integer("checkpoint_every", 0)
        self._flag("resume")
        self._integer("log_every", 1)
        self._flag("tensorboard")
        self._integer("seed", 0, high=2**63)
        self._integer("teacher_correction_steps", 0)
        self._flag("progress")
        if not isinstance(self.extra, dict):
            self._bad("extra", "a dict")
        try:
            json.dumps(self.extra)
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"DistillConfig.extra should hold JSON values only (it is saved with checkpoints "
                f"and the report), got {self.extra!r} ({exc})"
            ) from None
        if self.checkpoint_every and not self.output_dir:
            raise ConfigError(
                f"DistillConfig.checkpoint_every={self.checkpoint_every} needs output_dir (where checkpoints go)"
            )
        if self.resume and not self.output_dir:
            raise ConfigError("DistillConfig.resume=True needs output_dir (the folder of the run to continue)")
        if self.tensorboard and not self.output_dir:
            raise ConfigError("DistillConfig.tensorboard writes to output_dir/tensorboard: set output_dir")

    # -- one field at a time: each refuses with "DistillConfig.<name> should be <what>, got <value>"

    def _bad(self, name: str, expected: str) -> None:
        """Raise the ConfigError naming the field, its value and what it should be."""
        raise ConfigError(f"DistillConfig.{name} should be {expected}, got {getattr(self, name)!r}")

    def _integer(self, name: str, low: int, optional: bool = False, high: int | None = None) -> None:
        """An integer in ``[low, high)`` (``None`` too when ``optional``), stored back as a plain ``int``."""
        value = getattr(self, name)
        if optional and value is None:
            return
        what = ("None or " if optional else "") + (
            "a positive integer" if low == 1 else "a non-negative integer" if low == 0 else f"an integer >= {low}"
        )
        if high is not None:
            what += " below 2**63" if high == 2**63 else f" below {high}"
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            self._bad(name, what)
        if value < low or (high is not None and value >= high):
            self._bad(name, what)
        setattr(self, name, int(value))  # numpy integers -> int (the config is written to JSON)

    def _number(
        self, name: str, *, positive: bool = False, low: float = 0.0, high: float | None = None, optional: bool = False
    ) -> None:
        """A finite real number (``> 0`` when ``positive``, else in ``[low, high]``); ``None`` too when ``optional``."""
        value = getattr(self, name)
        if optional and value is None:
            return
        what = ("None or " if optional else "") + (
            "a positive finite number"
            if positive
            else f"a finite number in [{low:g}, {high:g}]"
            if high is not None
            else "a finite number >= 0"
        )
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            self._bad(name, what)
        if (positive and not value > 0) or value < low or (high is not None and value > high):
            self._bad(name, what)
        setattr(self, name, float(value) if not isinstance(value, int) else value)

    def _flag(self, name: str, optional: bool = False) -> None:
        value = getattr(self, name)
        if not (value is True or value is False or (optional and value is None)):
            self._bad(name, "None, True or False" if optional else "True or False")

    def _choice(self, name: str, options: tuple, optional: bool = False) -> None:
        value = getattr(self, name)
        if optional and value is None:
            return
        if not isinstance(value, str) or value not in options:
            self._bad(name, ("None or " if optional else "") + f"one of {options}")

    def _check_layers(self) -> None:
        """``hidden_layers`` / ``layer_map``: indices only here (against the models when training starts)."""

        def index(value) -> bool:
            # (numbers.Integral declares no >=; the values here are ints or numpy integers)
            return isinstance(value, numbers.Integral) and not isinstance(value, bool) and cast(int, value) >= 0

        if self.hidden_layers is not None:
            value: Any = self.hidden_layers  # anything a caller set: this checks it
            if (
                not isinstance(value, (list, tuple))
                or not value
                or not all(index(i) for i in value)
                or len(set(value)) != len(value)
            ):
                raise ConfigError(
                    f"DistillConfig.hidden_layers should be None or a non-empty list of distinct "
                    f"student layer indices (integers >= 0), got {value!r}"
                )
            self.hidden_layers = [int(i) for i in value]
        if self.layer_map is not None:
            value = self.layer_map
            keys_ok = isinstance(value, dict) and all(
                index(k) or (isinstance(k, str) and k.isdigit()) for k in value
            )  # JSON gives "0": ...
            if not isinstance(value, dict) or not value or not keys_ok or not all(index(v) for v in value.values()):
                raise ConfigError(
                    f"DistillConfig.layer_map should be None or a non-empty dict of student layer -> "
                    f"teacher layer (integers >= 0), got {value!r}"
                )
            converted = {int(k): int(v) for k, v in value.items()}
            if len(converted) != len(value):
                raise ConfigError(f"DistillConfig.layer_map names a student layer twice: {value!r}")
            self.layer_map = converted
        for name in ("hidden_layers", "layer_map"):
            if getattr(self, name) is not None and self.hidden_loss is None:
                raise ConfigError(
                    f"DistillConfig.{name}={getattr(self, name)!r} only applies to the hidden-state "
                    "loss, which is off (hidden_loss=None): set hidden_loss='cosine' or 'mse', or "
                    f"leave {name} at None"
                )
        if self.hidden_layers is not None and self.layer_map is not None:
            missing = [i for i in self.hidden_layers if i not in self.layer_map]
            if missing:
                raise ConfigError(
                    f"DistillConfig.hidden_layers={self.hidden_layers!r} names student layers "
                    f"{missing} that layer_map={self.layer_map!r} does not map to a teacher layer: add "
                    "them to layer_map or drop them from hidden_layers"
                )

    def _default_batch_shape(self) -> None:
        """``batch_size``/``seq_len`` left at None: 8 windows of 512 tokens, or 4 of 256 when the token budget
        would give fewer than :data:`MIN_DEFAULT_STEPS` steps of 8 x 512 (measured on SmolLM2 at 32k tokens: 32
        steps of 4 x 256 ended at 0.72x the perplexity of 8 steps of 8 x 512, BENCHMARKS.md)."""
        small = (
            self.max_steps is None
            and isinstance(self.max_tokens, numbers.Integral)
            and self.max_tokens < MIN_DEFAULT_STEPS * 8 * 512
        )
        if self.seq_len is None:
            self.seq_len = 256 if small else 512
        if self.batch_size is None:
            self.batch_size = 4 if small else 8

    def warmup_for(self, total: int) -> tuple[int, str | None]:
        """Warm-up steps of a run of ``total`` optimizer steps, and a note when ``warmup_steps`` had to be cut:
        a warm-up at least as long as the run would never reach the peak learning rate."""
        by_ratio = int(round(self.warmup_ratio * total))
        if self.warmup_steps is None:
            return by_ratio, None
        if self.warmup_steps >= total and self.warmup_steps > 0:
            return by_ratio, (
                f"warmup_steps={self.warmup_steps} is not shorter than the run ({total} steps): the "
                f"learning rate would never reach lr={self.lr}; warming up over {by_ratio} steps "
                f"(warmup_ratio={self.warmup_ratio}) instead"
            )
        return self.warmup_steps, None

    def on_policy_prompt(self) -> int:
        """Tokens of each window kept as the prompt of an on-policy batch (the rest is sampled)."""
        assert self.seq_len is not None  # set by validate()
        prompt = self.on_policy_prompt_tokens if self.on_policy_prompt_tokens is not None else self.seq_len // 2
        return max(1, min(prompt, self.seq_len - 1))

    @property
    def tokens_per_step(self) -> int:
        """Tokens one process trains on per optimizer step."""
        assert self.batch_size is not None and self.seq_len is not None  # set by validate()
        return self.batch_size * self.grad_accum * self.seq_len

    def steps_for(self, world: int = 1) -> int:
        """Optimizer steps of a run over ``world`` processes (``max_tokens`` is the budget of all of them)."""
        if self.max_steps is not None:
            return self.max_steps
        assert self.max_tokens is not None  # validate(): max_steps or max_tokens is set
        return max(1, self.max_tokens // (self.tokens_per_step * world))

    @property
    def total_steps(self) -> int:
        """Optimizer steps of a one-process run (see :meth:`steps_for`)."""
        return self.steps_for(1)

    def to_dict(self) -> dict:
        return asdict(self)


_ALIASES = {
    "learning_rate": "lr",
    "max_length": "seq_len",
    "sequence_length": "seq_len",
    "block_size": "seq_len",
    "gradient_accumulation_steps": "grad_accum",
    "warmup": "warmup_steps",
    "steps": "max_steps",
    "tokens": "max_tokens",
    "kd_temperature": "temperature",
    "clip_grad_norm": "max_grad_norm",
    "grad_clip": "max_grad_norm",
    "checkpoint_dir": "output_dir",
    "save_steps": "checkpoint_every",
    "logging_steps": "log_every",
    "precision": "dtype",
    "beta": "jsd_beta",
    "lmbda": "on_policy_fraction",
    "warmup_fraction": "warmup_ratio",
    "skew": "skew_alpha",
}
_generated_init = DistillConfig.__init__


@functools.wraps(_generated_init)
def _init(self, *args, **kwargs):
    """The dataclass constructor, with a :class:`ConfigError` naming an unknown field (and the likely one)."""
    known = [f.name for f in fields(DistillConfig)]
    for name in kwargs:
        if name not in known:
            guess = _ALIASES.get(name) or next(iter(difflib.get_close_matches(name, known, n=1)), None)
            raise ConfigError(
                f"DistillConfig has no field {name!r}"
                + (f"; did you mean {guess!r}?" if guess else ".")
                + f" Its fields are: {', '.join(known)}"
            )
    if len(args) > len(known):
        raise ConfigError(f"DistillConfig takes at most {len(known)} values, got {len(args)}: pass them by name")
    _generated_init(self, *args, **kwargs)


DistillConfig.__init__ = _init  # type: ignore[method-assign]  # deliberate: wraps the generated __init__
