"""Which learning rate and batch shape for a small distillation budget? (issue 12: the defaults come from here)

The planner's 50% width student of SmolLM2-135M (64 × 512 calibration tokens of pydocs train, as in
recovery.py), distilled with logit KD on the same ``--tokens`` of pydocs train after the calibration tokens,
once per (batch × seq_len, lr) pair; everything else is DistillConfig's default (so the warm-up is its default
fraction of each run). Each arm reports pydocs-valid perplexity, tiny-Shakespeare perplexity and KL to the
teacher on 4,096 tokens each. Results are written after every arm.

    python benchmarks/small_budget.py --tokens 32768 --out benchmarks/results/small_budget.json
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
from compress.data import PYDOCS_TRAIN, PYDOCS_VALID, SHAKESPEARE  # noqa: E402
from compress.distillation import DistillConfig  # noqa: E402
from compress.evaluate import kl_to_teacher, perplexity  # noqa: E402

from _common import machine  # noqa: E402

# (batch, seq_len, lr); the first is the old default (8 x 512 at 1e-4).
GRID = [(8, 512, 1e-4), (8, 512, 5e-4), (4, 256, 1e-4), (4, 256, 5e-4), (4, 256, 1e-3), (8, 256, 5e-4),
        (2, 256, 5e-4)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--only", default=None, help="comma-separated indices into the grid")
    p.add_argument("--out", default="benchmarks/results/small_budget.json")
    args = p.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"arms": {}}
    results.update({"machine": machine(), "date": str(date.today()), "tokens": args.tokens})

    teacher, tok = compress.load_teacher("smollm2")

    def measure(model) -> dict:
        return {"ppl_pydocs": perplexity(model, tok, PYDOCS_VALID, seq_len=512, max_tokens=args.eval_tokens),
                "ppl_shakespeare": perplexity(model, tok, SHAKESPEARE, seq_len=512, max_tokens=args.eval_tokens),
                "kl_to_teacher": kl_to_teacher(model, teacher, tok, PYDOCS_VALID, seq_len=512,
                                               max_tokens=args.eval_tokens)}

    calib = compress.pruning.calibrate.prepare_calibration(teacher, tok, PYDOCS_TRAIN,
                                                   compress.CalibrationConfig(num_samples=64, seq_len=512))
    scores = compress.score_importance(teacher, calib)
    grid = GRID if args.only is None else [GRID[int(i)] for i in args.only.split(",")]
    for batch, seq, lr in grid:
        name = f"{batch}x{seq} lr {lr:g}"
        t0 = time.perf_counter()
        student = copy.deepcopy(teacher)
        compress.prune(student, {"params": 0.5}, calib, importance=scores)
        cfg = DistillConfig(max_tokens=args.tokens, batch_size=batch, seq_len=seq, lr=lr, progress=False,
                            log_every=1)
        d = compress.distill(student, teacher, PYDOCS_TRAIN, cfg, tokenizer=tok, skip_tokens=calib.num_tokens)
        entry = {"batch": batch, "seq_len": seq, "lr": lr, "steps": d.steps, "tokens": d.tokens,
                 "schedule": d.schedule, "final_loss": d.final_loss, **measure(student),
                 "seconds": round(time.perf_counter() - t0, 1)}
        results["arms"][name] = entry
        print(name, entry, flush=True)
        out.write_text(json.dumps(results, indent=2))
        del student
    print("\n| batch x seq | lr | steps | PPL pydocs | PPL Shakespeare | KL |\n|---|---|---|---|---|---|")
    for name, e in results["arms"].items():
        print(f"| {e['batch']} x {e['seq_len']} | {e['lr']:g} | {e['steps']} | {e['ppl_pydocs']:.2f} | "
              f"{e['ppl_shakespeare']:.2f} | {e['kl_to_teacher']:.3f} |")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
