"""A small, deterministic distillation job for `torchrun` launches (and plain one-process runs) in the tests.

Every rank writes ``rank<r>.json`` into ``--report-dir``: the report, a digest of its teacher, and whether it
stopped with an error (and which). Rank 0 also writes the trained student as ``student.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))

from distill_job import make_pair  # noqa: E402

from compress import distributed  # noqa: E402
from compress.distillation import DistillConfig, distill  # noqa: E402
from compress.distillation.parallel import Engine  # noqa: E402
from compress.errors import CompressError  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--report-dir", required=True)
    p.add_argument("--out", default=None, help="DistillConfig.output_dir")
    p.add_argument("--parallel", default="auto")
    p.add_argument("--shard-teacher", action="store_true")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4, help="per process")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--step-delay", type=float, default=0.0)
    p.add_argument("--hidden", action="store_true")
    p.add_argument("--teacher-correction", type=int, default=0)
    p.add_argument("--nan-rank", type=int, default=-1, help="this rank's student output becomes NaN ...")
    p.add_argument("--nan-step", type=int, default=0, help="... from this forward pass on")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--student-dtype", default="fp32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing per decoder layer")
    a = p.parse_args()

    torch.set_num_threads(1)
    rank, world = distributed.init()
    teacher, student, data = make_pair()
    if a.student_dtype == "bf16":
        student.to(torch.bfloat16)
    if a.step_delay:
        student.model.embed_tokens.register_forward_pre_hook(lambda *_: time.sleep(a.step_delay))
    if rank == a.nan_rank:
        calls = {"n": 0}

        def poison(_module, _args, out):
            calls["n"] += 1
            return out * float("nan") if calls["n"] >= a.nan_step else None

        student.model.layers[0].register_forward_hook(poison)
    cfg = DistillConfig(max_steps=a.steps, max_tokens=a.max_tokens, batch_size=a.batch_size, seq_len=a.seq_len,
                        lr=2e-3, warmup_steps=2, hidden_loss="cosine" if a.hidden else None, output_dir=a.out,
                        checkpoint_every=a.checkpoint_every, resume=a.resume, progress=False, log_every=1,
                        parallel=a.parallel, shard_teacher=True if a.shard_teacher else None, dtype=a.dtype,
                        teacher_correction_steps=a.teacher_correction, compile=a.compile,
                        gradient_checkpointing=a.checkpointing)
    out = Path(a.report_dir)
    record: dict = {"rank": rank, "world": world}
    trunks = []  # the teacher as the engine runs it, to check that a sharded teacher stays sharded
    place_teacher = Engine.place_teacher

    def spy(self, *args, **kwargs):
        trunks.append(place_teacher(self, *args, **kwargs))
        return trunks[-1]

    Engine.place_teacher = spy
    try:
        report = distill(student, teacher, data, cfg)
        record["report"] = report.to_dict()
        record["student_dtype"] = str(next(student.parameters()).dtype)
        from torch.distributed.tensor import DTensor

        layers = trunks[0].model.model.layers
        record["teacher_layers_sharded_after_run"] = all(isinstance(p, DTensor) for p in layers.parameters())
        if rank == 0:
            from safetensors.torch import save_model

            save_model(student, str(out / "student.safetensors"))
    except CompressError as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["teacher_digest"] = float(sum(p.double().sum() for p in teacher.parameters()))
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
