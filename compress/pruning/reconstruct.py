"""The reconstruction stage, between pruning and distillation: repair a pruned student's weights from calibration
activations so that it computes more of what its teacher computes, without training.

:func:`reconstruct` checks every input, resolves a ``"reconstruct"`` plugin by name (the built-in
``least_squares`` refits the attention output projections and MLP down-projections by ridge regression onto the
teacher's outputs, :mod:`compress.plugins.reconstruct`) and runs it **transactionally**: if anything fails, the
student's parameter objects are put back as they were.

:class:`LayerStream` is the machinery a plugin can use to run a model's decoder layers one at a time over the
calibration batches (the residual stream of every window is kept, the layers' other arguments — masks, rotary
embeddings — are recorded from one ordinary forward), so a layer-by-layer algorithm costs a few passes of the
model rather than one per layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from .. import registry
from ..data import TextSource
from ..errors import ConfigError, PluginError, UnsupportedModelError
from ..models import DecoderAdapter, find_adapter, supported_families
from ..plugin_api import ReconstructPlugin
from ..report import PruneReport
from ..validate import check_finite_weights, check_token_ids, embedding_rows, weight_sums
from .arguments import REQUIRED, resolve_keywords
from .calibrate import Calibration, calibration_summary, prepare_calibration
from .config import CalibrationConfig, check_config
from .selection import IndexProblem, check_indices
from .shape import ModelShape
from .transaction import Snapshot, call_plugin

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

DEFAULT_PLUGIN = "least_squares"


@dataclass
class ReconstructReport:
    """What :func:`reconstruct` did. ``modules``: one dict per module the plugin considered (for ``least_squares``:
    layer, teacher layer, module, path, chosen ``lambda``, held-out relative error before/after, whether it backed
    off and why); ``totals``: the plugin's sums over them; ``details``: the rest of the plugin's report."""

    plugin: str
    config: dict
    layer_map: dict  # student layer -> teacher layer
    calibration: dict
    modules: list = field(default_factory=list)
    totals: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """Plain values for reports."""
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        t = self.totals
        if "held_out_rel_error_before" in t and "held_out_rel_error_after" in t:
            return (
                f"reconstructed {t.get('refit', '?')} of {t.get('modules', len(self.modules))} modules with "
                f"{self.plugin}: held-out relative error {t['held_out_rel_error_before']:.4g} -> "
                f"{t['held_out_rel_error_after']:.4g} ({t.get('backed_off', 0)} backed off) in "
                f"{self.seconds:.1f} s"
            )
        return f"reconstructed with {self.plugin} in {self.seconds:.1f} s"


# -- input checks ----------------------------------------------------------------------------------------------


def _resolve_plugin(plugin: Any, config: Any) -> ReconstructPlugin:
    """The reconstruct plugin ``plugin`` names (built with ``config``), or the instance given (then without
    ``config``)."""
    if isinstance(plugin, ReconstructPlugin):
        if config is not None:
            raise ConfigError(
                f"config= is for a plugin given by name; plugin={type(plugin).__name__} instance "
                "already has its config (pass plugin='name', config=... instead)"
            )
        return plugin
    if isinstance(plugin, str):
        return registry.build_plugin(plugin, "reconstruct", config)
    raise ConfigError(
        f"plugin should be the name of a reconstruct plugin (e.g. {DEFAULT_PLUGIN!r}) or a "
        f"compress.ReconstructPlugin instance, got {type(plugin).__name__} {plugin!r}"
    )


def _indices(values: Any, count: int, limit: int, what: str) -> list[int]:
    """Check the kept indices ``kept[what]`` (:func:`~compress.pruning.selection.check_indices`), worded for the
    caller of :func:`reconstruct`."""
    try:
        return check_indices(values, count, limit)
    except IndexProblem as problem:
        v = problem.value
        message = {
            "container": f"kept[{what}] should be a list of integer indices, got {type(v).__name__}",
            "count": f"kept[{what}] lists {v} indices, but the student has {count}: pass the kept of the "
            "PruneReport that made this student from this teacher",
            "element": f"kept[{what}] holds {v!r} of type {type(v).__name__}; indices must be integers",
            "range": f"kept[{what}] holds {v}, out of range: the teacher has {limit} (0..{limit - 1})",
            "duplicate": f"kept[{what}] lists an index more than once; indices must be distinct",
        }[problem.kind]
    raise ConfigError(message)


def check_kept(kept: Any, student_shape: ModelShape, teacher_shape: ModelShape) -> dict:
    """Validate what pruning kept against the two models and fill in the identity where an axis was not pruned.

    Returns ``{"layers": [...], "hidden": [...]}`` (always) plus ``"mlp"``/``"heads"`` when given. Other keys are
    ignored. Raises :class:`ConfigError` naming the key and what is wrong."""
    if isinstance(kept, PruneReport):
        kept = kept.kept
    if kept is None:
        kept = {}
    if not isinstance(kept, Mapping):
        raise ConfigError(
            f"kept should be the PruneReport's kept dict (report.kept), or {{}} when nothing was "
            f"pruned; got {type(kept).__name__}"
        )
    s, t = student_shape, teacher_shape
    out: dict = {}
    for key, count, limit, size in (
        ("layers", s.num_hidden_layers, t.num_hidden_layers, "layers"),
        ("hidden", s.hidden_size, t.hidden_size, "hidden channels"),
    ):
        if key in kept and kept[key] is not None:
            out[key] = _indices(kept[key], count, limit, repr(key))
        elif count != limit:
            raise ConfigError(
                f"kept has no {key!r}, but the student has {count} {size} and the teacher {limit}: "
                f"pass the kept of the PruneReport that made this student (report.kept)"
            )
        else:
            out[key] = list(range(count))
    for key, count, limit in (
        ("mlp", s.intermediate_size, t.intermediate_size),
        ("heads", s.num_attention_heads, t.num_attention_heads),
    ):
        if key not in kept or kept[key] is None:
            continue
        per_layer = kept[key]
        if not isinstance(per_layer, (list, tuple)) or len(per_layer) != t.num_hidden_layers:
            got = f"{len(per_layer)} entries" if isinstance(per_layer, (list, tuple)) else type(per_layer).__name__
            raise ConfigError(
                f"kept[{key!r}] should hold one list per teacher layer ({t.num_hidden_layers}), got {got}"
            )
        out[key] = [_indices(v, count, limit, f"{key!r}][{j}") for j, v in enumerate(per_layer)]
    return out


def _check_models(student: Any, teacher: Any) -> tuple[DecoderAdapter, ModelShape, ModelShape]:
    """Refuse a student and teacher that are not two separate models of one family with an adapter; returns
    the adapter and both shapes."""
    for name, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"{name} should be a torch.nn.Module (a Hugging Face causal LM), got {type(model).__name__}"
            )
    if student is teacher:
        raise ConfigError(
            "student and teacher are the same model; reconstruct a pruned copy "
            "(student = copy.deepcopy(teacher); compress.prune(student, ...))"
        )
    teacher_params = {id(p) for p in teacher.parameters()} | {
        p.data_ptr() for p in teacher.parameters() if p.device.type != "meta" and p.numel()
    }
    shared = [
        n
        for n, p in student.named_parameters()
        if id(p) in teacher_params or (p.device.type != "meta" and p.numel() and p.data_ptr() in teacher_params)
    ]
    if shared:
        more = " and more" if len(shared) > 1 else ""
        raise ConfigError(
            f"student shares weights with the teacher ({shared[0]}{more}); reconstruct a pruned copy "
            "(copy.deepcopy(teacher) before pruning)"
        )
    types = [getattr(getattr(m, "config", None), "model_type", None) for m in (student, teacher)]
    if types[0] != types[1]:
        raise ConfigError(
            f"student is a {types[0]!r} model but teacher a {types[1]!r} one; the student must be "
            "pruned from this teacher"
        )
    adapter = find_adapter(student)
    if adapter is None:
        raise UnsupportedModelError(
            f"reconstruction needs a family adapter (where each layer's attention output projection and MLP "
            f"down-projection are), and {types[0]!r} ({type(student).__name__}) has none; supported families: "
            f"{', '.join(supported_families())}. Nothing was changed."
        )
    shapes = tuple(ModelShape.from_config(adapter.shape_config(m.config)) for m in (student, teacher))
    return adapter, shapes[0], shapes[1]


def reconstruct(
    student: nn.Module,
    teacher: nn.Module,
    data: Calibration | torch.Tensor | TextSource = REQUIRED,
    *,
    kept: Mapping | PruneReport | None,
    plugin: str | ReconstructPlugin = DEFAULT_PLUGIN,
    config: Any = None,
    tokenizer: Any = None,
    calibration: CalibrationConfig | None = None,
    **renamed: Any,
) -> ReconstructReport:
    """Repair ``student`` (pruned from ``teacher``) **in place** with a reconstruct plugin; return a report.

    ``data``: a :class:`Calibration` (e.g. the one pruning used), token ids ``[N, seq_len]``, or text with
    ``tokenizer`` (packed by ``calibration``, a :class:`CalibrationConfig`, default
    ``CalibrationConfig(min_samples=2)``). The old keywords ``calibration_config=`` (now ``calibration=``) and
    ``calibration=<data>`` (now ``data``, the third positional argument as before) still work for one release,
    with a :class:`DeprecationWarning`.
    ``kept``: the :attr:`PruneReport.kept` of the pruning that made the student (or the report itself); ``{}``
    when nothing was pruned. ``plugin``: a registered reconstruct plugin's name (default ``"least_squares"``) or
    a :class:`ReconstructPlugin` instance; ``config``: its Config, or a dict of its fields (by name only).

    Every input is checked before any work (models, plugin and config, kept indices against both models' shapes,
    finite weights, token ids), each refusal a :class:`CompressError` subclass naming the input. Transactional:
    if the plugin raises (or is interrupted), leaves NaN/inf weights or other shapes, or changes the teacher,
    the student's original parameter objects are put back — the plugin must replace parameters rather than write
    into them, as ``least_squares`` does — and the error says whether that fully worked. The teacher is only
    read.
    """
    start = time.perf_counter()
    args = resolve_keywords("reconstruct", data, calibration, renamed=renamed)
    adapter, s_shape, t_shape = _check_models(student, teacher)
    chosen = _resolve_plugin(plugin, config)
    kept_checked = check_kept(kept, s_shape, t_shape)
    s_sums = check_finite_weights(student, "student")
    t_sums = check_finite_weights(teacher, "teacher")
    check_config(args.spelled.get("calibration", "calibration"), args.calibration, CalibrationConfig)
    calib = prepare_calibration(teacher, tokenizer, args.data, args.calibration or CalibrationConfig(min_samples=2))
    check_token_ids(calib.input_ids, embedding_rows(student), "calibration token ids (student)")

    out = _run_transaction(chosen, student, teacher, adapter, calib, kept_checked, s_sums, t_sums)
    details = dict(out)
    modules = details.pop("modules", [])
    totals = details.pop("totals", {})
    cfg = chosen.config
    return ReconstructReport(
        plugin=chosen.name,
        # a plugin's config is a Config instance (build_plugin makes one), never the class
        config=dataclasses.asdict(cast("DataclassInstance", cfg)) if dataclasses.is_dataclass(cfg) else {},
        layer_map={i: t for i, t in enumerate(kept_checked["layers"])},
        calibration=calibration_summary(calib),
        modules=modules,
        totals=totals,
        details=details,
        seconds=round(time.perf_counter() - start, 3),
    )


def _run_transaction(
    chosen: ReconstructPlugin,
    student: nn.Module,
    teacher: nn.Module,
    adapter: DecoderAdapter,
    calib: Calibration,
    kept: dict,
    s_sums: dict[str, float],
    t_sums: dict[str, float],
) -> dict:
    """Run the plugin and check what it did (a report dict, every shape kept, finite weights, the teacher
    unchanged); on any failure put the teacher back if it changed and the student as it was, and re-raise."""
    shapes = {n: tuple(p.shape) for n, p in student.named_parameters()}
    s_snapshot, t_snapshot = Snapshot(student, s_sums), Snapshot(teacher, t_sums)
    try:
        out = call_plugin(chosen, "run", student, teacher, adapter, calib, kept)
        if not isinstance(out, dict):
            raise PluginError(
                f"reconstruct plugin {chosen.name!r} returned {type(out).__name__}; run() must return a report dict"
            )
        reshaped = [n for n, p in student.named_parameters() if shapes.get(n) != tuple(p.shape)]
        if reshaped or set(shapes) != {n for n, _ in student.named_parameters()}:
            raise PluginError(
                f"reconstruct plugin {chosen.name!r} changed the student's structure "
                f"({(reshaped or ['its parameter set'])[0]}); reconstruction must keep every shape"
            )
        check_finite_weights(student, f"student after reconstruct plugin {chosen.name!r}")
        if weight_sums(teacher) != t_sums:
            raise PluginError(
                f"reconstruct plugin {chosen.name!r} changed the teacher's weights; it must only read the teacher"
            )
    except BaseException as exc:
        try:
            if weight_sums(teacher) != t_sums:
                t_snapshot.restore()
        finally:
            s_snapshot.undo(exc)
        raise
    return out


# -- running decoder layers one at a time ----------------------------------------------------------------------


class StopForward(Exception):
    """Raised by a hook to end a forward early (caught by :class:`LayerStream`)."""


def _first(output: Any) -> torch.Tensor:
    """The hidden states of a layer's or module's output (the first item of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


class LayerStream:
    """The residual stream of ``model`` over calibration ``batches``, advanced one decoder layer at a time.

    On construction one forward of the decoder stack per batch (stopped after layer ``upto``) records, for every
    layer up to ``upto``, the arguments transformers passes it besides the hidden states (attention masks — which
    differ per layer in families with sliding-window layers —, rotary embeddings, positions), and the hidden
    states entering layer 0. :meth:`run` then calls one layer on one batch's current stream, and
    :meth:`advance` moves the whole stream through the next layer.

    Memory: the stream of every window (``windows × seq_len × hidden`` in the model's dtype, on its device) plus
    the recorded arguments (shared between layers where the model shares them; an eager-attention mask is
    ``batch × seq_len²`` per batch).
    """

    def __init__(self, model: nn.Module, adapter: DecoderAdapter, batches: list[torch.Tensor], upto: int | None = None):
        self.model, self.adapter = model, adapter
        self.layers = adapter.decoder_layers(model)
        self.upto = len(self.layers) - 1 if upto is None else upto
        self.device = next(model.parameters()).device
        self.hidden: list[torch.Tensor] = []
        self.calls: list[list[tuple[tuple, dict, bool]]] = [[] for _ in range(self.upto + 1)]
        self.position = 0
        base = model.get_submodule(adapter.base)
        for batch in batches:
            handles = []

            def record(module, args, kwargs, j):
                positional = len(args) > 0
                hidden = args[0] if positional else kwargs["hidden_states"]
                rest = args[1:] if positional else ()
                extra = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                self.calls[j].append((rest, extra, positional))
                if j == 0:
                    self.hidden.append(hidden.detach())

            def stop(module, args, output):
                raise StopForward

            try:
                for j in range(self.upto + 1):
                    handles.append(
                        self.layers[j].register_forward_pre_hook(
                            lambda m, a, k, j=j: record(m, a, k, j), with_kwargs=True
                        )
                    )
                handles.append(self.layers[self.upto].register_forward_hook(stop))
                with contextlib.suppress(StopForward):
                    base(input_ids=batch.to(self.device), use_cache=False)
            finally:
                for h in handles:
                    h.remove()
        if len(self.hidden) != len(batches) or any(len(c) != len(batches) for c in self.calls):
            raise UnsupportedModelError(
                f"{type(model).__name__}'s decoder did not call each of its layers once per "
                "forward; layer-by-layer reconstruction cannot replay it"
            )

    def run(self, b: int, hidden: torch.Tensor | None = None, layer: int | None = None) -> torch.Tensor:
        """Layer ``layer`` (default: the current position) on batch ``b``'s stream (or ``hidden``); returns the
        layer's output hidden states. A :class:`StopForward` raised by a hook propagates."""
        j = self.position if layer is None else layer
        rest, extra, positional = self.calls[j][b]
        h = self.hidden[b] if hidden is None else hidden
        if positional:
            return _first(self.layers[j](h, *rest, **extra))
        return _first(self.layers[j](hidden_states=h, **extra))

    def run_until(
        self, b: int, module: nn.Module, *, want: str = "input", stop: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the current layer on batch ``b`` and catch ``module``'s input (``want="input"``, its first
        positional argument) or output (``"output"``). With ``stop`` the layer stops right there; without it the
        layer finishes and its output comes back too: ``(caught, layer_output or None)``."""
        caught: list[torch.Tensor] = []

        def pre(m, args):
            caught.append(args[0].detach())
            if stop:
                raise StopForward

        def post(m, args, output):
            caught.append(_first(output).detach())
            if stop:
                raise StopForward

        handle = module.register_forward_pre_hook(pre) if want == "input" else module.register_forward_hook(post)
        out = None
        try:
            out = self.run(b)
        except StopForward:
            pass
        finally:
            handle.remove()
        if len(caught) != 1:
            raise UnsupportedModelError(
                f"{type(module).__name__} ran {len(caught)} times in one layer forward; expected exactly once"
            )
        return caught[0], out

    def advance(self) -> None:
        """Move the stream through the current layer, batch by batch in place (so the stream is held once).

        A caller that has already run the whole layer on a batch ``b`` may store the output in ``hidden[b]``
        itself; once every batch holds the output, it moves ``position`` on by one."""
        for b in range(len(self.hidden)):
            self.hidden[b] = self.run(b)
        self.position += 1

    def advance_to(self, layer: int) -> None:
        """Advance the stream until it enters ``layer``."""
        while self.position < layer:
            self.advance()


def forward_context(*models: nn.Module) -> contextlib.AbstractContextManager[None]:
    """A context manager: the models in eval mode under ``torch.no_grad()``, modes put back afterwards."""
    from contextlib import contextmanager

    @contextmanager
    def ctx():
        modes = [m.training for m in models]
        for m in models:
            m.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for m, mode in zip(models, modes):
                m.train(mode)

    return ctx()
