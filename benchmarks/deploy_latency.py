"""Deployment speed on CPU with onnxruntime: teacher vs ~50% students, fp32 and int8, side by side in one run.

For each model: prefill of 512 tokens and greedy decode of 128 tokens through ``ORTModelForCausalLM.generate``
(median of --runs runs); the bare onnxruntime time of one decode step at a 512-token context (median of 20,
no Python generation loop around it); the ONNX file size; and perplexity on pydocs valid (first 4,096 tokens,
512-token windows) computed by onnxruntime.

Students are pruned here from the real teacher to 50% of its parameters, one per ``--strategies`` entry
(``width``: the planner's shape; ``depth``: the contiguous layer block the search removes), or given with
``--student DIR`` (e.g. a distilled one). "int8" is the library's recipe (blockwise int8 MatMulNBits, LM head
included); "int8-dynamic" is the textbook baseline it replaced, ``onnxruntime.quantization.quantize_dynamic``
with default settings (per-tensor activation scales), run on the width student for comparison.

    python benchmarks/deploy_latency.py --runs 3 --out benchmarks/results/deploy_latency_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compress  # noqa: E402
from compress.data import PYDOCS_TRAIN, PYDOCS_VALID  # noqa: E402
from compress.evaluate import eval_windows  # noqa: E402
from compress.export.onnx import INT8_DIR, ONNX_DIR, load_ort, ort_perplexity  # noqa: E402

from _common import machine  # noqa: E402


def latency(ort_model, prompt: torch.Tensor, new_tokens: int, runs: int) -> dict:
    """Prefill and greedy generation through optimum's ORTModelForCausalLM, as a user would run it."""
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
    decode = max(g - p, 1e-9)  # the first new token comes from the prefill; the rest are decode steps
    return {"prefill_s": round(p, 4), "generate_s": round(g, 4), "decode_s": round(decode, 4),
            "decode_tokens_per_s": round((new_tokens - 1) / decode, 2)}


def decode_step_ms(onnx_file: Path, config, context: int, repeats: int = 20) -> float:
    """Bare onnxruntime time of one cached decode step after ``context`` tokens (random past key values)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    past = np.random.default_rng(0).standard_normal(
        (1, config.num_key_value_heads, context, head_dim)).astype(np.float32)
    feeds = {"input_ids": np.array([[42]], dtype=np.int64),
             "attention_mask": np.ones((1, context + 1), dtype=np.int64),
             "position_ids": np.array([[context]], dtype=np.int64)}
    names = [i.name for i in session.get_inputs()]
    feeds = {k: v for k, v in feeds.items() if k in names}
    feeds.update({n: past for n in names if n.startswith("past_key_values")})
    for _ in range(3):
        session.run(None, feeds)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1000, 2)


def dynamic_int8(onnx_dir: Path, out_dir: Path) -> Path:
    """Baseline: onnxruntime's default dynamic quantization (int8 weights, per-tensor uint8 activations)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_dir.mkdir()
    for f in onnx_dir.iterdir():
        if f.suffix != ".onnx" and not f.name.endswith(".onnx_data"):
            shutil.copy2(f, out_dir / f.name)
    quantize_dynamic(str(onnx_dir / "model.onnx"), str(out_dir / "model.onnx"), weight_type=QuantType.QInt8)
    return out_dir


def students(teacher, tok, args) -> dict:
    if args.student:
        return {"student": (compress.load_teacher(args.student)[0], args.student)}
    calib = compress.CalibrationConfig(num_samples=args.calib_samples)
    out = {}
    for strategy in args.strategies.split(","):
        student = copy.deepcopy(teacher)
        plugins = {"depth": {"eval_samples": 8}} if strategy == "depth" else None
        report = compress.prune(student, {"params": 0.5}, PYDOCS_TRAIN, tokenizer=tok, strategy=strategy,
                                calibration_config=calib, plugins=plugins)
        out[f"student-{strategy}"] = (student, f"pruned here, {strategy}, activation importance, no training; "
                                               f"shape {report.shape_after}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--strategies", default="width,depth", help="students to prune here, one per strategy")
    ap.add_argument("--student", default=None, help="exported/saved student folder instead of pruning here")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--out", default="benchmarks/results/deploy_latency_cpu.json")
    args = ap.parse_args()

    teacher, tok = compress.load_teacher("smollm2")
    models = {"teacher": (teacher, "SmolLM2-135M-Instruct"), **students(teacher, tok, args)}
    prompt = compress.data.pack_tokens(tok, PYDOCS_VALID, args.prefill, max_windows=1)
    results = {"machine": machine(), "date": str(date.today()), "args": vars(args),
               "origin": {k: v[1] for k, v in models.items()}, "models": {}}
    first_student = next(k for k in models if k != "teacher")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, _) in models.items():
            out = Path(tmp) / name
            report = compress.export(model, tok, out, formats=["onnx"], quantize="int8", eval_tokens=args.eval_tokens,
                                     eval_data=PYDOCS_VALID)
            variants = [("fp32", ONNX_DIR), ("int8", INT8_DIR)]
            if name == first_student:
                dynamic_int8(out / ONNX_DIR, out / "onnx-int8-dynamic")
                variants.append(("int8-dynamic", "onnx-int8-dynamic"))
            for variant, folder in variants:
                ort = load_ort(out / folder)
                size = sum(f.stat().st_size for f in (out / folder).glob("model.onnx*"))
                ppl = {"fp32": report.int8["ppl_fp32"], "int8": report.int8["ppl_int8"]}.get(variant)
                if ppl is None:
                    ppl = ort_perplexity(ort, eval_windows(tok, PYDOCS_VALID, 512, args.eval_tokens))
                entry = {"params": report.params, "layers": model.config.num_hidden_layers,
                         "onnx_mib": round(size / 2**20, 1), "ppl_pydocs": ppl,
                         "parity_max_abs_diff": report.parity["max_abs_diff"],
                         "decode_step_ms": decode_step_ms(out / folder / "model.onnx", model.config, args.prefill),
                         **latency(ort, prompt, args.decode, args.runs)}
                results["models"][f"{name}-{variant}"] = entry
                print(name, variant, entry, flush=True)
    m = results["models"]
    ratios = {}
    for name in models:
        fp32, int8 = m[f"{name}-fp32"], m[f"{name}-int8"]
        if name != "teacher":
            teacher_fp32 = m["teacher-fp32"]
            ratios[f"{name}_fp32_decode_speedup_vs_teacher_fp32"] = fp32["decode_tokens_per_s"] / teacher_fp32["decode_tokens_per_s"]
            ratios[f"{name}_fp32_step_speedup_vs_teacher_fp32"] = teacher_fp32["decode_step_ms"] / fp32["decode_step_ms"]
            ratios[f"{name}_fp32_prefill_speedup_vs_teacher_fp32"] = teacher_fp32["prefill_s"] / fp32["prefill_s"]
        ratios[f"{name}_int8_decode_speedup_vs_fp32"] = int8["decode_tokens_per_s"] / fp32["decode_tokens_per_s"]
        ratios[f"{name}_int8_step_speedup_vs_fp32"] = fp32["decode_step_ms"] / int8["decode_step_ms"]
        ratios[f"{name}_int8_ppl_change"] = int8["ppl_pydocs"] / fp32["ppl_pydocs"] - 1
    dyn = m[f"{first_student}-int8-dynamic"]
    ratios[f"{first_student}_int8_dynamic_decode_speedup_vs_fp32"] = dyn["decode_tokens_per_s"] / m[f"{first_student}-fp32"]["decode_tokens_per_s"]
    ratios[f"{first_student}_int8_dynamic_ppl_change"] = dyn["ppl_pydocs"] / m[f"{first_student}-fp32"]["ppl_pydocs"] - 1
    results["ratios"] = {k: round(v, 3) for k, v in ratios.items()}
    print(json.dumps(results["ratios"], indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print("\n| model | params | layers | ONNX MiB | prefill 512 (s) | generate: decode tok/s | bare step (ms) | PPL pydocs |")
    print("|---|---|---|---|---|---|---|---|")
    for name, e in m.items():
        print(f"| {name} | {e['params']:,} | {e['layers']} | {e['onnx_mib']} | {e['prefill_s']} | "
              f"{e['decode_tokens_per_s']} | {e['decode_step_ms']} | {e['ppl_pydocs']:.2f} |")


if __name__ == "__main__":
    main()
