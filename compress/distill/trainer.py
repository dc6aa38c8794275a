"""The distillation loop: teacher forward (no grad), student forward, fused chunked losses, AdamW.

One code path for CPU and CUDA. On CUDA it runs bf16 autocast with the teacher cast to bf16, TF32 matmuls,
fused AdamW, optional ``torch.compile`` and gradient checkpointing, and pinned, non-blocking host-to-device
copies; on CPU the same code runs in fp32 (which is what the tests cover). Under ``torchrun`` it trains with
DistributedDataParallel (NCCL on GPUs, gloo on CPU); each rank takes its slice of every global batch.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..calibrate import check_tokenizer_matches
from ..errors import CompressError, ConfigError, DataError
from ..models import DecoderAdapter, adapter_for
from .checkpoint import load_checkpoint, save_checkpoint
from .config import DistillConfig
from .data import WindowLoader
from .losses import chunked_logit_loss, hidden_state_loss


class DistillError(CompressError, RuntimeError):
    """Training could not go on (e.g. the loss became NaN or infinite)."""


@dataclass
class DistillReport:
    """What :func:`distill` did: budget, losses, speed, and which student layer learned from which teacher layer."""

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
    """Student + projections + the loss, as one module so DDP sees (and synchronizes) everything trained."""

    def __init__(self, student: nn.Module, adapter: DecoderAdapter, config: DistillConfig,
                 layer_map: dict[int, int], teacher_width: int, hidden_init: list[int] | None = None):
        super().__init__()
        self.student, self.adapter, self.config, self.layer_map = student, adapter, config, layer_map
        width = student.config.hidden_size
        self.projections = nn.ModuleDict()
        if config.hidden_loss is not None and width != teacher_width:
            proj = nn.Linear(width, teacher_width, bias=False)
            with torch.no_grad():  # start from the channel selection pruning made, when known: exact at step 0
                proj.weight.zero_()
                if hidden_init is not None and len(hidden_init) == width:
                    proj.weight[torch.tensor(hidden_init), torch.arange(width)] = 1.0
                else:
                    nn.init.orthogonal_(proj.weight)
            self.projections["hidden"] = proj.to(next(student.parameters()).device)
        self._captured = _LayerOutputs(adapter.decoder_layers(student), sorted(layer_map)) \
            if config.hidden_loss else None

    def forward(self, input_ids: torch.Tensor, teacher_final: torch.Tensor | None,
                teacher_layers: dict[int, torch.Tensor], teacher_head: torch.Tensor | None) -> dict[str, torch.Tensor]:
        cfg = self.config
        base = self.student.get_submodule(self.adapter.base)
        hidden = base(input_ids=input_ids, use_cache=False).last_hidden_state
        head = self.student.get_submodule(self.adapter.lm_head).weight
        labels = input_ids[:, 1:].reshape(-1) if cfg.alpha_ce > 0 else None
        d_s = hidden.shape[-1]
        t_flat = None if teacher_final is None else teacher_final[:, :-1].reshape(-1, teacher_final.shape[-1])
        loss, kd, ce = chunked_logit_loss(
            hidden[:, :-1].reshape(-1, d_s), head, t_flat, teacher_head, labels,
            kind=cfg.logit_loss, temperature=cfg.temperature, beta=cfg.jsd_beta, top_k=cfg.top_k,
            chunk_tokens=cfg.chunk_tokens, kd_weight=cfg.logit_weight, ce_weight=cfg.alpha_ce)
        hid = kd.new_zeros(())
        if self._captured is not None:
            student_layers = self._captured.pop()
            proj = self.projections["hidden"] if "hidden" in self.projections else nn.Identity()
            for s_idx, t_idx in self.layer_map.items():
                hid = hid + hidden_state_loss(proj(student_layers[s_idx]), teacher_layers[t_idx], cfg.hidden_loss)
            hid = hid / len(self.layer_map)
            loss = loss + cfg.hidden_weight * hid
        return {"loss": loss, "kd": kd, "ce": ce, "hidden": hid.detach()}


def _lr_lambda(config: DistillConfig, total: int):
    def fn(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine
    return fn


def _distributed() -> tuple[int, int]:
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _teacher_correction(teacher: nn.Module, loader: WindowLoader, config: DistillConfig, device, autocast) -> dict:
    """Briefly fine-tune the teacher with the LM loss on the distillation data (mutates the teacher)."""
    teacher.train()
    opt = torch.optim.AdamW(teacher.parameters(), lr=config.lr, fused=device.type == "cuda")
    losses = []
    for _ in range(config.teacher_correction_steps):
        batch = loader.next_batch().to(device, non_blocking=True)
        with autocast():
            loss = teacher(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    teacher.eval()
    return {"steps": config.teacher_correction_steps, "first_loss": losses[0], "last_loss": losses[-1]}


def _summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, or a clear error when the optional tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError("DistillConfig.tensorboard needs the tensorboard package: "
                          "pip install 'compress-llm[tensorboard]' (or pip install tensorboard)") from exc
    return SummaryWriter


def distill(student: nn.Module, teacher: nn.Module, data, config: DistillConfig, *, tokenizer=None,
            skip_tokens: int = 0, kept_layers: list[int] | None = None, kept_hidden: list[int] | None = None,
            device: str | torch.device | None = None) -> DistillReport:
    """Train ``student`` (in place) to imitate ``teacher`` on ``data``; returns a :class:`DistillReport`.

    ``data``: text (path, ``.jsonl`` with a ``text`` field, documents, a ``datasets.Dataset``; needs
    ``tokenizer``) or token windows ``[N, seq_len]``. ``skip_tokens`` skips the start of the text (the part used
    for calibration). ``kept_layers``/``kept_hidden`` (from pruning) set the default layer map and initialize the
    hidden-state projection. The teacher is never trained unless ``teacher_correction_steps`` > 0.
    """
    writer_class = _summary_writer_class() if config.tensorboard else None  # fail before any work
    s_adapter, t_adapter = adapter_for(student), adapter_for(teacher)
    s_vocab = student.get_submodule(s_adapter.lm_head).weight.shape[0]
    t_vocab = teacher.get_submodule(t_adapter.lm_head).weight.shape[0]
    if s_vocab != t_vocab:
        raise DataError(f"student vocabulary ({s_vocab}) and teacher vocabulary ({t_vocab}) differ: logit "
                        "distillation needs the same tokenizer for both")
    if tokenizer is not None:
        check_tokenizer_matches(student, tokenizer)
    rank, world = _distributed()
    device = torch.device(device or (f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    use_bf16 = config.dtype == "bf16" or (config.dtype == "auto" and cuda)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    loader = WindowLoader.from_source(data, tokenizer, config, skip_tokens=skip_tokens, rank=rank, world=world,
                                      pin_memory=cuda)
    student.to(device)
    teacher.to(device)
    if use_bf16 and cuda:
        teacher.to(torch.bfloat16)
    teacher.eval()
    correction = {}
    if config.teacher_correction_steps:
        correction = _teacher_correction(teacher, loader, config, device, autocast)
        loader.reset()
    # Freeze the teacher for this run only (flags restored at the end: a model copied from the teacher later
    # must not inherit frozen parameters), and train every parameter of the student.
    teacher_flags = [p.requires_grad for p in teacher.parameters()]
    for p in teacher.parameters():
        p.requires_grad_(False)
    for p in student.parameters():
        p.requires_grad_(True)

    n_s = len(s_adapter.decoder_layers(student))
    n_t = len(t_adapter.decoder_layers(teacher))
    layer_map = {int(k): int(v) for k, v in (config.layer_map or default_layer_map(n_s, n_t, kept_layers)).items()}
    if config.hidden_layers is not None:
        layer_map = {i: layer_map[i] for i in config.hidden_layers}
    if any(not 0 <= s < n_s or not 0 <= t < n_t for s, t in layer_map.items()):
        raise DataError(f"layer_map {layer_map} names layers outside student ({n_s}) / teacher ({n_t}) depth")
    teacher_width = teacher.config.hidden_size
    module = DistillModule(student, s_adapter, config, layer_map if config.hidden_loss else {}, teacher_width,
                           kept_hidden)
    if config.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    wrapped: nn.Module = module
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if cuda else None)
    if config.compile:
        wrapped = torch.compile(wrapped)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95),
                                  fused=cuda)
    total = config.total_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, total))

    t_layers = t_adapter.decoder_layers(teacher)
    captured_teacher = _LayerOutputs(t_layers, sorted(set(layer_map.values()))) if config.hidden_loss else None
    t_base = teacher.get_submodule(t_adapter.base)
    t_head = teacher.get_submodule(t_adapter.lm_head).weight

    # Plain LM fine-tuning (logit_weight 0, no hidden loss) never runs the teacher.
    needs_teacher = config.logit_weight > 0 or config.hidden_loss is not None
    start_step, history, resumed = 0, [], None
    out_dir = Path(config.output_dir) if config.output_dir else None
    if out_dir is not None and rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    if config.resume and out_dir is not None:
        state = load_checkpoint(out_dir, student, module.projections, optimizer, scheduler)
        if state is not None:
            start_step, history, resumed = state["step"], state["history"], state["step"]
            loader.load_state(state["data"])
    metrics = open(out_dir / "metrics.jsonl", "a", encoding="utf-8") if out_dir is not None and rank == 0 else None
    board = writer_class(log_dir=str(out_dir / "tensorboard")) if config.tensorboard and rank == 0 else None

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    tokens_per_step = config.tokens_per_step * world
    bar = tqdm(range(start_step, total), initial=start_step, total=total, desc="distilling",
               disable=not config.progress or rank != 0, leave=False)
    t0, last = time.perf_counter(), float("nan")
    try:
        for step in bar:
            sums = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "hidden": 0.0}
            for micro in range(config.grad_accum):
                batch = loader.next_batch().to(device, non_blocking=True)
                t_final = None
                if needs_teacher:
                    with torch.no_grad(), autocast():
                        t_final = t_base(input_ids=batch, use_cache=False).last_hidden_state
                t_layers_out = captured_teacher.pop() if captured_teacher else {}
                sync = nullcontext() if world == 1 or micro == config.grad_accum - 1 else wrapped.no_sync()
                with sync, autocast():
                    out = wrapped(batch, t_final, t_layers_out, t_head)
                    loss = out["loss"] / config.grad_accum
                loss.backward()
                for k in sums:
                    sums[k] += float(out[k].detach()) / config.grad_accum
            if not all(math.isfinite(v) for v in sums.values()):
                raise DistillError(
                    f"the loss became {sums['loss']} at step {step + 1}; stopping. The last good checkpoint (if "
                    f"any) is in {out_dir}. Try a lower lr (now {config.lr}), dtype='fp32', or check the data.")
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            last = sums["loss"]
            done = step + 1
            elapsed = time.perf_counter() - t0
            tps = (done - start_step) * tokens_per_step / max(elapsed, 1e-9)
            if rank == 0 and (done % config.log_every == 0 or done == total):
                record = {"step": done, **{k: round(v, 6) for k, v in sums.items()},
                          "lr": scheduler.get_last_lr()[0], "tokens": done * tokens_per_step,
                          "tokens_per_s": round(tps, 1)}
                history.append(record)
                if metrics:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                if board:
                    for key, value in record.items():
                        if key != "step":
                            board.add_scalar(f"distill/{key}", value, done)
                bar.set_postfix(loss=f"{last:.4f}", tok_s=f"{tps:,.0f}")
            if out_dir is not None and config.checkpoint_every and done % config.checkpoint_every == 0 and rank == 0:
                save_checkpoint(out_dir, student, module.projections, optimizer, scheduler,
                                {"step": done, "history": history, "data": loader.state(),
                                 "config": config.to_dict()})
    finally:
        bar.close()
        if metrics:
            metrics.close()
        if board:
            board.close()
        for hooks_in_use in (module._captured, captured_teacher):
            if hooks_in_use is not None:
                hooks_in_use.remove()
        if config.gradient_checkpointing:
            student.gradient_checkpointing_disable()
        for p, flag in zip(teacher.parameters(), teacher_flags):
            p.requires_grad_(flag)
        student.eval()
    elapsed = time.perf_counter() - t0
    steps_run = total - start_step
    return DistillReport(
        steps=total, tokens=total * tokens_per_step, seconds=round(elapsed, 2),
        tokens_per_second=round(steps_run * tokens_per_step / max(elapsed, 1e-9), 1), final_loss=last,
        losses=history, layer_map={str(k): v for k, v in layer_map.items()} if config.hidden_loss else {},
        projection="learned linear %d -> %d" % (student.config.hidden_size, teacher_width)
        if "hidden" in module.projections else None,
        resumed_from_step=resumed,
        peak_memory_mib=round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if cuda else None,
        data=loader.describe(), config=config.to_dict(), teacher_correction=correction,
    )
