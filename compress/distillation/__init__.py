"""Distillation: recover a pruned student's quality from its teacher (logit + hidden-state KD)."""

from .config import DistillConfig
from .losses import chunked_logit_loss, divergence, hidden_state_loss
from .trainer import DistillError, DistillReport, check, default_layer_map, distill

__all__ = [
    "DistillConfig",
    "DistillError",
    "DistillReport",
    "check",
    "chunked_logit_loss",
    "default_layer_map",
    "distill",
    "divergence",
    "hidden_state_loss",
]
