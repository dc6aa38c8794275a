"""A small, deterministic distillation job, run in subprocesses by the tests (resume after SIGKILL)."""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

from conftest import tiny_model  # noqa: E402

import compress  # noqa: E402
from compress.distillation import DistillConfig, distill  # noqa: E402


def make_pair():
    teacher = tiny_model("llama", seed=0)
    student = copy.deepcopy(teacher)
    ids = torch.randint(4, 320, (16, 32), generator=torch.Generator().manual_seed(1))
    compress.prune(student, {"hidden_size": 48, "intermediate_size": 64}, ids,
                   calibration_config=compress.CalibrationConfig(min_samples=4))
    data = torch.randint(4, 320, (64, 32), generator=torch.Generator().manual_seed(2))
    return teacher, student, data


def run(output_dir: str | None, batch_size: int, steps: int, resume: bool = False, checkpoint_every: int = 0,
        step_delay: float = 0.0, hidden: bool = True) -> tuple[dict, torch.nn.Module]:
    torch.set_num_threads(1)
    teacher, student, data = make_pair()
    if step_delay:
        student.model.embed_tokens.register_forward_pre_hook(lambda *_: time.sleep(step_delay))
    cfg = DistillConfig(max_steps=steps, batch_size=batch_size, seq_len=32, lr=2e-3, warmup_steps=2,
                        hidden_loss="cosine" if hidden else None, output_dir=output_dir,
                        checkpoint_every=checkpoint_every, resume=resume, progress=False, log_every=1)
    report = distill(student, teacher, data, cfg)
    return report.to_dict(), student


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--step-delay", type=float, default=0.0)
    p.add_argument("--report", required=True)
    a = p.parse_args()
    report, _ = run(a.out, 4, a.steps, a.resume, a.checkpoint_every, a.step_delay)
    with open(a.report, "w") as fh:
        json.dump(report, fh)
