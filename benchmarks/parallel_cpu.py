"""One process vs DDP vs FSDP on the CPU (gloo), on the real teacher: speed, memory per rank, and the memory
plan against what each rank really used.

    python benchmarks/parallel_cpu.py --out benchmarks/results/parallel_cpu.json

The student is SmolLM2-135M-Instruct pruned to half its parameters (width, activation importance); it is
distilled for a few steps on pydocs train with the same global batch in every configuration (one process:
batch 8; two processes: batch 4 each, one thread each). Per rank it records:

* tokens/s (steady state: between the first and the last logged step);
* the student's training state this rank holds (weights + gradients + AdamW state, measured on the tensors);
* the peak resident memory added by ``distill()`` (Linux ``VmHWM`` after resetting it just before the call);
* the memory plan's estimate of the same thing (its total, less what was resident before the call: the
  teacher and, without FSDP, the student's weights).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STEPS, SEQ, GLOBAL_BATCH = 6, 256, 8


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(student_dir: str, parallel: str, shard_teacher: bool, checkpointing: bool, out: str) -> None:
    import torch

    import compress
    from compress import distributed
    from compress.data import default_calibration_source, pack_tokens
    from compress.distillation import DistillConfig, distill

    rank, world = distributed.init()
    torch.set_num_threads(2 if world == 1 else 1)
    teacher, tok = compress.load_teacher("smollm2")
    student, _ = compress.load_teacher(student_dir)
    windows = pack_tokens(tok, default_calibration_source(), SEQ, max_windows=STEPS * GLOBAL_BATCH,
                          skip_tokens=64 * 512)
    cfg = DistillConfig(max_steps=STEPS, batch_size=GLOBAL_BATCH // world, seq_len=SEQ, lr=5e-4, warmup_steps=1,
                        log_every=1, parallel=parallel, shard_teacher=shard_teacher or None,
                        gradient_checkpointing=checkpointing, progress=False)
    before = _rss_mib()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    report = distill(student, teacher, windows, cfg)
    peak_added = _hwm_mib() - before
    first, last = report.losses[0], report.losses[-1]
    tps = (last["step"] - first["step"]) * cfg.tokens_per_step * world / (last["elapsed_s"] - first["elapsed_s"])
    plan = report.memory_plan
    resident = plan["teacher_mib"] if not report.engine["shard_teacher"] else 0.0
    if report.engine["mode"] != "fsdp":
        resident += sum(p.numel() * 4 for p in student.parameters()) / 2**20
    result = {"rank": rank, "world": world, "engine": report.engine["mode"],
              "shard_teacher": report.engine["shard_teacher"], "gradient_checkpointing": checkpointing,
              "tokens_per_s": round(tps, 1), "training_state_mib": report.engine["training_state_mib"],
              "peak_rss_added_mib": round(peak_added, 1), "plan_added_mib": round(plan["total_mib"] - resident, 1),
              "plan": plan, "losses": [h["loss"] for h in report.losses]}
    Path(out).with_suffix(f".rank{rank}.json").write_text(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run(student_dir: str, nproc: int, parallel: str, shard: bool = False, checkpointing: bool = False) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "r")
        args = [__file__, "--worker", student_dir, "--parallel", parallel, "--result", out]
        args += ["--shard-teacher"] if shard else []
        args += ["--checkpointing"] if checkpointing else []
        env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else "2", "PYTHONWARNINGS": "ignore"}
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
        else:
            cmd = [sys.executable, *args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-4000:])
        return [json.loads(Path(out).with_suffix(f".rank{r}.json").read_text()) for r in range(nproc)]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None)
    p.add_argument("--parallel", default="auto")
    p.add_argument("--shard-teacher", action="store_true")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--result", default=None)
    a = p.parse_args()
    if a.worker:
        worker(a.worker, a.parallel, a.shard_teacher, a.checkpointing, a.result)
        return 0

    import compress

    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        teacher, tok = compress.load_teacher("smollm2")
        compress.prune(teacher, {"params": 0.5}, compress.data.default_calibration_source(), tokenizer=tok,
                       calibration=compress.CalibrationConfig(num_samples=64, seq_len=512))
        compress.save_student(teacher, tok, Path(tmp) / "student")
        del teacher
        configs = [("single", 1, "auto", False, False), ("single + checkpointing", 1, "auto", False, True),
                   ("ddp x2", 2, "ddp", False, False), ("fsdp x2", 2, "fsdp", False, False),
                   ("fsdp x2 + sharded teacher", 2, "fsdp", True, False)]
        rows = []
        for name, nproc, parallel, shard, ckpt in configs:
            ranks = run(str(Path(tmp) / "student"), nproc, parallel, shard, ckpt)
            rows.append({"config": name, "ranks": ranks})
            r0 = ranks[0]
            print(f"{name:<28} {r0['tokens_per_s']:>8,.0f} tok/s  state {r0['training_state_mib']:>7,.1f} MiB/rank  "
                  f"peak +{max(r['peak_rss_added_mib'] for r in ranks):>7,.0f} MiB/rank (plan +{r0['plan_added_mib']:,.0f})"
                  f"  losses {r0['losses'][0]:.3f} -> {r0['losses'][-1]:.3f}", flush=True)
    result = {"machine": os.uname().machine, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
              "steps": STEPS, "seq_len": SEQ, "global_batch": GLOBAL_BATCH, "rows": rows,
              "seconds": round(time.time() - t0, 1)}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
