"""The two transformers lines side by side on the real teacher (SmolLM2-135M-Instruct, from its GGUF file):
the same pruned shape, the same perplexities (within 1%) and the same first distillation losses (within 1e-3).

Run it once in each environment (the main line, transformers 5, and the compatibility line, 4.57.6 with the
[optimum] extra) and compare the JSON lines it prints:

    .venv/bin/python benchmarks/lines.py > a.json; .venv-compat/bin/python benchmarks/lines.py > b.json
    python benchmarks/lines.py --compare a.json b.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch

import compress
from compress.data import default_calibration_source, default_eval_source

from _common import machine


def measure(samples: int, eval_tokens: int, steps: int) -> dict:
    import transformers

    torch.manual_seed(0)
    teacher, tok = compress.load_teacher("smollm2")
    student = copy.deepcopy(teacher)
    t0 = time.perf_counter()
    report = compress.prune(student, {"params": 0.5}, default_calibration_source(), tokenizer=tok,
                            calibration=compress.CalibrationConfig(num_samples=samples, seq_len=256))
    prune_s = time.perf_counter() - t0
    ppl = {
        name: compress.evaluate.perplexity(m, tok, default_eval_source(), seq_len=256, max_tokens=eval_tokens)
        for name, m in (("teacher", teacher), ("pruned", student))
    }
    cfg = compress.DistillConfig(max_steps=steps, batch_size=4, seq_len=256, log_every=1, lr=1e-4, warmup_steps=0,
                                 progress=False, seed=0)
    distilled = compress.distill(student, teacher, default_calibration_source(), cfg, tokenizer=tok)
    return {
        "transformers": transformers.__version__,
        "machine": machine(),
        "shape": report.shape_after,
        "params": report.params_after,
        "perplexity": ppl,
        "losses": [round(entry["loss"], 6) for entry in distilled.losses],
        "prune_seconds": round(prune_s, 1),
    }


def compare(a: dict, b: dict) -> dict:
    return {
        "lines": [a["transformers"], b["transformers"]],
        "same_shape": a["shape"] == b["shape"],
        "perplexity_rel_diff": {k: abs(a["perplexity"][k] / b["perplexity"][k] - 1) for k in a["perplexity"]},
        "first_loss_abs_diff": [abs(x - y) for x, y in zip(a["losses"], b["losses"])],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--compare", nargs=2, metavar="JSON")
    args = parser.parse_args()
    if args.compare:
        a, b = (json.loads(open(path).read()) for path in args.compare)
        print(json.dumps(compare(a, b), indent=1))
        return
    print(json.dumps(measure(args.samples, args.eval_tokens, args.steps)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
