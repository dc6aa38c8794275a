"""Training checkpoints as safetensors + JSON (never pickle), each written whole or not at all.

Every checkpoint is its own folder, ``checkpoint-<step>``, written under a temporary name and renamed into
place in one step; only then are older checkpoints deleted. A process killed at any moment therefore leaves at
least one complete checkpoint (the newest complete one wins on resume), never none.

A folder holds ``state.json`` (step, data position, scheduler, optimizer hyper-parameters, RNG states, metrics
so far, the config and world size that made it) and the tensors:

* one process or DDP (replicated student): ``student.safetensors``, ``projections.safetensors``,
  ``optimizer.safetensors`` (every tensor of the optimizer state, flattened), ``rng.safetensors``;
* FSDP (sharded student): ``sharded/``, written by every rank at once with ``torch.distributed.checkpoint``
  in its Hugging Face safetensors format, each rank writing its own shards.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from .. import distributed
from ..errors import CheckpointError, ConfigError, OutputExistsError, spelled

if TYPE_CHECKING:
    from torch.distributed.checkpoint.state_dict import ValueType

    from .config import DistillConfig

CHECKPOINT_PREFIX = "checkpoint-"
_NAME = re.compile(r"^checkpoint-(\d+)$")
# Fields that change neither the result nor the trajectory of a run: they may differ on resume.
RESUMABLE_CHANGES = frozenset(
    {
        "output_dir",
        "resume",
        "checkpoint_every",
        "log_every",
        "tensorboard",
        "progress",
        "compile",
        "gradient_checkpointing",
        "chunk_tokens",
        "memory_budget_gib",
        "extra",
    }
)


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[Any, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.rsplit(".", 1)
        state.setdefault(int(idx) if idx.isdigit() else idx, {})[name] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx) if idx.isdigit() else idx, {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir`` (a ``state.json`` is written last), oldest first."""
    out = Path(output_dir)
    found = []
    if out.is_dir():
        for child in out.iterdir():
            match = _NAME.match(child.name)
            if match and (child / "state.json").is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1][1] if found else None


def _tmp_path(output_dir: Path, step: int) -> Path:
    return output_dir / f".{CHECKPOINT_PREFIX}{step:08d}.tmp"


def save_checkpoint(
    output_dir: str | Path, engine, optimizer: torch.optim.Optimizer, scheduler, state: dict, keep: int = 1
) -> Path:
    """Write a checkpoint of step ``state["step"]`` (every rank calls this; the engine says who writes what)."""
    out = Path(output_dir)
    step = int(state["step"])
    final = out / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = _tmp_path(out, step)
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a run killed while writing this very step
        tmp.mkdir(parents=True)
    distributed.barrier()
    try:
        engine.save_tensors(tmp, optimizer)
        distributed.barrier()
        if distributed.is_main():
            rng_tensors, rng_meta = rng_state()
            save_file(rng_tensors, str(tmp / "rng.safetensors"))
            payload = {
                **state,
                "scheduler": scheduler.state_dict(),
                "rng": rng_meta,
                "world_size": distributed.rank_world()[1],
                "engine": engine.mode,
            }
            if engine.mode != "fsdp":
                payload["optimizer"] = engine.optimizer_meta
            (tmp / "state.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)  # the one step that makes the checkpoint exist
            for _, old in checkpoints(out)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except Exception as exc:  # noqa: BLE001 - a full disk, a lost mount: say where, and what is left
        if isinstance(exc, CheckpointError):
            raise
        left = [p.name for _, p in checkpoints(out)] if distributed.is_main() else []
        raise CheckpointError(
            f"could not write the checkpoint of step {step} to {final} ({type(exc).__name__}: "
            f"{exc}); the complete checkpoints left in {out}: {left or 'none'}. Free space or fix "
            f"the folder, then run again with {spelled('resume=True', '--resume', 'resume: true')}."
        ) from exc
    finally:
        if distributed.is_main() and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        distributed.barrier()
    return final


def earlier_run_files(output_dir: str | Path) -> list[str]:
    """What an earlier run left in ``output_dir`` that a new run would overwrite or mix with its own: checkpoint
    folders (complete or not), a non-empty ``metrics.jsonl``, TensorBoard event files."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = sorted(p.name for p in out.iterdir() if p.is_dir() and _NAME.match(p.name))
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    board = out / "tensorboard"
    if board.is_dir() and any(board.iterdir()):
        found.append("tensorboard/")
    return found


def check_checkpoint_dir(output_dir: Path, config: DistillConfig) -> None:
    """``output_dir`` (a run's :attr:`DistillConfig.output_dir`) must be a folder (or not exist yet), and a new
    run (``config.resume`` False) must not overwrite or mix with the files of an earlier one
    (:func:`earlier_run_files`): :class:`~compress.errors.ConfigError` for a file,
    :class:`~compress.errors.CheckpointError` when an earlier run left checkpoints, else
    :class:`~compress.errors.OutputExistsError`. Reads the folder, writes nothing."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(
            f"DistillConfig.output_dir={str(output_dir)!r} is a file, not a folder: choose a folder for "
            "the metrics and checkpoints"
        )
    if not config.resume:
        earlier = earlier_run_files(output_dir)
        if earlier:
            kind = CheckpointError if any(e.startswith("checkpoint-") for e in earlier) else OutputExistsError
            where = spelled(f"DistillConfig.output_dir={str(output_dir)!r}", f"--checkpoint-dir {str(output_dir)!r}")
            resume = spelled("resume=True", "--resume", "resume: true")
            raise kind(
                f"{where} holds an earlier run's {', '.join(earlier)}; a new run would overwrite them. Pass "
                f"{resume} to continue that run, or choose another output_dir (or delete that one): nothing is "
                "overwritten without being asked"
            )


def check_compatible(
    saved: dict, config: dict, world: int, mode: str, path: Path, total_steps: int | None = None
) -> None:
    """Refuse to resume a checkpoint made by a run that would not continue the same way."""
    config = json.loads(json.dumps(config))  # as state.json holds it (a layer_map's keys become strings)
    problems = []
    if saved.get("world_size", 1) != world:
        problems.append(f"world size {saved.get('world_size', 1)} -> {world}")
    if saved.get("engine", "single" if world == 1 else "ddp") != mode:
        problems.append(f"engine {saved.get('engine')} -> {mode}")
    old = saved.get("config", {})
    for key in sorted(set(old) | set(config)):
        if key not in RESUMABLE_CHANGES and old.get(key) != config.get(key):
            problems.append(f"{key} {old.get(key)!r} -> {config.get(key)!r}")
    step = saved.get("step")
    budget_changed = any(old.get(k) != config.get(k) for k in ("max_steps", "max_tokens"))
    if total_steps is not None and isinstance(step, int) and (budget_changed or step > total_steps):
        problems.append(
            f"the checkpoint is at step {step}, the budget of this run ends at step {total_steps}; a "
            "budget sets the learning-rate schedule, so it cannot change on resume"
        )
    if problems:
        raise CheckpointError(
            f"cannot resume from {path}: it was made by a different run ({'; '.join(problems)}). Resuming would not "
            "continue that run. Use the same settings and number of processes, or another output_dir to start "
            "over (or delete the checkpoint). Nothing was loaded."
        )


def find_resumable(
    output_dir: str | Path, *, config: dict, world: int, mode: str, total_steps: int
) -> tuple[Path, dict] | None:
    """The newest checkpoint in ``output_dir`` and its ``state.json``, checked before any work: readable, made
    by the same settings and number of processes, within this run's budget. None when there is none."""
    out = Path(output_dir)
    found = checkpoints(out)
    stray = [p.name for p in out.iterdir() if p.name.startswith(".checkpoint-")] if out.is_dir() else []
    if not found:
        if (out / "checkpoint").exists() or stray:
            raise CheckpointError(
                f"cannot resume from {out}: it holds no complete checkpoint-<step> folder "
                f"(found {sorted(stray) or ['checkpoint']}). Remove them to start over."
            )
        return None
    path = found[-1][1]
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot resume from {path}: state.json is unreadable ({exc}). Remove it to start over."
        ) from exc
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or state["step"] < 0:
        raise CheckpointError(
            f"cannot resume from {path}: state.json has no step count (step="
            f"{state.get('step') if isinstance(state, dict) else state!r}). Remove it to start over."
        )
    check_compatible(state, config, world, mode, path, total_steps)
    return path, state


def _check_state(path: Path, state: dict) -> dict[str, torch.Tensor]:
    """The non-tensor parts of a checkpoint (scheduler, data position, RNG), checked before anything is loaded;
    returns the RNG tensors."""
    problems = []
    if not isinstance(state.get("scheduler"), dict) or not isinstance(state["scheduler"].get("last_epoch"), int):
        problems.append("no scheduler state")
    data = state.get("data")
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), int) and data[k] >= 0 for k in ("epoch", "index", "served")
    ):
        problems.append(f"no data position (data={data!r})")
    if not isinstance(state.get("history"), list):
        problems.append("no metrics history")
    rng_meta = state.get("rng")
    if not isinstance(rng_meta, dict) or not isinstance(rng_meta.get("python"), list) or len(rng_meta["python"]) != 3:
        problems.append("no random-number state")
    try:
        rng = load_file(str(path / "rng.safetensors"))
    except Exception as exc:  # noqa: BLE001 - a missing or damaged file
        rng = {}
        problems.append(f"rng.safetensors is unreadable ({type(exc).__name__}: {exc})")
    if rng and ("torch" not in rng or rng["torch"].dtype != torch.uint8):
        problems.append("rng.safetensors has no torch generator state")
    if problems:
        raise CheckpointError(
            f"cannot resume from {path}: state.json is incomplete or damaged ({'; '.join(problems)})."
            " Remove it to start over. Nothing was loaded."
        )
    return rng


def restore_checkpoint(path: Path, state: dict, engine, optimizer: torch.optim.Optimizer, scheduler) -> dict:
    """Load a checkpoint :func:`find_resumable` returned into the engine's student, projections, optimizer,
    scheduler and the RNGs. Every part is checked against what it goes into (names, shapes, dtypes) before
    the first tensor is copied, so a checkpoint of another student fails with the model unchanged."""
    state = dict(state)
    rng = _check_state(path, state)
    try:
        engine.load_tensors(path, optimizer, state.pop("optimizer", None))
        scheduler.load_state_dict(state.pop("scheduler"))
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr  # the learning rate of the step being resumed, whatever the optimizer was built with
        set_rng_state(rng, state.pop("rng"))
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any damage means this checkpoint cannot be trusted
        raise CheckpointError(
            f"cannot resume from {path}: {type(exc).__name__}: {exc}. Remove it to start over."
        ) from exc
    return state


def load_checkpoint(
    output_dir: str | Path,
    engine,
    optimizer: torch.optim.Optimizer,
    scheduler,
    *,
    config: dict,
    world: int,
    total_steps: int | None = None,
) -> dict | None:
    """Restore the newest checkpoint into the engine's student, projections, optimizer and scheduler.

    Returns its ``state`` (step, history, data position), or None when ``output_dir`` holds no checkpoint.
    Settings that would change the run (batch size, sequence length, world size, budget, ...) are compared
    first and refused with :class:`~compress.errors.CheckpointError`; the model is not touched then.
    """
    found = find_resumable(
        output_dir,
        config=config,
        world=world,
        mode=engine.mode,
        total_steps=total_steps if total_steps is not None else 2**62,
    )
    return None if found is None else restore_checkpoint(*found, engine, optimizer, scheduler)


# --- replicated (one process, DDP) tensors -------------------------------------------------------------------


def save_replicated(path: Path, student: nn.Module, projections: nn.Module, optimizer) -> dict:
    """Rank 0 writes the whole student, projections and optimizer state; returns the optimizer's JSON part."""
    meta: dict = {}
    if distributed.is_main():
        save_model(student, str(path / "student.safetensors"))
        save_model(projections, str(path / "projections.safetensors"))
        opt_tensors, meta = _flatten_optimizer(optimizer.state_dict())
        save_file(opt_tensors, str(path / "optimizer.safetensors"))
    return meta


_ANOTHER = (
    "the checkpoint was made for another student (another shape or vocabulary). Resume with the student "
    "it was made for, or choose another output_dir (or delete the checkpoint) to start over. Nothing was "
    "loaded: the student is unchanged."
)


def _check_module_file(path: Path, name: str, module: nn.Module, what: str) -> dict[str, torch.Tensor]:
    """Read ``name`` and check it against ``module``'s state dict: the same tensor names (a tied weight is
    stored once), shapes and dtypes. Returns the tensors, copied into nothing yet."""
    where = path / name
    try:
        tensors = load_file(str(where))
    except Exception as exc:  # noqa: BLE001 - missing, truncated, not safetensors
        raise CheckpointError(
            f"cannot resume from {path}: {name} is unreadable ({type(exc).__name__}: {exc}). "
            "Remove the checkpoint to start over. Nothing was loaded."
        ) from exc
    expected = module.state_dict()
    for key, value in tensors.items():
        if key not in expected:
            raise CheckpointError(
                f"cannot resume from {path}: {name} has {key}, which this {what} does not have: " + _ANOTHER
            )
        want = expected[key]
        if tuple(value.shape) != tuple(want.shape) or value.dtype != want.dtype:
            raise CheckpointError(
                f"cannot resume from {path}: {name} has {key} of shape {tuple(value.shape)} "
                f"({value.dtype}), this {what} needs {tuple(want.shape)} ({want.dtype}): " + _ANOTHER
            )
    stored = {(expected[k].data_ptr(), tuple(expected[k].shape)) for k in tensors}
    missing = [k for k, v in expected.items() if k not in tensors and (v.data_ptr(), tuple(v.shape)) not in stored]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CheckpointError(f"cannot resume from {path}: {name} lacks {shown}, which this {what} has: " + _ANOTHER)
    return tensors


def _check_optimizer(path: Path, tensors: dict[str, torch.Tensor], meta, optimizer) -> dict:
    """The optimizer state of the checkpoint, checked against ``optimizer`` (groups, parameter counts, state
    shapes and dtypes); returns it ready for ``load_state_dict``."""
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def refuse(why: str) -> None:
        raise CheckpointError(f"cannot resume from {path}: optimizer.safetensors {why}: " + _ANOTHER)

    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("param_groups"), list)
        or not isinstance(meta.get("scalars"), dict)
    ):
        raise CheckpointError(
            f"cannot resume from {path}: state.json has no optimizer state. Remove the "
            "checkpoint to start over. Nothing was loaded."
        )
    groups = [len(g.get("params", [])) if isinstance(g, dict) else -1 for g in meta["param_groups"]]
    trained = [len(g["params"]) for g in optimizer.param_groups]
    if groups != trained:
        refuse(f"holds parameter groups of {groups} tensors, this run trains {trained}")
    for key, value in tensors.items():
        idx, _, slot = key.rpartition(".")
        if not idx.isdigit() or int(idx) >= len(params):
            refuse(f"has state {key!r} for a parameter this run does not train")
        param = params[int(idx)]
        if value.dim() > 0 and (tuple(value.shape) != tuple(param.shape) or value.dtype != param.dtype):
            refuse(
                f"has {slot} of parameter {idx} with shape {tuple(value.shape)} ({value.dtype}), the parameter "
                f"is {tuple(param.shape)} ({param.dtype})"
            )
    for idx in meta["scalars"]:
        if not str(idx).isdigit() or int(idx) >= len(params):
            refuse(f"has state for parameter {idx}, which this run does not train")
    return _unflatten_optimizer(tensors, meta)


def load_replicated(path: Path, student: nn.Module, projections: nn.Module, optimizer, meta: dict | None) -> None:
    """Check every tensor first (student, projections, optimizer: names, shapes, dtypes), then load: a
    checkpoint of another student fails before any tensor is copied."""
    student_tensors = _check_module_file(path, "student.safetensors", student, "student")
    projection_tensors = _check_module_file(path, "projections.safetensors", projections, "run's projections")
    try:
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(
            f"cannot resume from {path}: optimizer.safetensors is unreadable "
            f"({type(exc).__name__}: {exc}). Remove the checkpoint to start over. Nothing was "
            "loaded."
        ) from exc
    optimizer_state = _check_optimizer(path, opt_tensors, meta, optimizer)
    with torch.no_grad():
        student.load_state_dict(student_tensors, strict=False)  # checked above: only tied copies are absent
        projections.load_state_dict(projection_tensors, strict=False)
    optimizer.load_state_dict(optimizer_state)


# --- sharded (FSDP2) tensors ----------------------------------------------------------------------------------


def _sharded_state(module: nn.Module, optimizer) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    unique = {name for name, _ in module.named_parameters()}
    tied = {name for name, _ in module.named_parameters(remove_duplicate=False)} - unique
    # A tied weight (embedding = LM head) is stored once, under the name named_parameters() gives it.
    # (a model's state dict holds tensors, DTensors under FSDP2; the library types every value it may hold)
    flat = {f"model.{k}": cast(torch.Tensor, v) for k, v in get_model_state_dict(module).items() if k not in tied}
    optim = get_optimizer_state_dict(module, optimizer)
    state = cast("dict[str, dict[str, Any]]", optim["state"])  # parameter fqn -> {name: tensor or number}
    for fqn, per_param in state.items():
        for name, value in per_param.items():
            flat[f"optim.{fqn}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return flat


def save_sharded(path: Path, module: nn.Module, optimizer) -> None:
    """Every rank writes its own shards (``torch.distributed.checkpoint``, safetensors files + JSON index)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(
        _sharded_state(module, optimizer),
        storage_writer=dcp.HuggingFaceStorageWriter(str(path / "sharded"), save_distributed=True),
    )


def load_sharded(path: Path, module: nn.Module, optimizer) -> None:
    """Load the shards into the (already sharded) module and an optimizer that has stepped zero times."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    _init_optimizer_state(optimizer)
    flat = _sharded_state(module, optimizer)
    dcp.load(flat, storage_reader=dcp.HuggingFaceStorageReader(str(path / "sharded")))
    loaded: dict[str, ValueType] = {k[len("model.") :]: v for k, v in flat.items() if k.startswith("model.")}
    set_model_state_dict(module, loaded, options=StateDictOptions(strict=False))  # tied copies follow
    optim = get_optimizer_state_dict(module, optimizer)
    state = cast("dict[str, dict[str, Any]]", optim["state"])  # parameter fqn -> {name: tensor or number}
    for fqn, per_param in state.items():
        for name in list(per_param):
            value = flat[f"optim.{fqn}.{name}"]
            per_param[name] = value if torch.is_tensor(per_param[name]) else type(per_param[name])(value.item())
    set_optimizer_state_dict(module, optimizer, optim)


def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state tensors (zeros) without changing any parameter, so they can be loaded into."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and not optimizer.state.get(p):
                p.grad = torch.zeros_like(p)
    saved = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    with torch.no_grad():
        backup = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]
        optimizer.step()
        for p, b in zip((p for g in optimizer.param_groups for p in g["params"]), backup):
            p.copy_(b)
    for g, lr in zip(optimizer.param_groups, saved):
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
