"""Issue 12's techniques on a GPU: each runs once on CUDA (bf16 compute), with its speed, so the CUDA paths are
not only tested on CPU. Random SmolLM2-135M-shaped teacher (no files needed), a 50%-width student pruned from
it with random calibration tokens; every part is independent and reports its own error if it fails.

    python benchmarks/gpu_issue12_check.py --out gpu_issue12.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import compress
from compress.distillation import DistillConfig, distill
from compress.distillation.teacher_cache import build_teacher_cache


def teacher_model(device, tiny: bool = False) -> torch.nn.Module:
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2) if tiny else \
        dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30)
    cfg = LlamaConfig(vocab_size=49152, num_attention_heads=9 if not tiny else 4, num_key_value_heads=3 if not tiny
                      else 2, head_dim=64 if not tiny else 16, tie_word_embeddings=True, max_position_embeddings=2048,
                      **sizes)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device).eval()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tiny", action="store_true", help="a tiny teacher (a CPU smoke test of this script)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = teacher_model(device, args.tiny)
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, 49152, (16, 256), generator=g)
    data = torch.randint(0, 49152, (args.steps * 8 + 64, 256), generator=g)
    base = copy.deepcopy(teacher)
    report = compress.prune(base, {"params": 0.5}, calib, calibration=compress.CalibrationConfig(min_samples=4))
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "student_shape": report.shape_after}
    common = dict(max_steps=args.steps, batch_size=8, seq_len=256, lr=5e-4, progress=False, log_every=5)

    def run(name, fn):
        t = time.perf_counter()
        try:
            out = fn()
            results[name] = {**out, "seconds": round(time.perf_counter() - t, 2)}
        except Exception as exc:  # noqa: BLE001 - report and go on
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-1500:]}
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "trace"}), flush=True)

    def kd(**changes):
        student = copy.deepcopy(base)
        d = distill(student, teacher, data, DistillConfig(**{**common, **changes}))
        return {"tokens_per_s": d.tokens_per_second, "first_kd": d.losses[0]["kd"], "last_kd": d.losses[-1]["kd"],
                "objective": d.objective, "peak_mib": d.peak_memory_mib}

    run("online_kd", kd)
    run("skew_kd", lambda: kd(logit_loss="skew_forward_kl"))
    run("on_policy", lambda: kd(logit_loss="jsd", on_policy_fraction=0.5))
    with tempfile.TemporaryDirectory() as tmp:
        def cache():
            built = build_teacher_cache(teacher, data, Path(tmp) / "cache", top_k=64, progress=False)
            out = kd(teacher_cache=str(Path(tmp) / "cache"))
            return {**out, "build_tokens_per_s": built.tokens_per_second, "bytes_per_token": built.bytes_per_token}
        run("cache_kd", cache)

    def refit():
        from compress.pruning.reconstruct import reconstruct

        student = copy.deepcopy(base)
        r = reconstruct(student, teacher, calib, kept=report.kept)
        return {"totals": r.totals}
    run("reconstruct", refit)

    def search():
        short = DistillConfig(max_tokens=8 * 256 * 4, seq_len=256, batch_size=8, lr=5e-4, progress=False)
        found = compress.search_shapes(teacher, {"params": 0.5}, calib, train_data=data, tokenizer=None,
                                       config=compress.SearchConfig(candidates=2, tokens_per_candidate=8 * 256 * 4,
                                                                    eval_windows=4, distill=short, progress=False))
        return {"scores": [c.score for c in found.candidates], "best": found.best}
    run("search", search)

    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 1 if any("error" in v for v in results.values() if isinstance(v, dict)) else 0


if __name__ == "__main__":
    sys.exit(main())
