"""Base classes for plugins. Subclass one, give it a ``name`` and a ``Config`` dataclass, and register it.

Two kinds exist:

* an **importance** plugin scores channels, heads and layers (:meth:`ImportancePlugin.score`);
* an **axis** plugin prunes one axis of the model (``mlp``, ``heads``, ``hidden`` or ``depth``): it first
  *selects* what to keep while the model is still whole (:meth:`AxisPlugin.select`), then *applies* the
  selection (:meth:`AxisPlugin.apply`). Selecting every axis before applying any means each one sees the
  teacher's importance, not a half-pruned model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from .calibrate import Calibration, Importance
from .models import DecoderAdapter
from .shape import ModelShape

#: Axes in the order they are applied (depth last: width selections index the teacher's layers).
AXES = ("mlp", "heads", "hidden", "depth")


@dataclass
class PruneContext:
    """Everything an axis plugin may read while selecting."""

    model: nn.Module
    adapter: DecoderAdapter
    importance: Importance | None
    calibration: Calibration | None
    shape_before: ModelShape
    shape_after: ModelShape


class Plugin:
    name: ClassVar[str]
    kind: ClassVar[str]

    @dataclass
    class Config:
        pass

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()


class ImportancePlugin(Plugin):
    kind = "importance"
    #: True when :meth:`score` runs the model over calibration data (False for weight-only scores).
    needs_calibration: ClassVar[bool] = True

    def score(self, model: nn.Module, adapter: DecoderAdapter, calibration: Calibration | None) -> Importance:
        raise NotImplementedError


class AxisPlugin(Plugin):
    kind = "axis"
    #: Which axis this plugin prunes; one of :data:`AXES`.
    axis: ClassVar[str]
    #: Importance fields :meth:`select` reads (checked before any work).
    needs: ClassVar[tuple[str, ...]] = ()

    def select(self, ctx: PruneContext) -> dict:
        """Decide what to keep. Returns a JSON-able selection (lists of indices) used by :meth:`apply`."""
        raise NotImplementedError

    def apply(self, model: nn.Module, adapter: DecoderAdapter, selection: dict) -> None:
        """Slice the weights in place according to ``selection``."""
        raise NotImplementedError

    def summarize(self, selection: dict) -> dict:
        """What the report says about this axis (defaults to the selection without index lists)."""
        return {k: v for k, v in selection.items() if not isinstance(v, list)}
