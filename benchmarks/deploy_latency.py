"""Deployment speed on CPU with onnxruntime: teacher vs ~50% student, fp32 and int8, side by side in one run.

For each model: prefill of 512 tokens and greedy decode of 128 tokens (median of --runs runs), the ONNX file
size, and perplexity on pydocs valid (first 4,096 tokens, 512-token windows) computed by onnxruntime.
The student is pruned here from the real teacher (or given with --student, e.g. a distilled one).

    python benchmarks/deploy_latency.py --runs 3 --out benchmarks/results/deploy_latency_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compress  # noqa: E402
from compress.data import PYDOCS_TRAIN, PYDOCS_VALID  # noqa: E402
from compress.export.onnx import INT8_DIR, ONNX_DIR, load_ort, ort_perplexity  # noqa: E402

from _common import machine  # noqa: E402


def latency(ort_model, prompt: torch.Tensor, new_tokens: int, runs: int) -> dict:
    mask = torch.ones_like(prompt)
    prefill, total = [], []
    ort_model(input_ids=prompt, attention_mask=mask)  # warm-up
    for _ in range(runs):
        t = time.perf_counter()
        ort_model(input_ids=prompt, attention_mask=mask)
        prefill.append(time.perf_counter() - t)
        t = time.perf_counter()
        out = ort_model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        total.append(time.perf_counter() - t)
        assert out.shape[1] == prompt.shape[1] + new_tokens
    p, g = statistics.median(prefill), statistics.median(total)
    decode = max(g - p, 1e-9)
    return {"prefill_s": round(p, 4), "generate_s": round(g, 4), "decode_s": round(decode, 4),
            "decode_tokens_per_s": round(new_tokens / decode, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--student", default=None, help="exported/saved student folder (default: prune one here)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--out", default="benchmarks/results/deploy_latency_cpu.json")
    args = ap.parse_args()

    teacher, tok = compress.load_teacher("smollm2")
    if args.student:
        student, _ = compress.load_teacher(args.student)
        origin = args.student
    else:
        import copy
        student = copy.deepcopy(teacher)
        compress.prune(student, {"params": 0.5}, PYDOCS_TRAIN, tokenizer=tok,
                       calibration_config=compress.CalibrationConfig(num_samples=args.calib_samples))
        origin = "pruned here (activation importance, no training)"
    prompt = compress.data.pack_tokens(tok, PYDOCS_VALID, args.prefill, max_windows=1)
    results = {"machine": machine(), "date": str(date.today()), "args": vars(args), "student": origin, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in (("teacher", teacher), ("student", student)):
            out = Path(tmp) / name
            report = compress.export(model, tok, out, formats=["onnx"], quantize="int8", eval_tokens=args.eval_tokens,
                                     eval_data=PYDOCS_VALID)
            for variant, folder in (("fp32", ONNX_DIR), ("int8", INT8_DIR)):
                ort = load_ort(out / folder)
                size = sum(f.stat().st_size for f in (out / folder).glob("model.onnx*"))
                entry = {"params": report.params, "onnx_mib": round(size / 2**20, 1),
                         "ppl_pydocs": report.int8["ppl_fp32" if variant == "fp32" else "ppl_int8"],
                         "parity_max_abs_diff": report.parity["max_abs_diff"],
                         **latency(ort, prompt, args.decode, args.runs)}
                results["models"][f"{name}-{variant}"] = entry
                print(name, variant, entry, flush=True)
    m = results["models"]
    ratios = {
        "student_fp32_decode_speedup_vs_teacher_fp32": m["student-fp32"]["decode_tokens_per_s"] / m["teacher-fp32"]["decode_tokens_per_s"],
        "student_fp32_prefill_speedup_vs_teacher_fp32": m["teacher-fp32"]["prefill_s"] / m["student-fp32"]["prefill_s"],
        "student_int8_decode_speedup_vs_student_fp32": m["student-int8"]["decode_tokens_per_s"] / m["student-fp32"]["decode_tokens_per_s"],
        "student_int8_ppl_change": m["student-int8"]["ppl_pydocs"] / m["student-fp32"]["ppl_pydocs"] - 1,
        "teacher_int8_decode_speedup": m["teacher-int8"]["decode_tokens_per_s"] / m["teacher-fp32"]["decode_tokens_per_s"],
        "teacher_int8_ppl_change": m["teacher-int8"]["ppl_pydocs"] / m["teacher-fp32"]["ppl_pydocs"] - 1,
    }
    results["ratios"] = {k: round(v, 3) for k, v in ratios.items()}
    print(json.dumps(results["ratios"], indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print("\n| model | params | ONNX MiB | prefill 512 (s) | decode tok/s | PPL pydocs |")
    print("|---|---|---|---|---|---|")
    for name, e in m.items():
        print(f"| {name} | {e['params']:,} | {e['onnx_mib']} | {e['prefill_s']} | {e['decode_tokens_per_s']} | "
              f"{e['ppl_pydocs']:.2f} |")


if __name__ == "__main__":
    main()
