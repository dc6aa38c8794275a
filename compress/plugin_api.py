"""Base classes for plugins. Subclass one, give it a ``name`` and a ``Config`` dataclass, and register it.

Three kinds exist:

* an **importance** plugin scores channels, heads and layers (:meth:`ImportancePlugin.score`);
* an **axis** plugin prunes one axis of the model (``mlp``, ``heads``, ``hidden`` or ``depth``): it first
  *selects* what to keep while the model is still whole (:meth:`AxisPlugin.select`), then *applies* the
  selection (:meth:`AxisPlugin.apply`). Selecting every axis before applying any means each one sees the
  teacher's importance, not a half-pruned model's;
* a **reconstruct** plugin repairs a pruned student's weights from calibration activations, between pruning and
  distillation (:meth:`ReconstructPlugin.run`, called by :func:`compress.pruning.reconstruct.reconstruct`; the
  built-in ``least_squares`` refits the output projections to the teacher's outputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from .models import DecoderAdapter
from .pruning.calibrate import Calibration, Importance
from .pruning.shape import ModelShape

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
    """What every plugin has: a registered ``name``, a ``kind`` (``"importance"``, ``"axis"`` or
    ``"reconstruct"``) and a ``Config`` dataclass of its settings, built by :func:`compress.registry.build_plugin`."""

    name: ClassVar[str]
    kind: ClassVar[str]

    @dataclass
    class Config:
        pass

    def __init__(self, config: Any = None) -> None:
        # each plugin's own Config dataclass (or a compatible object the caller passed)
        self.config: Any = config if config is not None else self.Config()


class ImportancePlugin(Plugin):
    """Scores channels, heads and layers of an unpruned model (:meth:`score`); the scores rank what each axis
    keeps."""

    kind = "importance"
    #: True when :meth:`score` runs the model over calibration data (False for weight-only scores).
    needs_calibration: ClassVar[bool] = True

    def score(self, model: nn.Module, adapter: DecoderAdapter, calibration: Calibration | None) -> Importance:
        """Score the model without changing it. Every field given must be a finite floating-point tensor of the
        model's shape (``mlp`` ``[layers, intermediate]``, ``heads`` ``[layers, query heads]``, ``hidden``
        ``[hidden]``, ``layers`` ``[layers]``); :func:`compress.prune` checks that before any selection and refuses
        other scores with a :class:`~compress.PluginError` naming the plugin. An exception raised here is
        wrapped the same way (a :class:`~compress.CompressError` keeps its type, prefixed with the plugin's name)."""
        raise NotImplementedError


class AxisPlugin(Plugin):
    """Prunes one axis (:data:`AXES`): chooses what to keep on the whole model (:meth:`select`), then slices it
    (:meth:`apply`) once every axis has chosen."""

    kind = "axis"
    #: Which axis this plugin prunes; one of :data:`AXES`.
    axis: ClassVar[str]
    #: Importance fields :meth:`select` reads (checked before any work).
    needs: ClassVar[tuple[str, ...]] = ()

    def select(self, ctx: PruneContext) -> dict:
        """Decide what to keep, on the unpruned model (read it, do not change it). Returns a JSON-able dict used
        by :meth:`apply`, which must hold, per axis (indices into the teacher, Python ints; other keys are free):

        * ``mlp``: ``{"keep": [[neuron, ...] per layer]}`` — ``intermediate_size`` distinct neurons per layer;
        * ``heads``: ``{"query_heads": [[head, ...] per layer], "kv_heads": [[group, ...] per layer]}`` — the
          planned numbers per layer, every kept query head in a kept KV group, each kept group with the same
          number of query heads;
        * ``hidden``: ``{"keep": [channel, ...]}`` — ``hidden_size`` distinct channels;
        * ``depth``: ``{"keep": [layer, ...]}`` — ``num_hidden_layers`` distinct layers.

        :func:`compress.prune` checks every selection against the plan (counts, range, duplicates, integer type)
        before any axis is applied, and refuses a bad one with a :class:`~compress.PluginError` naming the plugin.
        """
        raise NotImplementedError

    def apply(self, model: nn.Module, adapter: DecoderAdapter, selection: dict) -> None:
        """Slice the weights according to ``selection``: **replace** parameters with sliced copies (as
        :mod:`compress.pruning.surgery` does) rather than writing into them, so that a failure can be undone —
        :func:`compress.prune` puts the original parameter objects back when any axis fails (raises, or leaves
        shapes other than the plan's), and reports weights edited in place, which it cannot restore."""
        raise NotImplementedError

    def summarize(self, selection: dict) -> dict:
        """What the report says about this axis (defaults to the selection without index lists)."""
        return {k: v for k, v in selection.items() if not isinstance(v, list)}


class ReconstructPlugin(Plugin):
    """Repairs a pruned student's weights from calibration activations, between pruning and distillation
    (:meth:`run`)."""

    kind = "reconstruct"

    def run(
        self, student: nn.Module, teacher: nn.Module, adapter: DecoderAdapter, calibration: Calibration, kept: dict
    ) -> dict:
        """Change ``student``'s weights so that it computes more of what ``teacher`` computes; return a JSON-able
        report dict (free keys; ``"modules"`` — a list of one dict per module changed or considered — and
        ``"totals"`` — a dict — are shown by :class:`compress.pruning.reconstruct.ReconstructReport` when present).

        ``student`` was pruned from ``teacher`` (same family; ``adapter`` describes both), ``calibration`` holds
        the token windows to fit on, and ``kept`` says what pruning kept, as teacher indices (Python ints):
        ``kept["layers"]`` — the teacher layer of each student layer — and ``kept["hidden"]`` — the teacher
        channel of each student hidden channel — are always present (the identity where nothing was pruned);
        ``kept["mlp"]`` (neurons per teacher layer) and ``kept["heads"]`` (query heads per teacher layer) when
        pruning reported them (see :attr:`compress.PruneReport.kept`).

        Read the teacher, never change it. **Replace** the student's parameters with new tensors (a new
        ``nn.Parameter``) rather than writing into them, so a failure can be undone:
        :func:`compress.pruning.reconstruct.reconstruct` checks every input before calling this method and, if it
        raises, puts the student's original parameter objects back (and says which weights were written in place,
        which it cannot restore). An exception raised here becomes a :class:`~compress.PluginError` naming the plugin
        (a :class:`~compress.CompressError` keeps its type, prefixed with the plugin's name)."""
        raise NotImplementedError
