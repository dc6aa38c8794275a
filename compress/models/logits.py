"""What a model family does to its LM head's raw output before it is a logit (scaling, soft-capping).

Adapters (:mod:`compress.models`) read it from a config; the distillation losses apply it, so that they see the
logits the model actually produces. A leaf module: it imports nothing of the library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogitTransform:
    """What a model family does to its LM head's raw output before it is a logit: ``softcap(scale * raw)``.

    First the raw logits are multiplied by ``scale`` (Granite divides by ``config.logits_scaling``, so
    ``scale = 1 / logits_scaling``), then, when ``softcap`` is set, soft-capped: ``c * tanh(x / c)`` with
    ``c = softcap`` (Gemma-2/3's ``config.final_logit_softcapping``). No family uses both today; the order is
    fixed here so that a transform means one thing. The distillation losses must see the logits the model
    actually produces, so pass each model's transform to :func:`chunked_logit_loss`.
    """

    scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self):
        scale = float(self.scale)
        if not math.isfinite(scale) or scale == 0.0:
            raise ValueError(f"LogitTransform.scale must be finite and non-zero, got {self.scale!r}")
        object.__setattr__(self, "scale", scale)
        if self.softcap is not None:
            softcap = float(self.softcap)
            if not math.isfinite(softcap) or softcap <= 0.0:
                raise ValueError(f"LogitTransform.softcap must be finite and positive, or None; got {self.softcap!r}")
            object.__setattr__(self, "softcap", softcap)

    @property
    def is_identity(self) -> bool:
        """True when applying the transform changes nothing (``scale == 1`` and no soft-cap)."""
        return self.scale == 1.0 and self.softcap is None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """``softcap(scale * logits)``; the tensor itself (no op) for the identity."""
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    __call__ = apply

    def to_dict(self) -> dict[str, float | None]:
        return {"scale": self.scale, "softcap": self.softcap}

    @classmethod
    def from_config(cls, config) -> LogitTransform:
        """The transform a Hugging Face config asks for: ``final_logit_softcapping`` (Gemma-2/3, also looked up
        on ``config.text_config``) and ``logits_scaling`` (Granite). Missing or ``None`` fields mean no transform."""
        text = getattr(config, "text_config", None)
        softcap = getattr(config, "final_logit_softcapping", None)
        if softcap is None and text is not None:
            softcap = getattr(text, "final_logit_softcapping", None)
        scaling = getattr(config, "logits_scaling", None)
        if scaling is None and text is not None:
            scaling = getattr(text, "logits_scaling", None)
        return cls(scale=1.0 if scaling is None else 1.0 / float(scaling), softcap=softcap)
