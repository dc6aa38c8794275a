"""The distillation loop: teacher forward (no grad), student forward, fused chunked losses, AdamW.

One code path for CPU and CUDA, one process or many. On CUDA: bf16 compute with fp32 master weights, a bf16
teacher, TF32 matmuls, fused AdamW, optional ``torch.compile`` of the student's decoder layers and of the
fused loss, gradient checkpointing per decoder layer, and batches staged through pinned buffers one step
ahead; on CPU the same code in fp32 (or bf16 autocast with ``dtype="bf16"``). Under ``torchrun`` the engine
(``parallel.py``) is DDP or FSDP2; the token budget is global and every rank takes its slice of each global
batch. The loop reads nothing back from the device except on logging and checkpoint steps, where the ranks
also agree on whether any of them saw a non-finite loss or gradient — so all stop together, before a bad
checkpoint is written.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import torch
from torch import nn

from .. import distributed
from ..data import check_source, derived_seed
from ..errors import CompressError, ConfigError, DataError, warn
from ..models import DecoderAdapter, check_plain_logits, layout_for
from ..progress import bar as progress_bar
from ..validate import check_device, check_finite_weights, check_tokenizer_matches
from .checkpoint import (
    check_checkpoint_dir,
    find_resumable,
    latest_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from .config import DistillConfig
from .data import WindowLoader
from .losses import LogitTransform, cached_logit_loss, chunked_logit_loss, hidden_state_loss
from .memory import MemoryPlan, plan_memory
from .parallel import Engine, ModelBackup, TeacherTrunk, gather_teacher
from .teacher_cache import TeacherCache


class DistillError(CompressError, RuntimeError):
    """Training could not go on (e.g. the loss became NaN or infinite)."""


@dataclass
class DistillReport:
    """What :func:`distill` did: budget, losses, speed, and which student layer learned from which teacher layer.

    ``steps`` and ``tokens`` are what this call trained (after a resume: only the steps after the checkpoint;
    0 when the checkpoint already ended the run), ``tokens_per_second`` their speed (0 when none were trained);
    ``total_steps`` / ``total_tokens`` where the run stands, checkpointed steps included. ``final_loss`` is the
    last logged loss of the run (the checkpoint's when this call trained nothing).
    """

    steps: int
    tokens: int
    seconds: float
    tokens_per_second: float
    final_loss: float
    losses: list[dict] = field(default_factory=list)
    layer_map: dict = field(default_factory=dict)
    projection: str | None = None
    resumed_from_step: int | None = None
    peak_memory_mib: float | None = None
    data: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    teacher_correction: dict = field(default_factory=dict)
    engine: dict = field(default_factory=dict)
    memory_plan: dict = field(default_factory=dict)
    total_steps: int | None = None
    total_tokens: int | None = None
    #: The learning-rate schedule as run: total and warm-up steps, and a note when the warm-up was cut.
    schedule: dict = field(default_factory=dict)
    #: On-policy batches (count, sampled tokens, seconds spent sampling) and the teacher cache used, if any.
    objective: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class _LayerOutputs:
    """Forward hooks that keep the outputs of chosen decoder layers for one forward pass."""

    def __init__(self, layers: nn.ModuleList, indices: list[int]):
        self.outputs: dict[int, torch.Tensor] = {}
        self.handles = [layers[i].register_forward_hook(self._hook(i)) for i in indices]

    def _hook(self, i: int):
        def hook(_module, _args, out):
            self.outputs[i] = out[0] if isinstance(out, (tuple, list)) else out

        return hook

    def pop(self) -> dict[int, torch.Tensor]:
        out, self.outputs = self.outputs, {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def default_layer_map(n_student: int, n_teacher: int, kept: list[int] | None = None) -> dict[int, int]:
    """Student layer -> teacher layer: identity at equal depth, the kept teacher layers after depth pruning,
    else evenly spaced (each student layer learns from the teacher layer ending the same fraction of depth)."""
    if kept is not None and len(kept) == n_student:
        return {i: int(t) for i, t in enumerate(kept)}
    if n_student == n_teacher:
        return {i: i for i in range(n_student)}
    return {i: round((i + 1) * n_teacher / n_student) - 1 for i in range(n_student)}


class DistillModule(nn.Module):
    """Student + projections + the loss, as one module so DDP/FSDP see (and synchronize) everything trained."""

    def __init__(
        self,
        student: nn.Module,
        adapter: DecoderAdapter,
        config: DistillConfig,
        layer_map: dict[int, int],
        teacher_width: int,
        hidden_init: list[int] | None = None,
        teacher_transform: LogitTransform | None = None,
    ):
        super().__init__()
        self.student, self.adapter, self.config, self.layer_map = student, adapter, config, layer_map
        self.hidden_init = hidden_init
        # What each model does to its logits after the LM head (Gemma's soft-capping, Granite's scaling): the
        # fused loss works from hidden states and head weights, so it applies the same transforms itself.
        self.student_transform = adapter.logit_transform(adapter.shape_config(student.config))
        self.teacher_transform = teacher_transform
        width = adapter.shape_config(student.config).hidden_size
        self.projections = nn.ModuleDict()
        if config.hidden_loss is not None and width != teacher_width:
            device = next(student.parameters()).device
            self.projections["hidden"] = nn.Linear(width, teacher_width, bias=False, device=device)
            if device.type != "meta":
                with torch.no_grad():
                    cast(nn.Linear, self.projections["hidden"]).weight.copy_(self._projection_init())
        self._captured = (
            _LayerOutputs(adapter.decoder_layers(student), sorted(layer_map)) if config.hidden_loss else None
        )
        self.cached_targets: tuple[torch.Tensor, ...] | None = None

    def _projection_init(self) -> torch.Tensor:
        """Start from the channel selection pruning made, when known (exact at step 0), else orthogonal (seeded:
        every engine and every rank starts from the same matrix)."""
        out_f, in_f = cast(nn.Linear, self.projections["hidden"]).weight.shape
        weight = torch.zeros(out_f, in_f)
        if self.hidden_init is not None and len(self.hidden_init) == in_f:
            weight[torch.tensor(self.hidden_init), torch.arange(in_f)] = 1.0
        else:
            nn.init.orthogonal_(weight, generator=torch.Generator().manual_seed(self.config.seed))
        return weight

    def initial_state(self) -> dict[str, torch.Tensor]:
        """Initial values of the trained parameters that are not the student's (for a meta-built module)."""
        return {"projections.hidden.weight": self._projection_init()} if "hidden" in self.projections else {}

    def forward(
        self,
        input_ids: torch.Tensor,
        teacher_final: torch.Tensor | None,
        teacher_layers: dict[int, torch.Tensor],
        teacher_head: torch.Tensor | None,
        loss_from: int = 1,
    ) -> torch.Tensor:
        """Returns ``[loss, kd, ce, hidden]`` (only the first carries gradients). The logit losses cover the
        tokens from position ``loss_from`` on (1: every predicted token; an on-policy batch starts at its sampled
        part, and has no cross-entropy: its tokens are the student's own). ``self.cached_targets``, when set by
        the loop, holds the teacher's stored ``(top-k log-probs, indices, log of the rest)`` for every position,
        used instead of ``teacher_final``/``teacher_head`` (kept off the arguments: FSDP would cast them to bf16)."""
        cfg = self.config
        cached = self.cached_targets
        base = self.student.get_submodule(self.adapter.base)
        hidden = base(input_ids=input_ids, use_cache=False).last_hidden_state
        head = cast(torch.Tensor, self.student.get_submodule(self.adapter.lm_head).weight)
        start = loss_from - 1  # the hidden state at position p predicts token p + 1
        labels = input_ids[:, 1:].reshape(-1) if cfg.alpha_ce > 0 and loss_from == 1 else None
        d_s = hidden.shape[-1]
        s_flat = hidden[:, start:-1].reshape(-1, d_s)
        if cached is not None:
            return self._cached_forward(s_flat, head, cached, labels)
        t_flat = None if teacher_final is None else teacher_final[:, start:-1].reshape(-1, teacher_final.shape[-1])
        if not torch.is_autocast_enabled(hidden.device.type):  # under autocast the matmuls cast (no copies)
            if t_flat is not None and t_flat.dtype != hidden.dtype:
                t_flat = t_flat.to(hidden.dtype)
            if teacher_head is not None and teacher_head.dtype != head.dtype:
                teacher_head = teacher_head.to(head.dtype)
        t_head = teacher_head
        loss, kd, ce = chunked_logit_loss(
            s_flat,
            head,
            t_flat,
            t_head,
            labels,
            kind=cfg.logit_loss,
            temperature=cfg.temperature,
            beta=cfg.jsd_beta,
            top_k=cfg.top_k,
            chunk_tokens=cfg.chunk_tokens,
            kd_weight=cfg.logit_weight,
            ce_weight=cfg.alpha_ce,
            compiled=cfg.compile,
            student_transform=self.student_transform,
            teacher_transform=self.teacher_transform,
            skew=cfg.skew_alpha,
        )
        hid = kd.new_zeros(())
        if self._captured is not None:
            assert cfg.hidden_loss is not None  # _captured is made only with a hidden loss
            student_layers = self._captured.pop()
            proj = self.projections["hidden"] if "hidden" in self.projections else None  # noqa: SIM401 (ModuleDict)
            for s_idx, t_idx in self.layer_map.items():
                h_s = student_layers[s_idx]
                if proj is not None:  # the projection's weight dtype decides (fp32 master, bf16 under FSDP)
                    h_s = proj(h_s.to(cast(torch.Tensor, proj.weight).dtype))
                hid = hid + hidden_state_loss(h_s, teacher_layers[t_idx], cfg.hidden_loss)
            hid = hid / len(self.layer_map)
            loss = loss + cfg.hidden_weight * hid
        return torch.stack([loss, kd.detach().to(loss.dtype), ce.detach().to(loss.dtype), hid.detach().to(loss.dtype)])

    def _cached_forward(
        self, s_flat: torch.Tensor, head: torch.Tensor, cached: tuple[torch.Tensor, ...], labels: torch.Tensor | None
    ) -> torch.Tensor:
        """The logit loss against a teacher cache (plus the cross-entropy, when asked for)."""
        cfg = self.config
        t_logp, t_idx, t_rest = (t.reshape(-1, *t.shape[2:]) for t in cached)
        loss, kd = cached_logit_loss(
            s_flat,
            head,
            t_logp,
            t_idx,
            t_rest,
            kind=cfg.logit_loss,
            chunk_tokens=cfg.chunk_tokens,
            student_transform=self.student_transform,
            weight=cfg.logit_weight,
        )
        ce = kd.new_zeros(())
        if labels is not None:
            ce_loss, _, ce = chunked_logit_loss(
                s_flat,
                head,
                None,
                None,
                labels,
                chunk_tokens=cfg.chunk_tokens,
                ce_weight=cfg.alpha_ce,
                compiled=cfg.compile,
                student_transform=self.student_transform,
            )
            loss = loss + ce_loss
        zero = kd.new_zeros(())
        return torch.stack([loss, kd.detach().to(loss.dtype), ce.detach().to(loss.dtype), zero.to(loss.dtype)])


@torch.no_grad()
def sample_continuations(
    model: nn.Module,
    prompts: torch.Tensor,
    new_tokens: int,
    temperature: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``prompts`` ``[B, P]`` followed by ``new_tokens`` tokens sampled from ``model`` at ``temperature`` (the
    whole distribution: no top-k/top-p, as on-policy distillation needs the student's own distribution). Always
    exactly ``new_tokens`` (no stop at EOS), so every rank of a sharded student runs the same number of forward
    passes. Uses the model's KV cache; leaves its train/eval mode as it was."""
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=prompts, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
        tokens = [prompts]
        for i in range(new_tokens):
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
            tokens.append(nxt)
            if i + 1 < new_tokens:
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past, logits = out.past_key_values, out.logits[:, -1]
        return torch.cat(tokens, dim=1)
    finally:
        model.train(was_training)


def _on_policy_now(config: DistillConfig, step: int, micro: int) -> bool:
    """Whether micro-batch ``micro`` of ``step`` is on-policy: a draw seeded by (seed, step, micro), so a resumed
    run, and every rank, makes the same choices."""
    if config.on_policy_fraction <= 0:
        return False
    return random.Random(derived_seed("on-policy", config.seed, step, micro)).random() < config.on_policy_fraction


def _lr_lambda(config: DistillConfig, total: int):
    warmup, _ = config.warmup_for(total)

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine

    return fn


def _teacher_correction(
    trainer: nn.Module, params: list[nn.Parameter], loader: WindowLoader, config: DistillConfig, engine: Engine
) -> dict:
    """Briefly fine-tune the teacher with the LM loss on the distillation data (data-parallel across ranks:
    gradients are averaged, so every rank ends with the same corrected teacher)."""
    trainer.train()
    opt = torch.optim.AdamW(params, lr=config.lr, fused=True)
    losses = []
    for _ in range(config.teacher_correction_steps):
        batch = loader.next_batch()
        with engine.autocast():
            loss = trainer(batch, batch)  # a TeacherTrunk (maybe inside DDP): the LM loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().float())
    trainer.eval()
    pair = distributed.all_reduce_(torch.stack([losses[0], losses[-1]]).cpu()) / distributed.rank_world()[1]
    return {"steps": config.teacher_correction_steps, "first_loss": float(pair[0]), "last_loss": float(pair[1])}


def _summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, or a clear error when the optional tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError(
            "DistillConfig.tensorboard needs the tensorboard package: "
            "pip install 'compress-llm[tensorboard]' (or pip install tensorboard)"
        ) from exc
    return SummaryWriter


def _pick_engine(config: DistillConfig, world: int, plan: MemoryPlan) -> tuple[str, bool]:
    """(engine, shard the teacher?) from the config and the memory plan."""
    if world == 1:  # one process: nothing to replicate or shard across
        return "single", False
    mode = config.parallel
    if mode == "auto":
        mode = "ddp" if plan.fits("ddp") else "fsdp"
    shard = config.shard_teacher
    if shard is None:
        shard = mode == "fsdp" and not plan.fits("fsdp", shard_teacher=False)
    return mode, bool(shard) and mode == "fsdp"


class _Guard:
    """Device-side bookkeeping of the step metrics and of the first non-finite step: the loop never reads a
    value back from the device except on logging, checkpoint and final steps, where all ranks agree at once."""

    def __init__(self, device: torch.device, start_step: int = 0):
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, kd, ce, hidden since last log
        self.steps = 0
        self.first_bad = torch.zeros((), dtype=torch.float64, device=device)
        self.step = torch.full((), float(start_step), dtype=torch.float64, device=device)

    def update(self, metrics: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.step += 1
        self.sums += metrics.double()
        self.steps += 1
        bad = ~(torch.isfinite(metrics).all() & torch.isfinite(grad_norm))
        self.first_bad = torch.where(bad & (self.first_bad == 0), self.step, self.first_bad)

    def check(self) -> int:
        """The first step (1-based, across all ranks) whose loss or gradients were not finite; 0 if none."""
        big = 2.0**52
        code = torch.where(self.first_bad > 0, big - self.first_bad, torch.zeros_like(self.first_bad)).reshape(1)
        code = distributed.all_reduce_(code.cpu(), "max")
        return 0 if float(code) == 0 else int(big - float(code))

    def pop_means(self) -> list[float]:
        sums = distributed.all_reduce_(self.sums.cpu()) / distributed.rank_world()[1]
        means = (sums / max(self.steps, 1)).tolist()
        self.sums.zero_()
        self.steps = 0
        return means


def _check_models(student: nn.Module, teacher: nn.Module) -> None:
    """The two models themselves: modules, distinct, sharing no weight, materialized, finite."""
    for name, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, nn.Module):
            raise DataError(
                f"the {name} should be a torch.nn.Module (a Hugging Face causal LM), got {type(model).__name__}"
            )
        if next(model.parameters(), None) is None:
            raise DataError(f"the {name} ({type(model).__name__}) has no parameters")
        meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        if meta:
            raise DataError(
                f"the {name} has weights on the meta device ({', '.join(meta[:3])}"
                f"{' ...' if len(meta) > 3 else ''}): load its weights first"
            )
    if student is teacher:
        raise DataError(
            "the student and the teacher are the same model object: distillation would train the "
            "teacher it imitates. Pass a copy as the student (copy.deepcopy(teacher), then prune it)"
        )
    teacher_storage = {(p.device, p.data_ptr()) for p in teacher.parameters() if p.numel()}
    shared = [n for n, p in student.named_parameters() if p.numel() and (p.device, p.data_ptr()) in teacher_storage]
    if shared:
        raise DataError(
            f"the student shares weights with the teacher ({', '.join(shared[:3])}"
            f"{' ...' if len(shared) > 3 else ''}): training the student would change the teacher. "
            "Pass a deep copy (copy.deepcopy) as the student"
        )
    check_finite_weights(student, "student")
    check_finite_weights(teacher, "teacher")


def _resolve_layer_map(config: DistillConfig, n_s: int, n_t: int, kept_layers) -> dict[int, int]:
    """The student -> teacher layer map of the hidden loss, checked against both depths."""
    if kept_layers is not None:
        kept = list(kept_layers) if isinstance(kept_layers, (list, tuple, range)) else None
        if (
            kept is None
            or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n_t for t in kept)
            or len(kept) != n_s
        ):
            raise ConfigError(
                f"kept_layers={kept_layers!r} should list, for each of the student's {n_s} layers, the "
                f"teacher layer (0 to {n_t - 1}) it was kept from"
            )
    if config.layer_map is not None:
        wrong = {s: t for s, t in config.layer_map.items() if not (0 <= s < n_s and 0 <= t < n_t)}
        if wrong:
            raise ConfigError(
                f"DistillConfig.layer_map={config.layer_map!r} maps {wrong} outside the models: the "
                f"student has layers 0 to {n_s - 1}, the teacher 0 to {n_t - 1}"
            )
        layer_map = dict(config.layer_map)
    else:
        layer_map = default_layer_map(n_s, n_t, kept_layers)
    if config.hidden_layers is not None:
        outside = [i for i in config.hidden_layers if not 0 <= i < n_s]
        if outside:
            raise ConfigError(
                f"DistillConfig.hidden_layers={config.hidden_layers!r} names layers {outside} the student "
                f"does not have (it has layers 0 to {n_s - 1})"
            )
        missing = [i for i in config.hidden_layers if i not in layer_map]
        if missing:
            raise ConfigError(
                f"DistillConfig.hidden_layers={config.hidden_layers!r} names student layers {missing} "
                f"that layer_map={layer_map!r} does not map to a teacher layer: add them to layer_map"
            )
        layer_map = {i: layer_map[i] for i in config.hidden_layers}
    return layer_map


def check(config: DistillConfig, *, data=None, device: str | torch.device | None = None) -> None:
    """Refuse, before any model is touched, what about a distillation run can be known without the models: a
    ``config`` that is not a :class:`DistillConfig` or holds a bad value (checked again: a field may have changed
    since construction), ``tensorboard=True`` without the tensorboard package, a ``device`` torch does not know
    or this machine lacks, a text ``data`` source that cannot be read (a token tensor is checked against the
    models by :func:`distill`), and an ``output_dir`` holding an earlier run (without ``resume=True``).

    :func:`distill` calls it first; a pipeline calls it before loading the teacher. Raises the
    :class:`~compress.errors.CompressError` naming the bad input; returns nothing."""
    if not isinstance(config, DistillConfig):
        raise ConfigError(f"config should be a compress.DistillConfig, got {type(config).__name__}")
    config.validate()  # a field may have been changed since construction
    if config.tensorboard:
        _summary_writer_class()
    check_device(device)
    if data is not None and not isinstance(data, torch.Tensor):
        check_source(data)
    if config.output_dir is not None:
        check_checkpoint_dir(Path(config.output_dir), config)


# ----------------------------------------------------------------------------------------------- set-up


@dataclass
class _Pair:
    """What the checks of the two models found out (set-up, step 1): their layouts, the shared vocabulary size,
    the student -> teacher layer map of the hidden loss, and the two widths."""

    s_adapter: DecoderAdapter
    t_adapter: DecoderAdapter
    vocab: int
    layer_map: dict[int, int]
    student_width: int
    teacher_width: int


def _check_pair(
    student: nn.Module,
    teacher: nn.Module,
    config: DistillConfig,
    *,
    tokenizer,
    skip_tokens: int,
    kept_layers,
    kept_hidden,
) -> _Pair:
    """The two models and everything checked against them, before any work: modules, materialized, finite,
    distinct; plain logits; one vocabulary (and ``top_k`` within it); the tokenizer; ``skip_tokens``; the layer
    map; ``kept_hidden`` against the widths."""
    _check_models(student, teacher)
    s_adapter, t_adapter = layout_for(student), layout_for(teacher)
    check_plain_logits(student, s_adapter)
    check_plain_logits(teacher, t_adapter)
    s_vocab = cast(torch.Tensor, student.get_submodule(s_adapter.lm_head).weight).shape[0]
    t_vocab = cast(torch.Tensor, teacher.get_submodule(t_adapter.lm_head).weight).shape[0]
    if s_vocab != t_vocab:
        raise DataError(
            f"student vocabulary ({s_vocab}) and teacher vocabulary ({t_vocab}) differ: logit "
            "distillation needs the same tokenizer for both"
        )
    if config.top_k is not None and config.top_k > t_vocab:
        raise ConfigError(
            f"DistillConfig.top_k={config.top_k} is larger than the vocabulary ({t_vocab} tokens): "
            f"use at most {t_vocab}, or None for every logit"
        )
    if tokenizer is not None:
        check_tokenizer_matches(student, tokenizer)
    if isinstance(skip_tokens, bool) or not isinstance(skip_tokens, int) or skip_tokens < 0:
        raise ConfigError(f"skip_tokens should be a non-negative integer, got {skip_tokens!r}")
    n_s = len(s_adapter.decoder_layers(student))
    n_t = len(t_adapter.decoder_layers(teacher))
    layer_map = _resolve_layer_map(config, n_s, n_t, kept_layers)
    teacher_width = t_adapter.shape_config(teacher.config).hidden_size
    student_width = s_adapter.shape_config(student.config).hidden_size
    if kept_hidden is not None:
        kept = list(kept_hidden) if isinstance(kept_hidden, (list, tuple, range)) else None
        if (
            kept is None
            or any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < teacher_width for c in kept)
            or len(set(kept)) != len(kept)
            or len(kept) != student_width
        ):
            raise ConfigError(
                f"kept_hidden should list, for each of the student's {student_width} hidden channels, "
                f"the distinct teacher channel (0 to {teacher_width - 1}) it was kept from; got "
                f"{kept_hidden!r}"
            )
    return _Pair(s_adapter, t_adapter, s_vocab, layer_map, student_width, teacher_width)


@dataclass
class _Run:
    """Where and how the run trains, decided before any model is touched (set-up, step 2): this process's rank
    and the world, the device and precision, the memory plan and the engine it picked, the schedule, the output
    folder and the checkpoint to resume, the data, the teacher cache."""

    rank: int
    world: int
    device: torch.device
    use_bf16: bool
    plan: MemoryPlan
    mode: str
    shard_teacher: bool
    total: int
    schedule: dict
    out_dir: Path | None
    resumable: tuple[Path, dict] | None
    loader: WindowLoader
    cache: TeacherCache | None
    engine: Engine
    #: Tokens of one optimizer step over all processes.
    tokens_per_step: int

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def _plan_run(
    student: nn.Module,
    teacher: nn.Module,
    data,
    config: DistillConfig,
    pair: _Pair,
    *,
    tokenizer,
    skip_tokens: int,
    device: str | torch.device | None,
) -> _Run:
    """Ranks, device, precision, memory plan and engine (refused here when the run cannot fit), the schedule,
    the checkpoint to resume (its settings checked now), the data windows and the teacher cache; then the
    process-wide switches (TF32 on CUDA) and the seeds."""
    rank, world = distributed.init()
    device = distributed.resolve_device(device)
    cuda = device.type == "cuda"
    use_bf16 = config.dtype == "bf16" or (config.dtype == "auto" and cuda)
    plan = plan_memory(student, teacher, config, world=world, device=device, use_bf16=use_bf16)
    mode, shard_teacher = _pick_engine(config, world, plan)
    plan.check(mode, shard_teacher)  # refuses, with what would fit, before any work
    if mode == "fsdp" and config.on_policy_fraction > 0:
        raise ConfigError(
            f"DistillConfig.on_policy_fraction={config.on_policy_fraction} samples from the student, "
            "which FSDP keeps sharded: on-policy distillation runs in one process or under DDP "
            "(parallel='ddp') only"
        )
    total = config.steps_for(world)
    warmup, schedule_note = config.warmup_for(total)
    schedule = {"total_steps": total, "warmup_steps": warmup, "decay": f"cosine to {config.min_lr_ratio} x lr"}
    if schedule_note:
        schedule["adjusted"] = schedule_note
        if rank == 0:
            warn(schedule_note)
    out_dir = Path(config.output_dir) if config.output_dir else None
    resumable = None
    if out_dir is not None and config.resume:  # state.json, settings and budget now; the tensors once placed
        resumable = find_resumable(out_dir, config=config.to_dict(), world=world, mode=mode, total_steps=total)
    loader = WindowLoader.from_source(
        data, tokenizer, config, skip_tokens=skip_tokens, rank=rank, world=world, device=device, vocab_size=pair.vocab
    )
    cache = None
    if config.teacher_cache is not None:  # built for these very windows and this teacher, or refused now
        cache = TeacherCache.open(config.teacher_cache, windows=loader.windows, teacher=teacher)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    engine = Engine(mode, device, world, use_bf16, pair.s_adapter, config.gradient_checkpointing, config.compile)
    return _Run(
        rank=rank,
        world=world,
        device=device,
        use_bf16=use_bf16,
        plan=plan,
        mode=mode,
        shard_teacher=shard_teacher,
        total=total,
        schedule=schedule,
        out_dir=out_dir,
        resumable=resumable,
        loader=loader,
        cache=cache,
        engine=engine,
        tokens_per_step=config.tokens_per_step * world,
    )


class _HandBack:
    """The caller's two models as they came in, and what a run gives back.

    :meth:`take` detaches their gradients for the run and keeps host copies of the weights trained in place (the
    student, unless FSDP trains a replica; the teacher under teacher correction), when the caller allows them.
    :meth:`give_back` runs on success and on every error: the forward hooks the run added come off; devices,
    dtypes, ``requires_grad`` flags, gradients and train/eval modes come back as they came in; after an error
    the engine's changes are undone and the weights come back too (from the host copies), while on success the
    student keeps its trained weights (in eval mode) and a corrected teacher its corrections.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, engine: Engine):
        self.student, self.engine = student, engine
        self.student_state, self.teacher_state = ModelBackup(student), ModelBackup(teacher)
        self.hooks: list[_LayerOutputs] = []

    def take(self, *, student_weights: bool, teacher_weights: bool) -> None:
        self.student_state.detach_grads()
        self.teacher_state.detach_grads()
        if student_weights:
            self.student_state.save_weights()
        if teacher_weights:
            self.teacher_state.save_weights()

    def give_back(self, succeeded: bool) -> None:
        for hooks in self.hooks:
            hooks.remove()
        if not succeeded:
            self.engine.undo_student_changes()
        self.student_state.restore(error=not succeeded)
        self.teacher_state.restore(error=not succeeded)
        if succeeded:
            self.student.eval()


@dataclass
class _Training:
    """The run's state from the models' placement to the last step (set-up, step 3, and the loop)."""

    t_trunk: TeacherTrunk
    wrapped: nn.Module  # what the loop calls: the DistillModule, or its DDP/FSDP wrapper
    module: DistillModule
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    captured_teacher: _LayerOutputs | None
    needs_teacher: bool
    prompt_len: int
    correction: dict
    start_step: int = 0
    history: list[dict] = field(default_factory=list)
    resumed: int | None = None
    #: On-policy batches so far (count, sampled tokens, seconds spent sampling); empty without on-policy.
    on_policy: dict = field(default_factory=dict)
    last_loss: float = float("nan")
    elapsed: float = 0.0
    state_bytes: int = 0
    peak_mib: float | None = None


def _place_teacher(
    teacher: nn.Module, config: DistillConfig, run: _Run, hand_back: _HandBack
) -> tuple[TeacherTrunk, dict]:
    """The teacher on its device (or sharded), corrected first when asked (then copied back into the caller's
    teacher), and frozen for this run; returns its trunk and the correction's report."""
    corrected = bool(config.teacher_correction_steps)
    t_trunk = run.engine.place_teacher(teacher, run.shard_teacher, trained=corrected)
    t_model = t_trunk.model
    correction = {}
    if corrected:
        for p in t_model.parameters():
            p.requires_grad_(True)
        trainer = run.engine.teacher_trainer(t_trunk)
        correction = _teacher_correction(trainer, list(t_model.parameters()), run.loader, config, run.engine)
        if t_model is not teacher:
            gather_teacher(t_trunk, teacher)
        run.loader.reset()
    # Frozen for this run only (flags restored at the end: a model copied from the teacher later must not
    # inherit frozen parameters).
    for p in t_model.parameters():
        p.requires_grad_(False)
    run.engine.freeze_teacher(t_trunk, hand_back.teacher_state, corrected=corrected)
    return t_trunk, correction


def _start_training(
    student: nn.Module,
    teacher: nn.Module,
    config: DistillConfig,
    pair: _Pair,
    run: _Run,
    hand_back: _HandBack,
    kept_hidden: list[int] | None,
) -> _Training:
    """Set-up, step 3: place (and correct, and freeze) the teacher, place the student with every parameter
    trained, build the optimizer and the schedule, hook the layers the hidden loss reads, and resume from the
    checkpoint :func:`_plan_run` found (the output folder is made first)."""
    t_trunk, correction = _place_teacher(teacher, config, run, hand_back)
    for p in student.parameters():
        p.requires_grad_(True)
    t_transform = pair.t_adapter.logit_transform(pair.t_adapter.shape_config(teacher.config))
    layer_map = pair.layer_map if config.hidden_loss else {}
    wrapped = run.engine.place_student(
        student,
        lambda s: DistillModule(s, pair.s_adapter, config, layer_map, pair.teacher_width, kept_hidden, t_transform),
    )
    module = run.engine.module
    assert module is not None  # set by place_student
    if module._captured is not None:
        hand_back.hooks.append(module._captured)
    params = [p for p in module.parameters() if p.requires_grad]
    # Fused AdamW on CUDA and CPU alike: one kernel per parameter group per step. (On CPU the peak memory of
    # benchmarks/parallel_cpu.py was the same as with the multi-tensor version.)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95), fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, run.total))
    captured_teacher = None
    if config.hidden_loss:
        layers = pair.t_adapter.decoder_layers(t_trunk.model)
        captured_teacher = _LayerOutputs(layers, sorted(set(pair.layer_map.values())))
        hand_back.hooks.append(captured_teacher)
    tr = _Training(
        t_trunk,
        wrapped,
        module,
        params,
        optimizer,
        scheduler,
        captured_teacher,
        # Plain LM fine-tuning (logit_weight 0, no hidden loss) never runs the teacher, nor does a cached one.
        needs_teacher=(config.logit_weight > 0 or config.hidden_loss is not None) and run.cache is None,
        prompt_len=config.on_policy_prompt(),
        correction=correction,
        on_policy={"batches": 0, "sampled_tokens": 0, "sampling_seconds": 0.0} if config.on_policy_fraction > 0 else {},
    )
    if run.out_dir is not None and run.rank == 0:
        run.out_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    if run.resumable is not None:
        state = restore_checkpoint(*run.resumable, run.engine, optimizer, scheduler)
        tr.start_step, tr.history, tr.resumed = state["step"], state["history"], state["step"]
        run.loader.load_state(state["data"])
    return tr


# ----------------------------------------------------------------------------------------------- the loop


def _micro_batch(config: DistillConfig, run: _Run, tr: _Training, step: int, micro: int) -> torch.Tensor:
    """One micro-batch forward: the next windows (their cached teacher, or the student's own continuations for
    an on-policy batch), the teacher's forward when the loss needs it, then the student and the loss. Returns
    ``[loss, kd, ce, hidden]`` (see :meth:`DistillModule.forward`)."""
    batch = run.loader.next_batch()
    loss_from = 1
    if run.cache is not None:
        tr.module.cached_targets = run.cache.lookup(run.loader.last_indices, run.device)
    if _on_policy_now(config, step, micro):  # the student writes the rest of each window
        t_sample = time.perf_counter()
        gen = torch.Generator(run.device).manual_seed(derived_seed("sample", config.seed, run.rank, step, micro))
        with run.engine.autocast():
            batch = sample_continuations(
                tr.module.student,
                batch[:, : tr.prompt_len],
                batch.shape[1] - tr.prompt_len,
                config.on_policy_temperature,
                gen,
            )
        loss_from = tr.prompt_len
        tr.on_policy["batches"] += 1
        tr.on_policy["sampled_tokens"] += batch.shape[0] * (batch.shape[1] - tr.prompt_len) * run.world
        tr.on_policy["sampling_seconds"] += time.perf_counter() - t_sample
    t_final = t_head = None
    if tr.needs_teacher:
        with torch.no_grad(), run.engine.autocast():
            t_final = tr.t_trunk(batch)
        t_head = tr.t_trunk.head_weight()
    t_layers_out = tr.captured_teacher.pop() if tr.captured_teacher is not None else {}
    with run.engine.no_sync(micro == config.grad_accum - 1), run.engine.autocast():
        out = tr.wrapped(batch, t_final, t_layers_out, t_head, loss_from)
    tr.module.cached_targets = None
    return out


def _train_step(config: DistillConfig, run: _Run, tr: _Training, step: int, guard: _Guard) -> None:
    """One optimizer step: ``grad_accum`` micro-batches, clipping (``inf``: the norm only), the guard's
    device-side bookkeeping, AdamW and the schedule."""
    step_metrics = torch.zeros(4, device=run.device)
    for micro in range(config.grad_accum):
        out = _micro_batch(config, run, tr, step, micro)
        (out[0] / config.grad_accum).backward()
        step_metrics += out.detach().float() / config.grad_accum
    clip = config.max_grad_norm if config.max_grad_norm is not None else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(tr.params, clip)
    guard.update(step_metrics, _local(grad_norm))
    tr.optimizer.step()
    tr.scheduler.step()
    tr.optimizer.zero_grad(set_to_none=True)


def _log_record(run: _Run, tr: _Training, guard: _Guard, done: int, t0: float) -> tuple[dict, float]:
    """The metrics record of step ``done`` (means since the last one, over every rank), kept in the history, and
    the speed so far in tokens per second."""
    loss, kd, ce, hid = guard.pop_means()
    tr.last_loss = loss
    elapsed = time.perf_counter() - t0
    tps = (done - tr.start_step) * run.tokens_per_step / max(elapsed, 1e-9)
    record = {
        "step": done,
        "loss": round(loss, 6),
        "kd": round(kd, 6),
        "ce": round(ce, 6),
        "hidden": round(hid, 6),
        "lr": tr.scheduler.get_last_lr()[0],
        "tokens": done * run.tokens_per_step,
        "tokens_per_s": round(tps, 1),
        "elapsed_s": round(elapsed, 3),
    }
    tr.history.append(record)
    return record, tps


def _train(config: DistillConfig, run: _Run, tr: _Training) -> None:
    """The loop, from ``tr.start_step`` to the last step. It reads from the device only on logging and
    checkpoint steps, where every rank first agrees on whether any saw a non-finite loss or gradient (all stop
    together, before a bad checkpoint is written). Rank 0 writes ``metrics.jsonl`` and TensorBoard; every rank
    takes part in a checkpoint. Sets the run's speed, training-state size and peak memory in ``tr``."""
    metrics = None
    if run.out_dir is not None and run.rank == 0:
        metrics = _open_metrics(run.out_dir / "metrics.jsonl", tr.resumed)
    board = None
    if config.tensorboard and run.rank == 0:
        assert run.out_dir is not None  # validate(): tensorboard needs output_dir
        board = _summary_writer_class()(log_dir=str(run.out_dir / "tensorboard"))
    if run.cuda:
        torch.cuda.reset_peak_memory_stats(run.device)
    bar = progress_bar(
        range(tr.start_step, run.total),
        initial=tr.start_step,
        total=run.total,
        desc="distilling",
        unit="step",
        show=config.progress,
    )
    guard = _Guard(run.device, tr.start_step)
    t0 = time.perf_counter()
    tr.last_loss = tr.history[-1]["loss"] if tr.history else float("nan")
    try:
        for step in bar:
            _train_step(config, run, tr, step, guard)
            done = step + 1
            log_now = done % config.log_every == 0 or done == run.total
            save_now = run.out_dir is not None and config.checkpoint_every and done % config.checkpoint_every == 0
            if not (log_now or save_now):
                continue
            bad = guard.check()  # the same answer on every rank: all stop together
            if bad:
                where = latest_checkpoint(run.out_dir) if run.out_dir is not None else None
                raise DistillError(
                    f"the loss or the gradients became nan/inf at step {bad}; stopping (every rank). The last "
                    f"good checkpoint is {where or 'none (no checkpoint was written)'}. The student was put "
                    f"back as it came in. Try a lower lr (now {config.lr}), dtype='fp32', or check the data."
                )
            if log_now:
                record, tps = _log_record(run, tr, guard, done, t0)
                if metrics:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                if board:
                    for key, value in record.items():
                        if key != "step":
                            board.add_scalar(f"distill/{key}", value, done)
                bar.set_postfix(loss=f"{tr.last_loss:.4f}", tok_s=f"{tps:,.0f}")
            if save_now:
                assert run.out_dir is not None  # save_now requires it
                state = {"step": done, "history": tr.history, "data": run.loader.state(), "config": config.to_dict()}
                save_checkpoint(run.out_dir, run.engine, tr.optimizer, tr.scheduler, state)
    finally:
        bar.close()
        if metrics:
            metrics.close()
        if board:
            board.close()
    if run.cuda:
        torch.cuda.synchronize(run.device)
    tr.elapsed = time.perf_counter() - t0
    tr.state_bytes = _training_state_bytes(tr.params, tr.optimizer)
    tr.peak_mib = round(torch.cuda.max_memory_allocated(run.device) / 2**20, 1) if run.cuda else None


# ----------------------------------------------------------------------------------------------- distill


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data,
    config: DistillConfig,
    *,
    tokenizer=None,
    skip_tokens: int = 0,
    kept_layers: list[int] | None = None,
    kept_hidden: list[int] | None = None,
    device: str | torch.device | None = None,
    keep_weights_for_errors: bool = True,
) -> DistillReport:
    """Train ``student`` (in place) to imitate ``teacher`` on ``data``; returns a :class:`DistillReport`.

    ``data``: text (path, ``.jsonl`` with a ``text`` field, documents, a ``datasets.Dataset``; needs
    ``tokenizer``) or token windows ``[N, seq_len]``. ``skip_tokens`` skips the start of the text (the part used
    for calibration). ``kept_layers``/``kept_hidden`` (from pruning) set the default layer map and initialize the
    hidden-state projection. The teacher is never trained unless ``teacher_correction_steps`` > 0.

    Bad input is refused before any work (:class:`~compress.errors.CompressError` naming it): config values,
    models with NaN/inf weights or sharing weights, token ids outside the vocabulary, layer maps outside the
    models, an ``output_dir`` holding an earlier run (without ``resume=True``), a checkpoint of another run or
    another student. On any error — refused input or a failure mid-run (a NaN stop, a failed checkpoint write,
    an interrupt) — the caller's student and teacher come back as they were: weights, dtypes, devices,
    train/eval modes, ``requires_grad`` flags and gradients (a host copy of the student's weights is kept for
    this while it trains in place, and of the teacher when teacher correction trains it).
    ``keep_weights_for_errors=False`` skips those host copies (at 8B they cost tens of GB of host memory on
    every rank): after a failure mid-run the weights are then as training left them, everything else is
    restored. :func:`compress.compress` passes False (its teacher is its own copy, its student is being
    replaced by the run anyway). On success the student holds the trained weights, in eval mode, with its
    own dtypes, device and flags.

    Under ``torchrun`` every rank calls this with the same arguments: the engine (DDP or FSDP, see
    :class:`DistillConfig`) trains data-parallel on disjoint slices of every global batch; rank 0 writes the
    metrics and the checkpoints, and every rank returns the same report and the same trained student.

    The steps: :func:`check` (what needs no model), :func:`_check_pair` (the models), :func:`_plan_run` (device,
    engine, schedule, data, resume), :func:`_start_training` (placement, optimizer, checkpoint), :func:`_train`
    (the loop), :meth:`_HandBack.give_back` (the caller's models, on success and on every error), the report.
    """
    check(config, data=data, device=device)
    pair = _check_pair(
        student,
        teacher,
        config,
        tokenizer=tokenizer,
        skip_tokens=skip_tokens,
        kept_layers=kept_layers,
        kept_hidden=kept_hidden,
    )
    run = _plan_run(student, teacher, data, config, pair, tokenizer=tokenizer, skip_tokens=skip_tokens, device=device)
    # The caller's models as they came in: everything below is undone on any error (and all but the trained
    # student weights, or the corrected teacher, on success).
    hand_back = _HandBack(student, teacher, run.engine)
    succeeded = False
    try:
        hand_back.take(
            student_weights=run.mode != "fsdp" and keep_weights_for_errors,  # trained in place: put back on failure
            teacher_weights=bool(config.teacher_correction_steps) and keep_weights_for_errors,  # corrected in place
        )
        tr = _start_training(student, teacher, config, pair, run, hand_back, kept_hidden)
        _train(config, run, tr)
        run.engine.finish_student()
        succeeded = True
    finally:
        hand_back.give_back(succeeded)
    return _report(config, pair, run, tr)


def _report(config: DistillConfig, pair: _Pair, run: _Run, tr: _Training) -> DistillReport:
    """What :func:`distill` hands back besides the student: this call's budget, speed and losses, and where the
    run stands."""
    steps_run = run.total - tr.start_step
    tokens = steps_run * run.tokens_per_step
    projection = None
    if "hidden" in tr.module.projections:
        projection = f"learned linear {pair.student_width} -> {pair.teacher_width}"
    objective: dict = {"logit_loss": config.logit_loss}
    if tr.on_policy:
        sampling = round(tr.on_policy["sampling_seconds"], 2)
        objective["on_policy"] = {**tr.on_policy, "sampling_seconds": sampling, "prompt_tokens": tr.prompt_len}
    if run.cache is not None:
        objective["teacher_cache"] = run.cache.describe()
    return DistillReport(
        steps=steps_run,
        tokens=tokens,
        seconds=round(tr.elapsed, 2),
        tokens_per_second=round(tokens / max(tr.elapsed, 1e-9), 1) if steps_run else 0.0,
        final_loss=tr.last_loss,
        losses=tr.history,
        layer_map={str(k): v for k, v in pair.layer_map.items()} if config.hidden_loss else {},
        projection=projection,
        resumed_from_step=tr.resumed,
        peak_memory_mib=tr.peak_mib,
        data=run.loader.describe(),
        config=config.to_dict(),
        teacher_correction=tr.correction,
        engine={
            "mode": run.mode,
            "world_size": run.world,
            "shard_teacher": run.shard_teacher,
            "device": str(run.device),
            "precision": "bf16 compute, fp32 master weights" if run.use_bf16 else "fp32",
            "training_state_mib": round(tr.state_bytes / 2**20, 1),
        },
        memory_plan=run.plan.to_dict(run.mode, run.shard_teacher),
        total_steps=run.total,
        total_tokens=run.total * run.tokens_per_step,
        schedule=run.schedule,
        objective=objective,
    )


def _training_state_bytes(params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> int:
    """Bytes this process holds of the student's training state: its (shard of the) weights, as many bytes of
    gradients, and the optimizer's state tensors — measured on the tensors themselves."""

    def size(t: torch.Tensor) -> int:
        t = _local(t)
        return t.numel() * t.element_size()

    total = sum(2 * size(p) for p in params)
    for per_param in optimizer.state.values():
        total += sum(size(v) for v in per_param.values() if torch.is_tensor(v) and v.dim() > 0)
    return total


def _local(t: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (FSDP's gradient norm) as a plain tensor; plain tensors pass through."""
    return t.to_local() if hasattr(t, "to_local") else t


def _open_metrics(path: Path, resumed_from: int | None):
    """``metrics.jsonl`` for this run: a new file, or on resume the old one without the records logged after
    the checkpoint (those steps are trained again and logged again)."""
    if resumed_from is None:
        return open(path, "w", encoding="utf-8")
    kept = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= resumed_from:
                    kept.append(line)
            except ValueError:
                continue  # a line cut short by the kill
    fh = open(path, "w", encoding="utf-8")  # noqa: SIM115 - the caller writes to it and closes it
    fh.writelines(line + "\n" for line in kept)
    fh.flush()
    return fh
