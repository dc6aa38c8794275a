"""One test per defect of the first GPU-path review that does not need several processes: the device each rank
takes, a bf16 teacher with an fp32 hidden-state projection, a checkpoint save interrupted at any step, a
compiled run, and a run that would overwrite an earlier run's checkpoints."""

from __future__ import annotations

import copy
import importlib
import shutil
from pathlib import Path

import pytest
import torch

from compress import distributed
from compress.distillation import DistillConfig, distill
from compress.distillation.checkpoint import checkpoints, latest_checkpoint
from compress.errors import CheckpointError

from distill_job import make_pair


@pytest.mark.parametrize("env, asked, expected", [
    ({"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "4"}, None, 0),     # 2 nodes x 2 GPUs: rank 2 owns GPU 0
    ({"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}, "cuda", 1),   # a bare "cuda" is LOCAL_RANK's GPU too
    ({"RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "4"}, "cuda:2", 2),  # an explicit index is kept
])
def test_each_rank_takes_the_gpu_of_its_local_rank(monkeypatch, env, asked, expected):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(torch.device(d).index))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    device = distributed.resolve_device(asked)
    assert device == torch.device("cuda", expected)
    assert chosen == [expected]  # made current, so NCCL and tensors created without a device use it


def test_fp32_training_of_a_bf16_pair_with_a_hidden_projection():
    """dtype='fp32' with bf16 models and widths that differ used to fail with a raw dtype mismatch."""
    teacher, student, data = make_pair()
    teacher.to(torch.bfloat16)
    student.to(torch.bfloat16)
    cfg = DistillConfig(max_steps=2, batch_size=4, seq_len=32, hidden_loss="cosine", dtype="fp32", progress=False)
    report = distill(student, teacher, data, cfg)
    assert report.projection == "learned linear 48 -> 96"
    assert next(student.parameters()).dtype == torch.bfloat16  # handed back in its own dtype
    assert next(teacher.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("fail_at", range(6))
def test_a_checkpoint_save_killed_at_any_step_leaves_one_to_resume(tmp_path, monkeypatch, fail_at):
    """Die at the n-th file-system step of the second save: a complete checkpoint must remain."""
    teacher, student, data = make_pair()
    cfg = DistillConfig(max_steps=4, batch_size=4, seq_len=32, output_dir=str(tmp_path), checkpoint_every=2,
                        progress=False)
    calls = {"n": 0, "saves": 0}
    real_rename, real_rmtree = Path.rename, shutil.rmtree
    ckpt = importlib.import_module("compress.distillation.checkpoint")
    trainer = importlib.import_module("compress.distillation.trainer")

    real_save = ckpt.save_checkpoint

    def counting_save(*args, **kwargs):
        calls["saves"] += 1
        return real_save(*args, **kwargs)

    def dying(real):
        def fn(*args, **kwargs):
            if calls["saves"] == 2:
                if calls["n"] == fail_at:
                    raise KeyboardInterrupt("killed")
                calls["n"] += 1
            return real(*args, **kwargs)
        return fn

    monkeypatch.setattr(ckpt, "save_checkpoint", counting_save)
    monkeypatch.setattr(trainer, "save_checkpoint", counting_save)
    monkeypatch.setattr(Path, "rename", dying(real_rename))
    monkeypatch.setattr(ckpt.shutil, "rmtree", dying(real_rmtree))
    monkeypatch.setattr(ckpt, "save_file", dying(ckpt.save_file))
    try:
        distill(student, teacher, data, cfg)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) is not None
    step = checkpoints(tmp_path)[-1][0]
    assert step in (2, 4)
    _, student2, _ = make_pair()
    resumed = distill(student2, teacher, data, DistillConfig(**{**cfg.to_dict(), "resume": True}))
    assert resumed.resumed_from_step == step


def test_a_new_run_does_not_overwrite_an_earlier_runs_checkpoints(tmp_path):
    teacher, student, data = make_pair()
    cfg = DistillConfig(max_steps=2, batch_size=4, seq_len=32, output_dir=str(tmp_path), checkpoint_every=2,
                        progress=False)
    distill(copy.deepcopy(student), teacher, data, cfg)
    before = (tmp_path / "checkpoint-00000002" / "student.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="resume=True"):
        distill(student, teacher, data, cfg)
    assert (tmp_path / "checkpoint-00000002" / "student.safetensors").read_bytes() == before


def test_compiled_training_matches_eager(inductor):
    torch._dynamo.reset()
    runs = []
    for compiled in (False, True):
        teacher, student, data = make_pair()
        cfg = DistillConfig(max_steps=3, batch_size=4, seq_len=32, compile=compiled, hidden_loss="cosine",
                            log_every=1, progress=False)
        runs.append([h["loss"] for h in distill(student, teacher, data, cfg).losses])
    assert runs[1] == pytest.approx(runs[0], abs=1e-4)
