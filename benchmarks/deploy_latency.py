"""Deployment speed on CPU with onnxruntime: teacher vs ~50% student, fp32 and int8, side by side in one run.

For each model: prefill of 512 tokens and greedy decode of 128 tokens (median of --runs runs), the ONNX file
size, and perplexity on pydocs valid (first 4,096 tokens, 512-token windows) computed by onnxruntime.
The student is pruned here from the real teacher (or given with --student, e.g. a distilled one).
"int8" is the library's recipe (blockwise int8 MatMulNBits, LM head included); "int8-dynamic" is the
textbook baseline it replaced, ``onnxruntime.quantization.quantize_dynamic`` with default settings
(per-tensor activation scales), run on the student for comparison.

    python benchmarks/deploy_latency.py --runs 3 --out benchmarks/results/deploy_latency_cpu.json
"""

from __future__ import annotations

import argparse
import json
import shutil
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


def dynamic_int8(onnx_dir: Path, out_dir: Path) -> Path:
    """Baseline: onnxruntime's default dynamic quantization (int8 weights, per-tensor uint8 activations)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_dir.mkdir()
    for f in onnx_dir.iterdir():
        if f.suffix != ".onnx":
            shutil.copy2(f, out_dir / f.name)
    quantize_dynamic(str(onnx_dir / "model.onnx"), str(out_dir / "model.onnx"), weight_type=QuantType.QInt8)
    return out_dir


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
            variants = [("fp32", ONNX_DIR), ("int8", INT8_DIR)]
            if name == "student":
                dynamic_int8(out / ONNX_DIR, out / "onnx-int8-dynamic")
                variants.append(("int8-dynamic", "onnx-int8-dynamic"))
            for variant, folder in variants:
                ort = load_ort(out / folder)
                size = sum(f.stat().st_size for f in (out / folder).glob("model.onnx*"))
                ppl = {"fp32": report.int8["ppl_fp32"], "int8": report.int8["ppl_int8"]}.get(variant)
                if ppl is None:
                    ppl = ort_perplexity(ort, tok, PYDOCS_VALID, max_tokens=args.eval_tokens)
                entry = {"params": report.params, "onnx_mib": round(size / 2**20, 1), "ppl_pydocs": ppl,
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
        "student_int8_dynamic_decode_speedup_vs_student_fp32": m["student-int8-dynamic"]["decode_tokens_per_s"] / m["student-fp32"]["decode_tokens_per_s"],
        "student_int8_dynamic_ppl_change": m["student-int8-dynamic"]["ppl_pydocs"] / m["student-fp32"]["ppl_pydocs"] - 1,
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
