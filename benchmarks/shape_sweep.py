"""Which shape at a given budget prunes best? Evidence for the planner's default weights.

One activation-importance pass over SmolLM2, then every candidate shape the planner produces under several
weightings (plus head-pruning variants), each pruned from the same scores and scored by perplexity on pydocs
valid, no training.

    python benchmarks/shape_sweep.py --samples 64 --out benchmarks/results/shape_sweep.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compress  # noqa: E402
from compress.data import PYDOCS_TRAIN, PYDOCS_VALID  # noqa: E402
from compress.models import adapter_for  # noqa: E402
from compress.pruning.plan import PlanConfig, Target, plan_shape  # noqa: E402
from compress.pruning.shape import ModelShape, ParamFormula, count_params  # noqa: E402

from _common import machine  # noqa: E402

WEIGHTINGS = [  # mlp, hidden, heads (depth is not used by the width strategy)
    {"mlp": 1, "hidden": h, "heads": a, "depth": 2}
    for h, a in [(1, 1), (2, 4), (4, 4), (8, 8), (16, 4), (16, 16), (64, 1), (64, 4), (64, 64)]
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--fractions", default="0.5,0.7")
    p.add_argument("--out", default="benchmarks/results/shape_sweep.json")
    args = p.parse_args()
    teacher, tok = compress.load_teacher("smollm2")
    scores = compress.score_importance(teacher, PYDOCS_TRAIN, tokenizer=tok, calibration=compress.CalibrationConfig(
        num_samples=args.samples, seq_len=args.seq_len))
    shape0 = ModelShape.from_config(teacher.config)
    formula = ParamFormula.from_model(teacher, adapter_for(teacher))
    rows = []
    for frac in [float(f) for f in args.fractions.split(",")]:
        shapes: dict[ModelShape, list] = {}
        for w in WEIGHTINGS:
            plan = plan_shape(shape0, formula, Target.parse({"params": frac}, count_params(teacher)), "width",
                              PlanConfig(weights=w))
            shapes.setdefault(plan.shape, []).append(w)
        for shape, ws in shapes.items():
            student = copy.deepcopy(teacher)
            target = {k: v for k, v in shape.to_dict().items() if k != "head_dim"}
            report = compress.prune(student, target, None, importance=scores)
            ppl = compress.evaluate.perplexity(student, tok, PYDOCS_VALID, seq_len=512, max_tokens=args.eval_tokens)
            rows.append({"fraction": frac, "shape": target, "params": report.params_after, "ppl": ppl, "weights": ws})
            print(rows[-1], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "date": str(date.today()), "args": vars(args), "rows": rows},
                              indent=2))


if __name__ == "__main__":
    main()
