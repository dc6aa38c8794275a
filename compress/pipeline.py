"""The end-to-end run: a :class:`~compress.recipe.Recipe` executed as a short sequence of named stage steps.

``check`` -> ``load`` -> ``calibrate`` -> ``search`` -> ``prune`` -> ``reconstruct`` -> ``distill`` ->
``export`` -> ``report``. :func:`check` runs every stage's own check, in that order, before any work: a bad
input costs nothing, and the teacher's config alone (not its weights) tells whether the target can be met. Each
step is a function of the :class:`Run` it is given; it records what it produced there (times, perplexities,
samples, its stage report). A step whose stage the recipe does not ask for returns at once. Adding a stage means
writing one step and adding it to :data:`STEPS`, with its check in :func:`check`.

``evaluate`` is not a step of its own: every step that changes the model measures it (:func:`evaluate_stage`),
so perplexity is known at each stage.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from . import distillation, distributed
from .data import (
    PYDOCS_TRAIN,
    PYDOCS_VALID,
    check_source,
    default_calibration_source,
    default_eval_source,
    describe_source,
    looks_like_path,
    same_file,
)
from .distillation import distill as run_distill
from .errors import (
    CheckpointError,
    CompressError,
    ConfigError,
    DataError,
    UnsupportedModelError,
    spelled,
    warn,
)
from .evaluate import perplexity
from .exporters import check_export_args, resolve_formats
from .exporters import export as run_export
from .io import check_output_dir, write_text_atomic
from .loading import load_teacher, smollm2_gguf_path, teacher_skeleton
from .models import check_plain_logits, find_adapter, layout_for, supported_families
from .plugin_api import ReconstructPlugin
from .pruning.arguments import check_prune_args
from .pruning.calibrate import prepare_calibration
from .pruning.config import CalibrationConfig
from .pruning.plan import plan_for
from .pruning.prune import prune as run_prune
from .pruning.reconstruct import reconstruct as run_reconstruct
from .pruning.search import search_shapes
from .recipe import RECIPE_FILE, Recipe, default_plugin_config
from .registry import build_plugin, get_plugin
from .report import PruneReport, Result
from .validate import check_device, check_materialized, check_teacher_source
from .version import __version__

REPORT_FILE = "compress_report.json"
# Calibration expected to take longer than this (seconds) is announced with an estimate before it starts.
SLOW_CALIBRATION_S = 120


@dataclass
class RunObjects:
    """What a run got as Python objects rather than recipe values: a teacher model, in-memory texts, plugin
    instances. They take the place of the recipe's entries of the same meaning."""

    teacher: Any = None
    tokenizer: Any = None
    texts: dict = field(default_factory=dict)
    plugins: Any = None
    reconstruct: Any = None
    target: Any = None


@dataclass
class Run:
    """One run's checked inputs, its models, and what each step produced so far."""

    recipe: Recipe  # as given, with the library version
    saved: Recipe  # as it will be saved beside the student: every default and path spelled out
    overwrite: bool
    teacher: Any  # a source (path, .gguf, hub id, "smollm2"), a model, or a (model, tokenizer) pair
    teacher_path: Any  # the teacher's local file or folder (None for a model object or a hub id)
    tokenizer: Any
    target: Any
    data: Any
    eval_data: Any
    distill_data: Any
    plugins: Any
    recon_plugin: ReconstructPlugin | None
    formats: Any
    device: Any
    t0: float = field(default_factory=time.perf_counter)
    model: nn.Module | None = None
    source: str = ""
    rank: int = 0
    homes: set = field(default_factory=set)  # where a passed-in model's weights were: they go back on failure
    times: dict[str, float] = field(default_factory=dict)
    ppl: dict[str, float] = field(default_factory=dict)
    samples: dict[str, str] = field(default_factory=dict)
    stages: dict[str, Any] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)  # which tokens each stage read
    calibration: Any = None  # the calibration text, or its windows once a step has prepared them
    scores: Any = None  # importance found by the search, reused by pruning
    searched: Any = None
    teacher_copy: nn.Module | None = None
    report: PruneReport | None = None

    @property
    def distill_text(self) -> Any:
        """Distillation's text: ``distill_data``, else the calibration text (after the tokens calibration read)."""
        return self.data if self.distill_data is None else self.distill_data

    @property
    def same_text(self) -> bool:
        return self.distill_data is None or same_file(self.distill_data, self.data)

    @property
    def model_(self) -> nn.Module:
        assert self.model is not None, "the load step runs first"
        return self.model


def run_recipe(recipe: Recipe, objects: RunObjects | None = None, *, overwrite: bool = False) -> Result:
    """Run ``recipe`` (see :func:`compress.compress`); ``objects`` stand in for the recipe entries that were
    objects. Every check first, then the steps in order; a model passed in goes back where it was if a step
    fails (pruning itself is transactional; after it succeeded the model is pruned in place, as documented)."""
    run = check(recipe, objects, overwrite)
    load(run)
    try:
        for step in STEPS:
            step(run)
        result = build_result(run)
        if run.rank != 0:  # no collective follows: the other ranks are done and leave the writing to rank 0
            result.stages["export"] = {"written_by": 0}
            result.seconds = {k: round(v, 2) for k, v in run.times.items()}
            return result
        export(run, result)
        report(run, result)
        return result
    except BaseException:
        if len(run.homes) == 1 and not isinstance(run.teacher, (str, os.PathLike)):
            run.model_.to(next(iter(run.homes)))
        raise


# -- check: every stage's check, before any work --------------------------------------------------------------


def check(recipe: Recipe, objects: RunObjects | None, overwrite: bool) -> Run:
    """Every check of every stage, in the order the stages run, before anything is loaded or written."""
    run = _inputs(recipe, objects, overwrite)
    _check_teacher_object(run)
    _check_files(run)
    _check_stages(run)
    return run


def _inputs(recipe: Recipe, objects: RunObjects | None, overwrite: bool) -> Run:
    """The run's inputs: the recipe's entries, with the objects given in their place; the recipe-level checks."""
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
    d = recipe.data
    formats = check_export_args(recipe.export.formats, recipe.export.quantize)
    reconstruct = objects.reconstruct if objects.reconstruct is not None else recipe.reconstruct
    recon_plugin = _reconstruct_plugin(reconstruct)
    if recipe.search is not None and distributed.world_from_env() > 1:
        raise ConfigError(
            "search=SearchConfig(...) runs in one process (every rank would try every "
            "candidate): search first, then pass the winning shape as target under torchrun"
        )
    check_device(recipe.device)
    return Run(
        recipe=recipe,
        saved=recipe,
        overwrite=overwrite,
        teacher=objects.teacher if objects.teacher is not None else recipe.teacher,
        teacher_path=None,
        tokenizer=objects.tokenizer,
        target=objects.target if objects.target is not None else recipe.target,
        data=objects.texts.get("calibration", d.calibration),
        eval_data=objects.texts.get("evaluation", d.evaluation),
        distill_data=objects.texts.get("distillation", d.distillation),
        plugins=objects.plugins if objects.plugins is not None else (recipe.plugins or None),
        recon_plugin=recon_plugin,
        formats=formats,
        device=recipe.device,
    )


def _check_teacher_object(run: Run) -> None:
    teacher = run.teacher
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
        run.teacher_path = teacher
        if str(teacher) == "smollm2":
            try:
                run.teacher_path = smollm2_gguf_path()
            except CheckpointError:
                run.teacher_path = None  # loading says so


def _check_files(run: Run) -> None:
    """The output folder, the texts, the distillation checkpoints, and the recipe as it will be saved."""
    recipe, distill = run.recipe, run.recipe.distill
    # Every input the run reads must survive the output folder being replaced; checkpoints must not fill it.
    inputs = {
        "calibration data": run.data if run.data is not None else PYDOCS_TRAIN,
        "evaluation data": run.eval_data if run.eval_data is not None else PYDOCS_VALID,
        "distillation data": run.distill_data,
        "teacher": run.teacher_path,
    }
    check_output_dir(
        recipe.out_dir, run.overwrite, inputs=inputs, checkpoint_dir=distill.output_dir if distill else None
    )
    run.data = default_calibration_source() if run.data is None else run.data
    run.eval_data = default_eval_source() if run.eval_data is None else run.eval_data
    for text in (run.data, run.eval_data, run.distill_data):  # a typo in a path is caught before the teacher loads
        if text is not None:
            check_source(text)
    for name, text in (("calibration", run.data), ("distillation", run.distill_data)):
        if text is not None and same_file(text, run.eval_data):
            raise DataError(f"{name} and evaluation data are the same file ({text}); evaluate on held-out text")
    # The recipe as it will be saved, written now so that a value YAML cannot hold is refused before any work.
    run.saved = _as_run(recipe, run.data, run.eval_data)
    try:
        run.saved.to_yaml()
    except Exception as exc:  # noqa: BLE001 - yaml's RepresenterError and friends
        raise ConfigError(
            f"the recipe cannot be written as YAML ({type(exc).__name__}: {exc}); use plain "
            "numbers, strings, lists and dicts in configs"
        ) from exc


def _check_stages(run: Run) -> None:
    """Each stage's own check, in the order the stages run. Pruning's runs on the teacher's architecture built
    from its config alone (a skeleton on the meta device): ``{"params": 2}`` is refused in seconds, not after
    the teacher has loaded and been evaluated."""
    recipe = run.recipe
    skeleton = _architecture(run)
    if skeleton is not None:
        check_prune_args(
            skeleton, strategy=recipe.strategy, plugins=run.plugins, calibration=recipe.calibration, plan=recipe.plan
        )
        if find_adapter(skeleton) is not None:  # the generic backend checks its targets once the weights are there
            plan_for(skeleton, run.target, recipe.strategy, recipe.plan)
    if recipe.distill is not None:
        distillation.check(recipe.distill, data=run.distill_text, device=run.device)


def _architecture(run: Run) -> nn.Module | None:
    """The teacher's architecture: the model given, or a skeleton built from its config (None when that cannot
    be read: loading the teacher then refuses it, with its own message)."""
    if isinstance(run.teacher, tuple):
        return run.teacher[0]
    if isinstance(run.teacher, nn.Module):
        return run.teacher
    try:
        return teacher_skeleton(run.teacher)
    except CompressError:
        return None


# -- the steps -------------------------------------------------------------------------------------------------


def load(run: Run) -> None:
    """Load the teacher (or take the model given), then the checks that need it; move it to the run's device."""
    teacher, distill = run.teacher, run.recipe.distill
    if isinstance(teacher, tuple):
        run.model, run.tokenizer = teacher
        run.source = type(run.model).__name__
    elif isinstance(teacher, nn.Module):
        run.model, run.source = teacher, type(teacher).__name__
    else:
        run.model, run.tokenizer = load_teacher(teacher)
        run.source = str(teacher)
    if run.tokenizer is None:
        raise DataError("a tokenizer is needed: pass tokenizer= or a (model, tokenizer) pair")
    model = run.model_
    if distill is not None:  # a family without an adapter whose logits the loss would get wrong: refuse now
        check_plain_logits(model, layout_for(model))
    if run.recon_plugin is not None and find_adapter(model) is None:
        raise UnsupportedModelError(
            f"reconstruct={run.recon_plugin.name!r} needs a model family with an adapter (it "
            f"finds each layer's output projections through it); {type(model).__name__} "
            f"has none. Supported: {', '.join(supported_families())}"
        )
    # Before pruning: a format this family or tokenizer cannot be written in is known now.
    resolve_formats(model, run.formats, run.recipe.export.quantize, run.tokenizer)
    run.rank, _ = distributed.init()
    run.device = distributed.resolve_device(run.device)
    run.homes = {p.device for p in model.parameters()}
    model.to(run.device)
    run.times["load"] = time.perf_counter() - run.t0


def evaluate_stage(run: Run, stage: str) -> None:
    """Perplexity of the model as it is now (rank 0 measures, every rank learns it), and its greedy sample."""
    t = time.perf_counter()
    d, model = run.recipe.data, run.model_
    value = (
        perplexity(model, run.tokenizer, run.eval_data, seq_len=d.eval_seq_len, max_tokens=d.eval_tokens)
        if run.rank == 0
        else None
    )
    run.ppl[stage] = distributed.broadcast_object(value)
    run.times[f"evaluate_{stage}"] = time.perf_counter() - t
    prompt = run.recipe.prompt
    if prompt is not None:
        text = _sample_or_warn(model, run.tokenizer, prompt, run.recipe.sample_tokens, stage) if run.rank == 0 else None
        text = distributed.broadcast_object(text)
        if text is not None:
            run.samples[stage] = text


def calibrate(run: Run) -> None:
    """Measure the teacher; prepare calibration windows now when more than pruning shares them (the search, the
    refit), else pruning prepares its own."""
    evaluate_stage(run, "teacher")
    if run.rank == 0:
        _warn_if_slow(run.recipe.calibration, run.times["evaluate_teacher"], run.recipe.data.eval_tokens, run.device)
    if run.recipe.search is not None or run.recon_plugin:
        t = time.perf_counter()
        run.calibration = prepare_calibration(run.model_, run.tokenizer, run.data, run.recipe.calibration)
        run.times["calibrate"] = time.perf_counter() - t
    else:
        run.calibration = run.data


def search(run: Run) -> None:
    """Try the planner's best shapes with short distillations; the winner becomes the pruning target."""
    recipe = run.recipe
    if recipe.search is None:
        return
    t = time.perf_counter()
    run.searched = search_shapes(
        run.model_,
        run.target,
        run.calibration,
        tokenizer=run.tokenizer,
        train_data=run.distill_text,
        strategy=recipe.strategy,
        plugins=run.plugins,
        config=recipe.search,
        device=run.device,
        plan=recipe.plan,
        calibration=recipe.calibration,
        skip_tokens=run.calibration.num_tokens if run.same_text else 0,
    )
    run.target, run.scores = run.searched.best_shape, run.searched.scores
    run.stages["search"] = run.searched.to_dict()
    run.times["search"] = time.perf_counter() - t


def prune(run: Run) -> None:
    """Prune the model in place to the target (keeping a copy of the teacher when a later stage needs it)."""
    recipe = run.recipe
    if recipe.distill is not None or run.recon_plugin:
        run.teacher_copy = copy.deepcopy(run.model_)
    t = time.perf_counter()
    run.report = run_prune(
        run.model_,
        run.target,
        run.calibration,
        strategy=recipe.strategy,
        plugins=run.plugins,
        tokenizer=run.tokenizer,
        calibration=recipe.calibration,
        plan=recipe.plan,
        importance=run.scores,
    )
    run.times["prune"] = time.perf_counter() - t
    evaluate_stage(run, "pruned")
    run.stages["prune"] = run.report.to_dict()
    run.split["calibration"] = run.report.calibration


def reconstruct(run: Run) -> None:
    """Refit the pruned model's output projections to the teacher's outputs (when the recipe asks for it)."""
    if not run.recon_plugin:
        return
    assert run.teacher_copy is not None and run.report is not None
    t = time.perf_counter()
    rebuilt = run_reconstruct(
        run.model_,
        run.teacher_copy,
        run.calibration,
        kept=run.report.kept,
        plugin=run.recon_plugin,
        calibration=run.recipe.calibration,
    )
    run.times["reconstruct"] = time.perf_counter() - t
    run.stages["reconstruct"] = rebuilt.to_dict()
    evaluate_stage(run, "reconstructed")
    if run.recipe.distill is None:
        run.teacher_copy = None


def distill(run: Run) -> None:
    """Recover quality by distilling from the teacher, on text after the tokens calibration read."""
    config = run.recipe.distill
    if config is None:
        return
    assert run.teacher_copy is not None and run.report is not None
    t = time.perf_counter()
    skip = run.report.calibration.get("tokens", 0) if run.same_text else 0
    distilled = run_distill(
        run.model_,
        run.teacher_copy,
        run.distill_text,
        config,
        tokenizer=run.tokenizer,
        skip_tokens=skip,
        kept_layers=run.report.kept.get("layers"),
        kept_hidden=run.report.kept.get("hidden"),
        device=run.device,
        keep_weights_for_errors=False,
    )
    run.teacher_copy = None
    run.times["distill"] = time.perf_counter() - t
    run.stages["distill"] = distilled.to_dict()
    run.split["distillation"] = {**distilled.data, "tokens_trained": distilled.tokens}
    evaluate_stage(run, "distilled")


#: The steps between loading and export, in order. A new stage is one function of the Run, added here.
STEPS: tuple[Callable[[Run], None], ...] = (calibrate, search, prune, reconstruct, distill)


def build_result(run: Run) -> Result:
    """The run's :class:`Result`, as every rank returns it."""
    assert run.report is not None
    d = run.recipe.data
    return Result(
        out_dir=Path(run.recipe.out_dir),
        prune=run.report,
        perplexity=run.ppl,
        stages=dict(run.stages),
        data={
            "teacher": run.source,
            **run.split,
            "evaluation": describe_source(run.eval_data),
            "eval_seq_len": d.eval_seq_len,
            "eval_tokens": d.eval_tokens,
        },
        samples={"prompt": run.recipe.prompt, **run.samples} if run.samples else {},
    )


def export(run: Run, result: Result) -> None:
    """Write the student in every format asked for, with the report, the recipe and the importance scores."""
    from .html_report import IMPORTANCE_FILE  # matplotlib loads only for a run

    assert run.report is not None
    t = time.perf_counter()
    eval_tokens = run.recipe.data.eval_tokens
    exported = run_export(
        run.model_,
        run.tokenizer,
        run.recipe.out_dir,
        run.formats,
        run.recipe.export.quantize,
        overwrite=run.overwrite,
        eval_data=run.eval_data,
        eval_tokens=eval_tokens or 4096,
        history=_card_history(result),
        name=f"{Path(run.source).name} (compressed)",
        extra_files={
            REPORT_FILE: result.to_json(),
            RECIPE_FILE: run.saved.replace(device=str(run.device)).to_yaml(),
            IMPORTANCE_FILE: importance_file(run.report),
        },
    )
    result.stages["export"] = exported.to_dict()
    run.times["export"] = time.perf_counter() - t


def report(run: Run, result: Result) -> None:
    """``compress_report.json`` with the final timings, and ``report.html`` (a failure there costs the page only)."""
    from .html_report import render_report

    out_dir = run.recipe.out_dir
    result.seconds = {k: round(v, 2) for k, v in run.times.items()}
    result.seconds["total"] = round(time.perf_counter() - run.t0, 2)
    write_text_atomic(Path(out_dir) / REPORT_FILE, result.to_json())
    try:
        result.report_html = render_report(out_dir)
    except Exception as exc:  # noqa: BLE001 - the student is complete; the page can be rebuilt later
        warn(
            f"the student in {out_dir} is complete, but report.html could not be written "
            f"({type(exc).__name__}: {exc}); rebuild it with `compress report {out_dir}`"
        )


# -- helpers of the steps --------------------------------------------------------------------------------------


def _as_run(recipe: Recipe, data: Any, eval_data: Any) -> Recipe:
    """The recipe to save beside the student: what ran, spelled out so that a replay does not depend on today's
    defaults or working folder. Local files become absolute paths, the default texts the files they were, and
    plugins named without a config get their full default config."""

    def absolute(value: Any) -> Any:
        if isinstance(value, (str, os.PathLike)) and looks_like_path(value) and Path(value).exists():
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
        warn(f"no sample of the {stage} model ({type(exc).__name__}: {exc}); the run goes on")
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
    """Say up front, with an estimate from the teacher's evaluation speed, when calibration will take minutes,
    what that time is made of, and what would shorten it (a number of windows smaller than the run's own)."""
    if not eval_tokens or eval_seconds <= 0:
        return
    tokens = calibration.num_samples * calibration.seq_len
    # Scoring runs the same forward pass with hooks; on SmolLM2 on 2 CPU cores it ran at 1.35x the speed of the
    # teacher's first evaluation (which pays the warm-up), so this errs on the long side (96 s said, 72 s taken).
    estimate = tokens * eval_seconds / eval_tokens
    if estimate < SLOW_CALIBRATION_S:
        return
    fewer = max(calibration.min_samples, calibration.num_samples // 4)
    if fewer < calibration.num_samples:
        advice = "For a quicker, noisier importance estimate use fewer windows (" + spelled(
            f"CalibrationConfig(num_samples={fewer})", f"--samples {fewer}", f"calibration: {{num_samples: {fewer}}}"
        )
        advice += ")"
    else:
        advice = (
            f"It already reads the fewest windows allowed ({spelled('min_samples', '--samples', 'min_samples')}"
            f" = {calibration.min_samples}); shorter windows or a GPU would make it quicker"
        )
    warn(
        f"calibration reads {calibration.num_samples} windows x {calibration.seq_len} tokens "
        f"({tokens:,} tokens); at the speed the teacher was evaluated here ({eval_tokens / eval_seconds:,.0f}"
        f" tokens/s on {device}) that is about {estimate / 60:.0f} minutes. {advice}"
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
