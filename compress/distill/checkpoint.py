"""Training checkpoints as safetensors + JSON (never pickle), written atomically.

A checkpoint folder holds ``student.safetensors``, ``projections.safetensors``, ``optimizer.safetensors`` (every
tensor of the optimizer state, flattened) and ``state.json`` (step, data position, scheduler, optimizer
hyper-parameters, RNG states, metrics so far). It is written to a temporary sibling and renamed into place,
so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from ..errors import CheckpointError
from ..io import atomic_output_dir

CHECKPOINT_DIR = "checkpoint"


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
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
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
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(output_dir: str | Path, student: nn.Module, projections: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler, state: dict) -> Path:
    path = Path(output_dir) / CHECKPOINT_DIR
    with atomic_output_dir(path, overwrite=True) as tmp:
        save_model(student, str(tmp / "student.safetensors"))
        save_model(projections, str(tmp / "projections.safetensors"))
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        payload = {**state, "optimizer": opt_meta, "scheduler": scheduler.state_dict(), "rng": rng_meta}
        (tmp / "state.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return path


def load_checkpoint(output_dir: str | Path, student: nn.Module, projections: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler) -> dict | None:
    """Restore everything saved by :func:`save_checkpoint`; returns its ``state`` or None if there is none."""
    path = Path(output_dir) / CHECKPOINT_DIR
    if not (path / "state.json").is_file():
        return None
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        load_model(student, str(path / "student.safetensors"))
        load_model(projections, str(path / "projections.safetensors"))
        optimizer.load_state_dict(_unflatten_optimizer(load_file(str(path / "optimizer.safetensors")),
                                                       state.pop("optimizer")))
        scheduler.load_state_dict(state.pop("scheduler"))
        set_rng_state(load_file(str(path / "rng.safetensors")), state.pop("rng"))
    except Exception as exc:  # noqa: BLE001 - any damage means this checkpoint cannot be trusted
        raise CheckpointError(f"cannot resume from {path}: {type(exc).__name__}: {exc}. Remove it to start over.") from exc
    return state
