"""A memory plan before any work: the peak memory one device will need, per engine, and whether it fits.

The estimate adds up what a distillation step holds at its peak on one device:

* the student's training state — fp32 weights, gradients and AdamW's two moments (16 bytes a parameter),
  replicated (one process, DDP) or divided by the world size (FSDP, plus the gathered bf16 copies of the
  layers in flight and of the root group: embedding, final norm, LM head);
* the autocast cache of bf16 weight copies (bf16 without FSDP);
* the teacher — whole (bf16 on CUDA) or sharded; with teacher correction, its fp32 training state;
* activations saved for backward — per decoder layer and token, with coefficients measured on Llama-style
  layers by counting the tensors autograd saves (``saved_tensors_hooks``): bytes = ``c_d·hidden +
  c_i·intermediate + c_q·(heads·head_dim)`` (+ a sequence term for attention masks on CPU); with gradient
  checkpointing, only each layer's input plus one layer being recomputed;
* the teacher's forward (one layer of transients, its final hidden states, the hidden states the hidden-state
  loss compares) and the fused loss's chunk (``chunk_tokens × vocab`` fp32 tensors) and gradient buffers,
  including the embedding's dense gradient.

It is an estimate of what ``torch.cuda.max_memory_allocated`` reports, not of what ``nvidia-smi`` shows (the
CUDA context and the allocator's cache come on top: on CUDA the plan may fill 90% of the GPU).
BENCHMARKS.md compares it with measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from ..errors import ConfigError
from ..models import layout_for
from .config import DistillConfig

GIB = 2**30
HEADROOM = 0.9  # of a GPU's memory that the plan may fill
# Bytes saved for backward per token and decoder layer, per unit of width (see the module docstring).
_ACT = {
    "fp32": {"d": 24, "i": 16, "q": 16, "t": 4},
    "autocast": {"d": 26, "i": 8, "q": 8, "t": 2},
    "bf16": {"d": 18, "i": 8, "q": 8, "t": 2},
}
_LOSS_CHUNK_TENSORS = 7  # fp32 [chunk, vocab] tensors alive at once in the fused loss (measured)


@dataclass
class _Shape:
    params: int
    layers: int
    layer_params: int
    root_params: int
    hidden: int
    intermediate: int
    q_width: int
    vocab: int
    param_bytes: int
    tied: bool

    @classmethod
    def of(cls, model: nn.Module) -> _Shape:
        adapter = layout_for(model)
        layers = adapter.decoder_layers(model)
        unique = {id(p): p for p in model.parameters()}
        params = sum(p.numel() for p in unique.values())
        layer_params = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
        in_layers = sum(p.numel() for layer in layers for p in layer.parameters())
        cfg = adapter.shape_config(model.config)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        first = next(iter(unique.values()))
        tied = model.get_submodule(adapter.lm_head).weight is model.get_submodule(adapter.embed).weight
        return cls(
            params=params,
            layers=len(layers),
            layer_params=layer_params,
            root_params=params - in_layers,
            hidden=cfg.hidden_size,
            intermediate=cfg.intermediate_size,
            q_width=cfg.num_attention_heads * head_dim,
            vocab=cast(torch.Tensor, model.get_submodule(adapter.lm_head).weight).shape[0],
            param_bytes=first.element_size(),
            tied=tied,
        )


@dataclass
class MemoryPlan:
    """Per-device peak memory estimates (bytes) for each engine, and the device's budget (None: unchecked)."""

    student: _Shape
    teacher: _Shape
    config: DistillConfig
    world: int
    device: str
    use_bf16: bool
    budget: int | None
    notes: list[str] = field(default_factory=list)

    # --- the pieces -------------------------------------------------------------------------------------------

    def _compute_bytes(self) -> int:
        return 2 if self.use_bf16 else 4

    def _activations(self, mode: str) -> int:
        s, cfg = self.student, self.config
        assert cfg.batch_size is not None and cfg.seq_len is not None  # set by DistillConfig.validate()
        n = cfg.batch_size * cfg.seq_len
        kind = "fp32" if not self.use_bf16 else ("bf16" if mode == "fsdp" else "autocast")
        c = _ACT[kind]
        seq_term = c["t"] * cfg.seq_len if self.device == "cpu" else 0
        per_layer = n * (c["d"] * s.hidden + c["i"] * s.intermediate + c["q"] * s.q_width + seq_term)
        residual = n * 8 * s.hidden  # embedding output, final norm
        if cfg.gradient_checkpointing:
            return n * s.layers * 4 * s.hidden + per_layer + residual
        return s.layers * per_layer + residual

    def _teacher_forward(self) -> int:
        t, s, cfg = self.teacher, self.student, self.config
        assert cfg.batch_size is not None and cfg.seq_len is not None  # set by DistillConfig.validate()
        n = cfg.batch_size * cfg.seq_len
        a = self._compute_bytes()
        transient = n * (4 * t.hidden + 3 * t.intermediate) * a
        kept = n * t.hidden * a
        if cfg.hidden_loss is not None:
            mapped = len(cfg.hidden_layers) if cfg.hidden_layers is not None else s.layers
            kept += n * t.hidden * (a + 2 * 4) * mapped  # teacher outputs; projected student outputs, fp32
        return transient + kept

    def _loss(self) -> int:
        """The fused loss's chunk tensors and its fp32 LM-head gradient buffer, plus the embedding's dense
        gradient (and, with a tied LM head, the sum of the two gradients) made in backward."""
        s, cfg = self.student, self.config
        assert cfg.batch_size is not None and cfg.seq_len is not None  # set by DistillConfig.validate()
        n = cfg.batch_size * (cfg.seq_len - 1)
        chunk = min(cfg.chunk_tokens, n)
        embedding_grads = (2 if s.tied else 1) * s.vocab * s.hidden * 4
        return (
            _LOSS_CHUNK_TENSORS * chunk * s.vocab * 4 + s.vocab * s.hidden * 4 + 2 * n * s.hidden * 4 + embedding_grads
        )

    def _student_state(self, mode: str) -> int:
        s = self.student
        if mode != "fsdp":
            cache = 2 * (s.params - s.root_params) if self.use_bf16 and not self.config.gradient_checkpointing else 0
            return 16 * s.params + cache
        a = self._compute_bytes() if self.use_bf16 else 4
        gathered_root = s.root_params * (a + 4)  # the root group's gathered weights and its fp32 gradients
        in_flight = 2 * s.layer_params * (2 * a + 4)  # two layers gathered (prefetch), their grads for reduction
        return 16 * s.params // self.world + gathered_root + in_flight

    def _teacher_state(self, shard: bool) -> int:
        t = self.teacher
        a = 2 if self.use_bf16 and self.device != "cpu" else t.param_bytes
        if self.config.teacher_correction_steps:  # trained first: fp32 weights, gradients, AdamW moments
            full = 16 * t.params
            return full // self.world + t.root_params * 8 + 2 * t.layer_params * 8 if shard else full
        if not shard:
            return t.params * a
        return t.params * a // self.world + t.root_params * a + 2 * t.layer_params * a

    # --- the answers ------------------------------------------------------------------------------------------

    def breakdown(self, mode: str, shard_teacher: bool = False) -> dict[str, int]:
        parts = {
            "student_state": self._student_state(mode),
            "teacher": self._teacher_state(shard_teacher),
            "activations": self._activations(mode),
            "teacher_forward": self._teacher_forward(),
            "loss": self._loss(),
        }
        parts["total"] = sum(parts.values())
        return parts

    def total(self, mode: str, shard_teacher: bool = False) -> int:
        return self.breakdown(mode, shard_teacher)["total"]

    def fits(self, mode: str, shard_teacher: bool = False) -> bool:
        return self.budget is None or self.total(mode, shard_teacher) <= self.budget

    def check(self, mode: str, shard_teacher: bool) -> None:
        """Refuse, saying what would fit, when the chosen engine's estimate exceeds the device's memory."""
        if self.fits(mode, shard_teacher):
            return
        assert self.budget is not None  # fits() is True without a budget
        assert self.config.batch_size is not None  # set by DistillConfig.validate()
        gib = self.total(mode, shard_teacher) / GIB
        options = []
        if mode != "fsdp" and self.world > 1 and self.fits("fsdp", True):
            options.append("parallel='fsdp' (shards the student's weights, gradients and optimizer state)")
        if mode == "fsdp" and not shard_teacher and self.fits("fsdp", True):
            options.append("shard_teacher=True")
        if not self.config.gradient_checkpointing:
            cfg = DistillConfig(**{**self.config.to_dict(), "gradient_checkpointing": True})
            if MemoryPlan(**{**self.__dict__, "config": cfg}).fits(mode, shard_teacher):
                options.append("gradient_checkpointing=True")
        for batch in (self.config.batch_size // 2, self.config.batch_size // 4, 1):
            if 1 <= batch < self.config.batch_size:
                cfg = DistillConfig(
                    **{
                        **self.config.to_dict(),
                        "batch_size": batch,
                        "grad_accum": self.config.grad_accum * max(1, self.config.batch_size // batch),
                    }
                )
                if MemoryPlan(**{**self.__dict__, "config": cfg}).fits(mode, shard_teacher):
                    options.append(f"batch_size={batch} with grad_accum={cfg.grad_accum} (same tokens per step)")
                    break
        if self.world == 1 and not options:
            options.append("more GPUs: torchrun --nproc_per_node N with parallel='fsdp'")
        parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in self.breakdown(mode, shard_teacher).items() if k != "total")
        raise ConfigError(
            f"distillation would need about {gib:.1f} GiB per device with the {mode} engine ({parts} GiB) but "
            f"{self.budget / GIB:.1f} GiB are available. What would fit: "
            f"{'; '.join(options) if options else 'nothing among fsdp, checkpointing and smaller batches'}. "
            "(Set DistillConfig.memory_budget_gib to override the budget.)"
        )

    def to_dict(self, mode: str, shard_teacher: bool = False) -> dict:
        out: dict[str, float | None] = {k: round(v / 2**20, 1) for k, v in self.breakdown(mode, shard_teacher).items()}
        out = {f"{k}_mib": v for k, v in out.items()}
        out["budget_mib"] = None if self.budget is None else round(self.budget / 2**20, 1)
        return out


def plan_memory(
    student: nn.Module, teacher: nn.Module, config: DistillConfig, *, world: int, device: torch.device, use_bf16: bool
) -> MemoryPlan:
    """Estimate the distillation step's peak memory per device (see the module docstring for what it counts)."""
    budget = None
    if config.memory_budget_gib is not None:
        budget = int(config.memory_budget_gib * GIB)
    elif device.type == "cuda":  # 10% stays free for the CUDA context, NCCL buffers and fragmentation
        budget = int(HEADROOM * torch.cuda.get_device_properties(device).total_memory)
    return MemoryPlan(_Shape.of(student), _Shape.of(teacher), config, world, device.type, use_bf16, budget)
