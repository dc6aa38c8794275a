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
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import torch
from torch import nn

from .. import distributed
from ..data import derived_seed
from ..errors import CheckpointError, CompressError, ConfigError, DataError, OutputExistsError
from ..models import DecoderAdapter, check_plain_logits, layout_for
from ..progress import bar as progress_bar
from ..validate import check_finite_weights, check_tokenizer_matches
from .checkpoint import earlier_run_files, find_resumable, latest_checkpoint, restore_checkpoint, save_checkpoint
from .config import DistillConfig
from .data import WindowLoader
from .losses import LogitTransform, cached_logit_loss, chunked_logit_loss, hidden_state_loss
from .memory import MemoryPlan, plan_memory
from .parallel import Engine, ModelBackup, gather_teacher


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


def _check_output_dir(out_dir: Path, config: DistillConfig) -> None:
    """``output_dir`` must be a folder (or not exist yet), and a new run must not overwrite or mix with the files
    of an earlier one."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(
            f"DistillConfig.output_dir={str(out_dir)!r} is a file, not a folder: choose a folder for "
            "the metrics and checkpoints"
        )
    if not config.resume:
        earlier = earlier_run_files(out_dir)
        if earlier:
            kind = CheckpointError if any(e.startswith("checkpoint-") for e in earlier) else OutputExistsError
            raise kind(
                f"DistillConfig.output_dir={str(out_dir)!r} holds an earlier run's {', '.join(earlier)}; a new "
                "run would overwrite them. Pass resume=True to continue that run, or choose another "
                "output_dir (or delete that one): nothing is overwritten without being asked"
            )


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
    """
    if not isinstance(config, DistillConfig):
        raise ConfigError(f"config should be a compress.DistillConfig, got {type(config).__name__}")
    config.validate()  # a field may have been changed since construction
    writer_class = _summary_writer_class() if config.tensorboard else None  # fail before any work
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
            warnings.warn(schedule_note, stacklevel=2)

    out_dir = Path(config.output_dir) if config.output_dir else None
    resumable = None
    if out_dir is not None:
        _check_output_dir(out_dir, config)
        if config.resume:  # state.json, settings and budget now; the tensors once the student is in place
            resumable = find_resumable(out_dir, config=config.to_dict(), world=world, mode=mode, total_steps=total)
    loader = WindowLoader.from_source(
        data, tokenizer, config, skip_tokens=skip_tokens, rank=rank, world=world, device=device, vocab_size=s_vocab
    )
    cache = None
    if config.teacher_cache is not None:  # built for these very windows and this teacher, or refused now
        from .teacher_cache import TeacherCache

        cache = TeacherCache.open(config.teacher_cache, windows=loader.windows, teacher=teacher)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    engine = Engine(mode, device, world, use_bf16, s_adapter, config.gradient_checkpointing, config.compile)
    # The caller's models as they came in: everything below is undone on any error (and all but the trained
    # student weights, or the corrected teacher, on success).
    student_state, teacher_state = ModelBackup(student), ModelBackup(teacher)
    hooks: list[_LayerOutputs] = []
    succeeded = False
    try:
        student_state.detach_grads()
        teacher_state.detach_grads()
        if mode != "fsdp" and keep_weights_for_errors:  # trained in place: its weights, to put back on failure
            student_state.save_weights()
        if config.teacher_correction_steps and keep_weights_for_errors:
            teacher_state.save_weights()  # the teacher is trained in place first
        t_trunk = engine.place_teacher(teacher, shard_teacher, trained=bool(config.teacher_correction_steps))
        t_model = t_trunk.model
        correction = {}
        if config.teacher_correction_steps:
            for p in t_model.parameters():
                p.requires_grad_(True)
            correction = _teacher_correction(
                engine.teacher_trainer(t_trunk), list(t_model.parameters()), loader, config, engine
            )
            if t_model is not teacher:
                gather_teacher(t_trunk, teacher)
            loader.reset()
        # Freeze the teacher for this run only (flags restored at the end: a model copied from the teacher later
        # must not inherit frozen parameters), and train every parameter of the student.
        for p in t_model.parameters():
            p.requires_grad_(False)
        engine.freeze_teacher(t_trunk, teacher_state, corrected=bool(config.teacher_correction_steps))
        for p in student.parameters():
            p.requires_grad_(True)
        wrapped = engine.place_student(
            student,
            lambda s: DistillModule(
                s,
                s_adapter,
                config,
                layer_map if config.hidden_loss else {},
                teacher_width,
                kept_hidden,
                t_adapter.logit_transform(t_adapter.shape_config(teacher.config)),
            ),
        )
        module = engine.module
        assert module is not None  # set by place_student
        if module._captured is not None:
            hooks.append(module._captured)
        params = [p for p in module.parameters() if p.requires_grad]
        # Fused AdamW on CUDA and CPU alike: one kernel per parameter group per step. (On CPU the peak memory of
        # benchmarks/parallel_cpu.py was the same as with the multi-tensor version.)
        optimizer = torch.optim.AdamW(
            params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95), fused=True
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, total))

        captured_teacher = (
            _LayerOutputs(t_adapter.decoder_layers(t_model), sorted(set(layer_map.values())))
            if config.hidden_loss
            else None
        )
        if captured_teacher is not None:
            hooks.append(captured_teacher)
        # Plain LM fine-tuning (logit_weight 0, no hidden loss) never runs the teacher, nor does a cached one.
        needs_teacher = (config.logit_weight > 0 or config.hidden_loss is not None) and cache is None
        prompt_len = config.on_policy_prompt()
        on_policy = (
            {"batches": 0, "sampled_tokens": 0, "sampling_seconds": 0.0} if config.on_policy_fraction > 0 else {}
        )
        start_step, history, resumed = 0, [], None
        if out_dir is not None and rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        if resumable is not None:
            state = restore_checkpoint(*resumable, engine, optimizer, scheduler)
            start_step, history, resumed = state["step"], state["history"], state["step"]
            loader.load_state(state["data"])
        metrics = None
        if out_dir is not None and rank == 0:
            metrics = _open_metrics(out_dir / "metrics.jsonl", resumed)
        board = None
        if config.tensorboard and rank == 0:
            assert writer_class is not None and out_dir is not None  # both set with tensorboard (and validate())
            board = writer_class(log_dir=str(out_dir / "tensorboard"))
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        tokens_per_step = config.tokens_per_step * world
        clip = config.max_grad_norm if config.max_grad_norm is not None else float("inf")  # inf: norm only
        bar = progress_bar(
            range(start_step, total),
            initial=start_step,
            total=total,
            desc="distilling",
            unit="step",
            show=config.progress,
        )
        guard = _Guard(device, start_step)
        t0, last = time.perf_counter(), history[-1]["loss"] if history else float("nan")
        try:
            for step in bar:
                step_metrics = torch.zeros(4, device=device)
                for micro in range(config.grad_accum):
                    batch = loader.next_batch()
                    loss_from = 1
                    if cache is not None:
                        module.cached_targets = cache.lookup(loader.last_indices, device)
                    if _on_policy_now(config, step, micro):  # the student writes the rest of each window
                        t_sample = time.perf_counter()
                        gen = torch.Generator(device).manual_seed(
                            derived_seed("sample", config.seed, rank, step, micro)
                        )
                        with engine.autocast():
                            batch = sample_continuations(
                                module.student,
                                batch[:, :prompt_len],
                                batch.shape[1] - prompt_len,
                                config.on_policy_temperature,
                                gen,
                            )
                        loss_from = prompt_len
                        on_policy["batches"] += 1
                        on_policy["sampled_tokens"] += batch.shape[0] * (batch.shape[1] - prompt_len) * world
                        on_policy["sampling_seconds"] += time.perf_counter() - t_sample
                    t_final = t_head = None
                    if needs_teacher:
                        with torch.no_grad(), engine.autocast():
                            t_final = t_trunk(batch)
                        t_head = t_trunk.head_weight()
                    t_layers_out = captured_teacher.pop() if captured_teacher else {}
                    with engine.no_sync(micro == config.grad_accum - 1), engine.autocast():
                        out = wrapped(batch, t_final, t_layers_out, t_head, loss_from)
                    module.cached_targets = None
                    (out[0] / config.grad_accum).backward()
                    step_metrics += out.detach().float() / config.grad_accum
                grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
                guard.update(step_metrics, _local(grad_norm))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                log_now = done % config.log_every == 0 or done == total
                save_now = out_dir is not None and config.checkpoint_every and done % config.checkpoint_every == 0
                if not (log_now or save_now):
                    continue
                bad = guard.check()  # the same answer on every rank: all stop together
                if bad:
                    where = latest_checkpoint(out_dir) if out_dir is not None else None
                    raise DistillError(
                        f"the loss or the gradients became nan/inf at step {bad}; stopping (every rank). The last "
                        f"good checkpoint is {where or 'none (no checkpoint was written)'}. The student was put "
                        f"back as it came in. Try a lower lr (now {config.lr}), dtype='fp32', or check the data."
                    )
                if log_now:
                    loss, kd, ce, hid = guard.pop_means()
                    last = loss
                    elapsed = time.perf_counter() - t0
                    tps = (done - start_step) * tokens_per_step / max(elapsed, 1e-9)
                    record = {
                        "step": done,
                        "loss": round(loss, 6),
                        "kd": round(kd, 6),
                        "ce": round(ce, 6),
                        "hidden": round(hid, 6),
                        "lr": scheduler.get_last_lr()[0],
                        "tokens": done * tokens_per_step,
                        "tokens_per_s": round(tps, 1),
                        "elapsed_s": round(elapsed, 3),
                    }
                    history.append(record)
                    if metrics:
                        metrics.write(json.dumps(record) + "\n")
                        metrics.flush()
                    if board:
                        for key, value in record.items():
                            if key != "step":
                                board.add_scalar(f"distill/{key}", value, done)
                    bar.set_postfix(loss=f"{last:.4f}", tok_s=f"{tps:,.0f}")
                if save_now:
                    assert out_dir is not None  # save_now requires it
                    save_checkpoint(
                        out_dir,
                        engine,
                        optimizer,
                        scheduler,
                        {"step": done, "history": history, "data": loader.state(), "config": config.to_dict()},
                    )
        finally:
            bar.close()
            if metrics:
                metrics.close()
            if board:
                board.close()
        if cuda:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        state_bytes = _training_state_bytes(params, optimizer)
        peak = round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if cuda else None
        engine.finish_student()
        succeeded = True
    finally:
        for hooks_in_use in hooks:
            hooks_in_use.remove()
        if not succeeded:
            engine.undo_student_changes()
        # Devices, dtypes, flags, gradients and modes as they came in; after an error the weights too (the
        # student's trained weights and a corrected teacher are kept only on success).
        student_state.restore(error=not succeeded)
        teacher_state.restore(error=not succeeded)
        if succeeded:
            student.eval()
    steps_run = total - start_step
    projection = None
    if "hidden" in module.projections:
        projection = f"learned linear {student_width} -> {teacher_width}"
    return DistillReport(
        steps=steps_run,
        tokens=steps_run * tokens_per_step,
        seconds=round(elapsed, 2),
        tokens_per_second=round(steps_run * tokens_per_step / max(elapsed, 1e-9), 1) if steps_run else 0.0,
        final_loss=last,
        losses=history,
        layer_map={str(k): v for k, v in layer_map.items()} if config.hidden_loss else {},
        projection=projection,
        resumed_from_step=resumed,
        peak_memory_mib=peak,
        data=loader.describe(),
        config=config.to_dict(),
        teacher_correction=correction,
        engine={
            "mode": mode,
            "world_size": world,
            "shard_teacher": shard_teacher,
            "device": str(device),
            "precision": "bf16 compute, fp32 master weights" if use_bf16 else "fp32",
            "training_state_mib": round(state_bytes / 2**20, 1),
        },
        memory_plan=plan.to_dict(mode, shard_teacher),
        total_steps=total,
        total_tokens=total * tokens_per_step,
        schedule=schedule,
        objective={
            "logit_loss": config.logit_loss,
            **(
                {
                    "on_policy": {
                        **on_policy,
                        "sampling_seconds": round(on_policy["sampling_seconds"], 2),
                        "prompt_tokens": prompt_len,
                    }
                }
                if on_policy
                else {}
            ),
            **({"teacher_cache": cache.describe()} if cache is not None else {}),
        },
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
