"""The transaction around a step that changes a model in place: put the model back as it was if the step fails,
and run plugin code so that its errors name the plugin.

:class:`Snapshot` keeps what pruning (or a reconstruct plugin) may change — without copying any weight — and
:meth:`Snapshot.undo` puts it back and says in the error whether that fully worked. :func:`call_plugin` runs one
plugin method and turns a plugin's failure into an error that names it. Used by :mod:`.prune`, :mod:`.generic`'s
caller and :mod:`.reconstruct`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import CompressError, PluginError
from ..validate import weight_sums


def plugin_label(plugin: Any) -> str:
    """How messages name a plugin: ``"axis plugin 'mlp'"`` (its kind and name; an importance plugin by default)."""
    return f"{getattr(plugin, 'kind', 'importance')} plugin {getattr(plugin, 'name', type(plugin).__name__)!r}"


def call_plugin(plugin: Any, method: str, *args: Any) -> Any:
    """Run one plugin method. A :class:`CompressError` keeps its type and gains the plugin's name (unless it
    already says it); any other exception becomes a :class:`PluginError` naming the plugin and the method, with
    the original as ``__cause__``."""
    try:
        return getattr(plugin, method)(*args)
    except CompressError as exc:
        name = repr(getattr(plugin, "name", None))
        if name not in str(exc) and len(exc.args) == 1 and isinstance(exc.args[0], str):
            exc.args = (f"{plugin_label(plugin)}: {exc.args[0]}",)
        raise
    except Exception as exc:  # noqa: BLE001 - a plugin's bug, reported as the plugin's
        raise PluginError(f"{plugin_label(plugin)} failed in {method}(): {type(exc).__name__}: {exc}") from exc


class Snapshot:
    """What pruning may change, kept so that a failure can be undone — without copying any weight.

    :mod:`compress.pruning.surgery` (and a well-behaved axis plugin) *replaces* parameters rather than writing into
    them, so keeping every module's attributes (its ``_parameters``/``_buffers``/``_modules`` dicts, sizes such
    as ``in_features``, train/eval mode), every parameter object with its ``.data``, ``requires_grad`` and
    ``.grad``, and every config's fields is enough to put the model back: the old parameter objects are put back
    in place. Buffers are small and are copied (Gemma's ``embed_scale`` is filled in place). The parameters'
    float64 sums (taken anyway by the NaN/inf check) then tell whether something was written into a weight in
    place, which cannot be undone without a copy; :meth:`restore` returns those names.

    The cost: the teacher's tensors stay alive until pruning succeeds, so the peak memory of the apply step is
    the teacher plus the student.
    """

    def __init__(self, model: nn.Module, sums: dict[str, float]) -> None:
        from transformers import PretrainedConfig

        self.model, self.sums = model, sums
        self.modules = []
        for module in model.modules():
            attrs = dict(vars(module))
            self.modules.append((module, attrs, {k: dict(v) for k, v in attrs.items() if isinstance(v, dict)}))
        self.params = [(p, p.data, p.requires_grad, p.grad) for p in model.parameters()]
        self.buffers = [(b, b.data, b.detach().clone()) for b in model.buffers()]
        configs: dict[int, Any] = {}
        stack = [getattr(model, "config", None)] + [getattr(m, "config", None) for m in model.modules()]
        while stack:
            cfg = stack.pop()
            if isinstance(cfg, PretrainedConfig) and id(cfg) not in configs:
                configs[id(cfg)] = cfg
                stack.extend(v for v in vars(cfg).values() if isinstance(v, PretrainedConfig))
        self.configs = [
            (cfg, {k: v if isinstance(v, PretrainedConfig) else _copy_or_keep(v) for k, v in vars(cfg).items()})
            for cfg in configs.values()
        ]

    def restore(self) -> list[str]:
        """Put everything back; return the names of parameters whose values were changed in place."""
        with torch.no_grad():
            for module, attrs, dicts in self.modules:
                for key, items in dicts.items():
                    attrs[key].clear()
                    attrs[key].update(items)
                current = vars(module)
                current.clear()
                current.update(attrs)
            for p, data, requires_grad, grad in self.params:  # touch only what changed (inference tensors)
                if not p.data.is_set_to(data):
                    p.data = data
                if p.requires_grad != requires_grad:
                    p.requires_grad_(requires_grad)
                if p.grad is not grad:
                    p.grad = grad
            for b, data, saved in self.buffers:
                if not b.data.is_set_to(data):
                    b.data = data
                if not torch.equal(b, saved):
                    b.copy_(saved)
        for cfg, fields in self.configs:
            vars(cfg).clear()
            vars(cfg).update(fields)
        now = weight_sums(self.model)
        return [name for name, value in self.sums.items() if now.get(name) != value]  # sums are finite here

    def undo(self, exc: BaseException) -> None:
        """Restore the model after ``exc`` and say in its message whether that fully worked."""
        try:
            changed = self.restore()
        except Exception as failure:  # noqa: BLE001 - the original error matters more; say the restore failed
            changed = [f"(the restore itself failed: {type(failure).__name__}: {failure})"]
        if changed:
            shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
            note = (
                f" The model could not be fully restored: {shown} were written into in place (a plugin must "
                "replace parameters, as compress.pruning.surgery does); reload the model."
            )
        elif "Nothing was changed" in str(exc):
            return
        else:
            note = " Nothing was changed: the model was restored as it was."
        if isinstance(exc, CompressError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
            message = exc.args[0].rstrip()
            exc.args = (message + ("" if message.endswith((".", "!", "?")) else ".") + note,)
        elif isinstance(exc, Exception) and hasattr(exc, "add_note"):  # Python 3.11+; 3.10 keeps the error bare
            exc.add_note(note.strip())


def _copy_or_keep(value: Any) -> Any:
    """A deep copy of a config value, or the value itself when it cannot be copied."""
    try:
        return copy.deepcopy(value)
    except Exception:  # noqa: BLE001 - an uncopyable config value is kept by reference
        return value


@contextmanager
def transaction(model: nn.Module, sums: dict[str, float]) -> Iterator[None]:
    """Run the block on ``model``; if it raises (or is interrupted), put the model back as it was
    (:meth:`Snapshot.undo`) and re-raise. ``sums``: the model's :func:`~compress.validate.weight_sums`, taken
    before the block. The snapshot is dropped when the block succeeds, so the old tensors can be freed."""
    snapshot = Snapshot(model, sums)
    try:
        yield
    except BaseException as exc:
        snapshot.undo(exc)
        raise
