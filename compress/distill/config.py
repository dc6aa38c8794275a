"""The distillation config: one validated dataclass, Minitron's choices as defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ConfigError
from .losses import HIDDEN_LOSSES, LOGIT_LOSSES

DTYPES = ("auto", "bf16", "fp32")
PARALLEL = ("auto", "ddp", "fsdp")


@dataclass
class DistillConfig:
    """How to distill a student from its teacher.

    Objective: ``logit_loss`` (``forward_kl`` — Minitron's —, ``reverse_kl`` or ``jsd`` with ``jsd_beta``) at
    ``temperature``, optionally on the teacher's ``top_k`` logits, plus ``alpha_ce`` × the LM cross-entropy
    (Minitron: 0). ``hidden_loss`` (``cosine``/``mse``, weight ``hidden_weight``) adds hidden-state matching on
    ``hidden_layers`` (student layer indices; default: every layer), through a learned projection when widths
    differ; ``layer_map`` overrides which teacher layer each student layer learns from.

    Budget: ``max_steps`` optimizer steps, or ``max_tokens`` tokens in all (whichever is given). Each step
    takes ``batch_size × grad_accum`` windows of ``seq_len`` tokens *on every process*, so under ``torchrun``
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
    """

    logit_loss: str = "forward_kl"
    temperature: float = 1.0
    jsd_beta: float = 0.5
    top_k: int | None = None
    alpha_ce: float = 0.0
    logit_weight: float = 1.0
    hidden_loss: str | None = None
    hidden_weight: float = 1.0
    hidden_layers: list[int] | None = None
    layer_map: dict[int, int] | None = None

    seq_len: int = 512
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int | None = None
    max_tokens: int | None = None

    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
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
        def bad(name: str, expected: str) -> None:
            raise ConfigError(f"DistillConfig.{name} should be {expected}, got {getattr(self, name)!r}")

        if self.logit_loss not in LOGIT_LOSSES:
            bad("logit_loss", f"one of {LOGIT_LOSSES}")
        if self.hidden_loss is not None and self.hidden_loss not in HIDDEN_LOSSES:
            bad("hidden_loss", f"None or one of {HIDDEN_LOSSES}")
        if self.dtype not in DTYPES:
            bad("dtype", f"one of {DTYPES}")
        if self.parallel not in PARALLEL:
            bad("parallel", f"one of {PARALLEL}")
        if self.shard_teacher not in (None, True, False):
            bad("shard_teacher", "None, True or False")
        if self.memory_budget_gib is not None and (not isinstance(self.memory_budget_gib, (int, float))
                                                   or not self.memory_budget_gib > 0):
            bad("memory_budget_gib", "None or a positive number of GiB")
        if not self.temperature > 0:
            bad("temperature", "positive")
        if not 0 <= self.jsd_beta <= 1:
            bad("jsd_beta", "in [0, 1]")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            bad("top_k", "None or a positive integer")
        for name in ("alpha_ce", "logit_weight", "hidden_weight", "weight_decay", "lr"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                bad(name, "a non-negative number")
        if self.logit_weight == 0 and self.alpha_ce == 0 and self.hidden_loss is None:
            raise ConfigError("DistillConfig has no objective: logit_weight, alpha_ce and hidden_loss are all off")
        for name in ("seq_len", "batch_size", "grad_accum", "chunk_tokens", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "a positive integer")
        for name in ("warmup_steps", "checkpoint_every", "teacher_correction_steps", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                bad(name, "a non-negative integer")
        for name in ("max_steps", "max_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                bad(name, "None or a positive integer")
        if self.max_steps is None and self.max_tokens is None:
            raise ConfigError("DistillConfig needs a budget: set max_steps or max_tokens")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", "in [0, 1]")
        if (self.checkpoint_every or self.resume) and not self.output_dir:
            raise ConfigError("DistillConfig.checkpoint_every / resume need output_dir")
        if self.tensorboard and not self.output_dir:
            raise ConfigError("DistillConfig.tensorboard writes to output_dir/tensorboard: set output_dir")

    @property
    def tokens_per_step(self) -> int:
        """Tokens one process trains on per optimizer step."""
        return self.batch_size * self.grad_accum * self.seq_len

    def steps_for(self, world: int = 1) -> int:
        """Optimizer steps of a run over ``world`` processes (``max_tokens`` is the budget of all of them)."""
        if self.max_steps is not None:
            return self.max_steps
        return max(1, self.max_tokens // (self.tokens_per_step * world))

    @property
    def total_steps(self) -> int:
        """Optimizer steps of a one-process run (see :meth:`steps_for`)."""
        return self.steps_for(1)

    def to_dict(self) -> dict:
        return asdict(self)
