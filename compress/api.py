"""The one call: :func:`compress` turns a teacher into a compressed, exported student.

Its keywords build a :class:`~compress.recipe.Recipe` (the objects a recipe cannot hold travel beside it) and
:func:`compress.pipeline.run_recipe` runs it. Loading and saving models live in :mod:`compress.loading`; both
are re-exported here, as are the pipeline's report helpers, so ``compress.api`` keeps every name it had.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .data import TextSource, looks_like_path
from .distillation import DistillConfig
from .errors import CompressError, ConfigError, DataError
from .exporters import check_export_args
from .loading import SMOLLM2_GGUF, TOKENIZER_FILES, load_teacher, save_student, smollm2_gguf_path, teacher_skeleton
from .pipeline import (
    REPORT_FILE,
    SLOW_CALIBRATION_S,
    RunObjects,
    greedy_continuation,
    importance_file,
    load_report,
    run_recipe,
)
from .plugin_api import ReconstructPlugin
from .pruning.arguments import PluginsArg
from .pruning.config import CalibrationConfig, PlanConfig, SearchConfig, Target
from .recipe import DataSettings, ExportSettings, Recipe, plain, plugins_mapping
from .registry import get_plugin
from .report import Result
from .validate import DTYPES, check_device, check_dtype
from .validate import check_teacher_source as check_teacher_source

__all__ = [
    "DTYPES",
    "REPORT_FILE",
    "SLOW_CALIBRATION_S",
    "SMOLLM2_GGUF",
    "TOKENIZER_FILES",
    "RunObjects",
    "check_dtype",
    "compress",
    "greedy_continuation",
    "importance_file",
    "load_report",
    "load_teacher",
    "run_recipe",
    "save_student",
    "smollm2_gguf_path",
    "teacher_skeleton",
]


_UNSET: Any = object()  # "not given": the recipe's default applies (None is a meaningful value for some keywords)


def compress(
    teacher: str | os.PathLike | nn.Module | tuple[nn.Module, Any] | Recipe = _UNSET,
    target: Any = None,
    data: TextSource | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    tokenizer=None,
    strategy: str | None = None,
    plugins: PluginsArg = None,
    calibration: CalibrationConfig | None = None,
    plan: PlanConfig | None = None,
    eval_data: TextSource | None = None,
    eval_seq_len: int | None = None,
    eval_tokens: int | None = _UNSET,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    distill: DistillConfig | None = None,
    distill_data: TextSource | None = None,
    formats: Sequence[str] | str | None = None,
    quantize: str | None = None,
    search: SearchConfig | None = None,
    reconstruct: str | dict | ReconstructPlugin | None = None,
    prompt: str | None = _UNSET,
) -> Result:
    """Compress ``teacher`` to ``target`` and save the student to ``out_dir``: load, calibrate, score, plan,
    prune, (refit, distill,) evaluate, export, report.

    The whole run is one :class:`~compress.recipe.Recipe`: ``compress(recipe)`` runs it (``out_dir=``,
    ``device=`` and ``overwrite=`` may still be given beside it), and the keywords below are a convenience layer
    that builds one. Every keyword left out (or None) takes the recipe's default, so this call, ``compress run
    recipe.yaml`` and the ``compress`` command's flags share one set of defaults. The output folder receives
    ``recipe.yaml`` (replay it with ``compress run OUT/recipe.yaml --out AGAIN``), ``compress_report.json``,
    ``report.html`` (tables and plots of every stage, one offline file) and ``report/importance.safetensors``.

    ``teacher``: a path/hub id/``"smollm2"`` (see :func:`load_teacher`), a model (give ``tokenizer=``), or a
    ``(model, tokenizer)`` pair; a passed-in model is pruned in place. ``data``: calibration text (default: the
    pydocs train split when present, else installed packages' docstrings). ``eval_data``: held-out text for perplexity
    (default: pydocs valid, else held-out docstrings); it must not be the calibration file.
    ``distill``: a :class:`~compress.distillation.DistillConfig` to recover quality from the teacher after pruning, on
    ``distill_data`` (default: ``data`` after the tokens calibration used, so the two never overlap).
    ``formats``/``quantize``: what :func:`compress.exporters.export` writes: by default (``"auto"``) safetensors plus
    the fastest deployment format that passes its checks against PyTorch (onnxruntime-genai, else Optimum ONNX);
    or a list of names (``["safetensors"]`` alone skips ONNX). ``quantize="int8"`` adds int8 versions.
    ``search``: a :class:`~compress.pruning.search.SearchConfig` to try the planner's best few shapes for ``target``,
    each with a short distillation, and keep the one with the lowest held-out score (taken on training text
    after the short runs' tokens, never on ``eval_data``); the report's ``search`` stage lists every candidate.
    One process only. ``reconstruct``: a reconstruct plugin to run between pruning and distillation, by name
    (``"least_squares"``: refit the output projections to the teacher's outputs on the calibration windows) or
    as ``{name: config}``; the report gains a ``reconstructed`` perplexity and a ``reconstruct`` stage.
    ``prompt``: each stage's greedy continuation of it is in ``result.samples`` and the report (None: none).
    The student folder appears only when every stage has succeeded. Refused before any work: an ``out_dir``
    that is not empty (unless ``overwrite=True``, which replaces the whole folder, including files compress did
    not write), that holds one of the run's inputs (``data``, ``eval_data``, ``distill_data``, the teacher
    folder) or ``distill.output_dir`` (even with ``overwrite=True``), or whose parent cannot be written; an
    unknown or absent ``device``; a model on the meta device. A symlinked ``out_dir`` stays a link.

    Under ``torchrun`` every rank runs this call with the same arguments: each rank takes the GPU of its
    ``LOCAL_RANK``, calibration windows are shared out across ranks (importance statistics all-reduced, so every
    rank plans the same shape), distillation is data-parallel with a global token budget, and only rank 0
    evaluates and writes ``out_dir``. Every rank returns the same result; on the other ranks it has no export
    stage (``stages["export"]["written_by"]`` says which rank wrote).
    """
    keywords = dict(
        data=data,
        out_dir=out_dir,
        tokenizer=tokenizer,
        strategy=strategy,
        plugins=plugins,
        calibration=calibration,
        plan=plan,
        eval_data=eval_data,
        eval_seq_len=eval_seq_len,
        eval_tokens=eval_tokens,
        device=device,
        distill=distill,
        distill_data=distill_data,
        formats=formats,
        quantize=quantize,
        search=search,
        reconstruct=reconstruct,
        prompt=prompt,
    )
    if isinstance(teacher, Recipe):
        return run_recipe(_given_recipe(teacher, target, keywords), overwrite=overwrite)
    if teacher is _UNSET:
        raise ConfigError(
            "compress() needs a teacher (a folder, a .gguf file, a hub id, 'smollm2', a model) or a compress.Recipe"
        )
    if target is None:
        raise ConfigError("compress() needs a target: {'params': 0.5}, {'params': 70_000_000} or an explicit shape")
    recipe, objects = _recipe_from_keywords(teacher, target, **keywords)
    return run_recipe(recipe, objects, overwrite=overwrite)


def _given_recipe(recipe: Recipe, target: Any, keywords: dict[str, Any]) -> Recipe:
    """``compress(recipe, ...)``: the recipe holds the settings; only ``out_dir=`` and ``device=`` (and
    ``overwrite=``) may be given beside it."""
    given = {"target": target, **keywords}
    unset = {"eval_tokens", "prompt"}  # None is a value for these two: "given" means not _UNSET
    extra = [
        k for k, v in given.items() if k not in ("out_dir", "device") and v is not (_UNSET if k in unset else None)
    ]
    if extra:
        raise ConfigError(
            f"compress(recipe, ...) takes its settings from the recipe; set {', '.join(extra)} "
            f"on it (recipe.replace(...)) instead of passing them beside it"
        )
    where = {k: str(keywords[k]) for k in ("out_dir", "device") if keywords[k] is not None}
    return recipe.replace(**where)


def _recipe_from_keywords(
    teacher: Any,
    target: Any,
    *,
    data: Any,
    out_dir: Any,
    tokenizer: Any,
    strategy: str | None,
    plugins: Any,
    calibration: CalibrationConfig | None,
    plan: PlanConfig | None,
    eval_data: Any,
    eval_seq_len: int | None,
    eval_tokens: Any,
    device: Any,
    distill: DistillConfig | None,
    distill_data: Any,
    formats: Any,
    quantize: str | None,
    search: SearchConfig | None,
    reconstruct: Any,
    prompt: Any,
) -> tuple[Recipe, RunObjects]:
    """The :class:`Recipe` that ``compress()``'s keywords describe, and the objects that stand in for the
    entries a recipe cannot hold (a model, in-memory texts, plugin instances); each keyword checked first."""
    if distill is not None and not isinstance(distill, DistillConfig):
        raise DataError(f"distill should be a compress.DistillConfig, got {type(distill).__name__}")
    if search is not None and not isinstance(search, SearchConfig):
        raise ConfigError(f"search should be a compress.SearchConfig, got {type(search).__name__}")
    if calibration is not None and not isinstance(calibration, CalibrationConfig):
        raise ConfigError(f"calibration should be a compress.CalibrationConfig, got {type(calibration).__name__}")
    if plan is not None and not isinstance(plan, PlanConfig):
        raise ConfigError(f"plan should be a compress.PlanConfig, got {type(plan).__name__}")
    check_device(device)
    objects = RunObjects(plugins=plugins, reconstruct=reconstruct)
    in_memory: list[str] = []
    if isinstance(teacher, (nn.Module, tuple)):
        objects.teacher, teacher_name = teacher, None
        objects.tokenizer = tokenizer
        in_memory.append("teacher")
    else:
        check_teacher_source(teacher)
        teacher_name = os.fspath(teacher)
    files = {}
    for key, value in (("calibration", data), ("evaluation", eval_data), ("distillation", distill_data)):
        if value is None:
            continue
        if isinstance(value, (str, os.PathLike)) and looks_like_path(value):
            files[key] = os.fspath(value)
        else:
            objects.texts[key] = value
            in_memory.append(f"data.{key}")
    settings = DataSettings(
        calibration=files.get("calibration"),
        evaluation=files.get("evaluation"),
        distillation=files.get("distillation"),
        eval_seq_len=DataSettings.eval_seq_len if eval_seq_len is None else eval_seq_len,
        eval_tokens=DataSettings.eval_tokens if eval_tokens is _UNSET else eval_tokens,
    )
    if formats is not None:  # the export's own message for a bad value, before it becomes a recipe field
        formats = check_export_args(formats, quantize) if not isinstance(formats, str) else formats
    recipe_plugins = _describe_plugins(plugins, in_memory)
    recipe_reconstruct = _describe_reconstruct(reconstruct, in_memory)
    recipe = Recipe(
        teacher=teacher_name,
        target=_describe_target(target),
        strategy=Recipe.strategy if strategy is None else strategy,
        plugins=recipe_plugins,
        calibration=calibration or CalibrationConfig(),
        plan=plan or PlanConfig(),
        search=search,
        reconstruct=recipe_reconstruct,
        distill=distill,
        data=settings,
        export=ExportSettings(
            formats=ExportSettings.formats
            if formats is None
            else formats
            if isinstance(formats, str)
            else list(formats),
            quantize=quantize,
        ),
        out_dir=os.fspath(out_dir) if out_dir is not None else Recipe.out_dir,
        device=str(device) if device is not None else None,
        inputs_in_memory=in_memory,
        prompt=Recipe.prompt if prompt is _UNSET else prompt,
    )
    objects.target = target
    return recipe, objects


def _describe_target(target: Any) -> Any:
    """The target as recipe values: a bare number is a parameter budget; a Target object gives its request, else
    its parameter count or shape. Anything else is left for the recipe to refuse with the planner's message."""
    if isinstance(target, Target):
        if target.requested is not None:
            return plain(dict(target.requested))
        return {"params": target.params} if target.params is not None else dict(target.shape or {})
    if isinstance(target, (int, float)) and not isinstance(target, bool):
        return {"params": target}
    return plain(dict(target)) if isinstance(target, Mapping) else target


def _describe_plugins(plugins: Any, in_memory: list[str]) -> dict:
    """``plugins=`` as recipe values; configs that are not plain fields are noted as in-memory inputs."""
    try:
        return plugins_mapping(plugins if not isinstance(plugins, (set, frozenset)) else sorted(plugins))
    except ConfigError:
        if plugins is not None:
            in_memory.append("plugins")
        return {}


def _describe_reconstruct(reconstruct: Any, in_memory: list[str]) -> str | dict | None:
    if isinstance(reconstruct, ReconstructPlugin):
        config = getattr(reconstruct, "config", None)
        try:
            registered = get_plugin(reconstruct.name, kind="reconstruct") is type(reconstruct)
        except CompressError:
            registered = False
        if registered and dataclasses.is_dataclass(config) and not isinstance(config, type):
            return {reconstruct.name: dataclasses.asdict(config)}
        in_memory.append("reconstruct")  # another class than the one registered under its name: not replayable
        return reconstruct.name
    if isinstance(reconstruct, dict) and len(reconstruct) == 1:
        ((name, config),) = reconstruct.items()
        if dataclasses.is_dataclass(config) and not isinstance(config, type):
            return {name: dataclasses.asdict(config)}
    return reconstruct if reconstruct is None or isinstance(reconstruct, (str, dict)) else None
