"""Pruning quality on the real teacher: perplexity right after pruning (no training) for each importance method.

SmolLM2-135M-Instruct pruned to 50% and 70% of its parameters, width and depth strategies, with activation
importance (ours, Minitron), weight magnitude, random, and Torch-Pruning's own GroupMagnitudeImportance pruning
the same hidden/MLP shape. Also times importance estimation and measures its peak memory.

    python benchmarks/prune_quality.py --samples 128 --out benchmarks/results/prune_quality.json

The ``generic`` arm prunes the same hidden/MLP shape through compress's generic Torch-Pruning backend, the path a
family without an adapter takes (SmolLM2 is made to look adapter-less for it): how much the adapter path's
Minitron importance is worth over the generic one on real weights.

    python benchmarks/prune_quality.py --samples 128 --methods activation,generic \
        --out benchmarks/results/prune_quality_generic.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compress  # noqa: E402
from compress.pruning.calibrate import prepare_calibration  # noqa: E402
from compress.data import PYDOCS_TRAIN, PYDOCS_VALID  # noqa: E402
from compress.models import adapter_for  # noqa: E402
from compress.pruning.plan import PlanConfig, Target, plan_shape  # noqa: E402
from compress.pruning.shape import ModelShape, ParamFormula, count_params  # noqa: E402

from _common import machine, peak_memory  # noqa: E402
from tp_baseline import tp_prune  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--block-eval-samples", type=int, default=8)
    p.add_argument("--fractions", default="0.5,0.7")
    p.add_argument("--methods", default=None,
                   help="comma-separated arms to run (default all): activation, magnitude, random, "
                        "torch-pruning GroupMagnitude, generic (compress's Torch-Pruning backend, as for a family "
                        "without an adapter)")
    p.add_argument("--out", default="benchmarks/results/prune_quality.json")
    args = p.parse_args()
    torch.manual_seed(0)

    teacher, tok = compress.load_teacher("smollm2")
    ppl = lambda m: compress.evaluate.perplexity(m, tok, PYDOCS_VALID, seq_len=512, max_tokens=args.eval_tokens)
    results: dict = {"machine": machine(), "date": str(date.today()), "args": vars(args),
                     "teacher": {"params": count_params(teacher), "ppl": ppl(teacher)}, "importance": {}, "arms": []}
    print(f"teacher: {results['teacher']}", flush=True)

    cfg = compress.CalibrationConfig(num_samples=args.samples, seq_len=args.seq_len)
    calib = prepare_calibration(teacher, tok, PYDOCS_TRAIN, cfg)
    scores = {}
    wanted = args.methods.split(",") if args.methods else None
    for method in [m for m in ("activation", "magnitude", "random") if wanted is None or m in wanted]:
        with peak_memory() as mem:
            t = time.perf_counter()
            scores[method] = compress.score_importance(teacher, calib if method == "activation" else None, plugin=method)
            seconds = time.perf_counter() - t
        results["importance"][method] = {"seconds": round(seconds, 2), **mem}
        print(f"importance {method}: {results['importance'][method]}", flush=True)

    teacher_shape = ModelShape.from_config(teacher.config)
    formula = ParamFormula.from_model(teacher, adapter_for(teacher))
    budget = lambda frac: Target.parse({"params": frac}, count_params(teacher))
    heads_kept = PlanConfig(weights={**PlanConfig().weights, "heads": 1e9})  # shapes Torch-Pruning can reach
    for frac in [float(f) for f in args.fractions.split(",") if f]:
        cases = [("width", plan_shape(teacher_shape, formula, budget(frac), "width").shape),
                 ("width", plan_shape(teacher_shape, formula, budget(frac), "width", heads_kept).shape),
                 ("depth", plan_shape(teacher_shape, formula, budget(frac), "depth").shape)]
        if cases[0][1] == cases[1][1]:
            del cases[1]
        for strategy, planned in cases:
            shape = {k: v for k, v in planned.to_dict().items() if k != "head_dim"}
            arms = [("activation", None), ("magnitude", None), ("random", None)]
            if strategy == "depth":  # score-based arms rank single layers; the block search is its own arm
                bi = {"depth": {"method": "block_influence"}}
                arms = [("activation", bi), ("activation", {"depth": {"method": "contiguous_block",
                                                                      "eval_samples": args.block_eval_samples}}),
                        ("magnitude", bi), ("random", bi)]
            elif planned.num_attention_heads == teacher_shape.num_attention_heads:
                arms += [("torch-pruning GroupMagnitude", None), ("generic", None)]
            for method, plugins in [a for a in arms if wanted is None or a[0] in wanted]:
                student = copy.deepcopy(teacher)
                t = time.perf_counter()
                if method.startswith("torch-pruning"):
                    tp_prune(student, shape["hidden_size"], shape["intermediate_size"])
                    label, extra = method, {}
                elif method == "generic":  # as if Llama had no adapter: compress.pruning.generic through Torch-Pruning
                    student.config.model_type = "llama-without-adapter"  # saved configs still say "llama"
                    report = compress.prune(student, {k: shape[k] for k in ("hidden_size", "intermediate_size")},
                                            calib)
                    student.config.model_type = "llama"
                    label, extra = "generic (torch-pruning graph, activation)", {"plan": report.plan_reason}
                else:
                    block = bool(plugins) and plugins["depth"]["method"] == "contiguous_block"
                    report = compress.prune(student, shape, calib, strategy=strategy, plugins=plugins,
                                            importance=None if block else scores[method])
                    label = method
                    if strategy == "depth" and method == "activation":  # layer scores: BI, or the block search
                        label += "+contiguous_block" if block else "+block_influence"
                    extra = {"removed_layers": report.removed["depth"]["removed_layers"]} if strategy == "depth" else {}
                arm = {"fraction": frac, "strategy": strategy, "method": label, "shape": shape,
                       "params": count_params(student), "prune_seconds": round(time.perf_counter() - t, 2),
                       "ppl": ppl(student), **extra}
                results["arms"].append(arm)
                print(arm, flush=True)
                del student

    for arm in results["arms"]:
        best = min(a["ppl"] for a in results["arms"] if a["shape"] == arm["shape"]
                   and a["method"].startswith("activation"))
        arm["ppl_vs_best_activation"] = round(arm["ppl"] / best, 2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\n| target | strategy | shape (hidden/MLP/heads/KV/layers) | method | params | PPL | x best activation |")
    print("|---|---|---|---|---|---|---|")
    for a in results["arms"]:
        s = a["shape"]
        dims = "/".join(str(s[k]) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                              "num_key_value_heads", "num_hidden_layers"))
        print(f"| {a['fraction']:.0%} | {a['strategy']} | {dims} | {a['method']} | {a['params']:,} | "
              f"{a['ppl']:,.1f} | {a['ppl_vs_best_activation']} |")


if __name__ == "__main__":
    main()
