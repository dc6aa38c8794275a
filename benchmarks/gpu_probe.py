"""Diagnostics for the GPU distillation step (issue 8): where host syncs come from, and how tokens/s and MFU move
with batch size and step count. Run on a lent GPU after gpu_check.py:

    python benchmarks/gpu_probe.py --out gpu_probe.json
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check  # noqa: E402


def run(batch: int, steps: int, compile_: bool) -> dict:
    from compress.distillation import DistillConfig, distill

    spec = dict(gpu_check.SHAPES["gpu"])
    device = torch.device("cuda")
    torch.manual_seed(0)
    student = gpu_check.build(spec["student"], spec["vocab"], device)
    teacher = gpu_check.build(spec["teacher"], spec["vocab"], device)
    warm = 3
    data = torch.randint(0, spec["vocab"], ((warm + steps) * batch, spec["seq"]),
                         generator=torch.Generator().manual_seed(1))
    cfg = DistillConfig(max_steps=warm + steps, batch_size=batch, seq_len=spec["seq"], lr=1e-4, warmup_steps=1,
                        log_every=warm, compile=compile_, progress=False)
    sites: collections.Counter = collections.Counter()
    torch.cuda.reset_peak_memory_stats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            report = distill(student, teacher, data, cfg)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        if "synchroniz" in str(w.message):
            sites[f"{Path(w.filename).name}:{w.lineno}"] += 1
    first, last = report.losses[0], report.losses[-1]
    tps = (last["step"] - first["step"]) * cfg.tokens_per_step / max(last["elapsed_s"] - first["elapsed_s"], 1e-9)
    flops = 6 * gpu_check.n_params(student) + 2 * gpu_check.n_params(teacher)
    out = {"batch": batch, "steps": steps, "compile": compile_, "tokens_per_s": round(tps, 1),
           "mfu": round(tps * flops / 989.4e12, 4), "peak_memory_mib": report.peak_memory_mib,
           "plan_mib": report.memory_plan["total_mib"], "syncs": sum(sites.values()),
           "sync_sites": sites.most_common(12)}
    print(json.dumps(out), flush=True)
    del student, teacher, report
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=None)
    p.add_argument("--profile", action="store_true", help="only print the top CUDA kernels of an eager run")
    args = p.parse_args()
    if args.profile:
        print(profile())
        return 0
    rows = []
    for batch, steps, comp in [(4, 6, False), (4, 12, False), (8, 9, True), (2, 9, True)]:
        try:
            rows.append(run(batch, steps, comp))
        except Exception as exc:  # noqa: BLE001
            rows.append({"batch": batch, "steps": steps, "error": f"{type(exc).__name__}: {exc}"})
            print(rows[-1], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0



def profile(batch: int = 4, steps: int = 4) -> str:
    """Top CUDA kernels of an eager run (setup included; the kernels of the training steps dominate)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from compress.distillation import DistillConfig, distill

    spec = gpu_check.SHAPES["gpu"]
    torch.manual_seed(0)
    student = gpu_check.build(spec["student"], spec["vocab"], "cuda")
    teacher = gpu_check.build(spec["teacher"], spec["vocab"], "cuda")
    data = torch.randint(0, spec["vocab"], (steps * batch, spec["seq"]))
    cfg = DistillConfig(max_steps=steps, batch_size=batch, seq_len=spec["seq"], lr=1e-4, warmup_steps=1,
                        log_every=steps, progress=False)
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        distill(student, teacher, data, cfg)
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)


if __name__ == "__main__":
    sys.exit(main())
