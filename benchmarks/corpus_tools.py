"""The black-box corpus and MiniPLM selection on the real teacher, small: how fast, and what comes out.

    python benchmarks/corpus_tools.py --prompts 32 --new-tokens 64 --pool 64 --out benchmarks/results/corpus_tools.json

Generates teacher continuations of ``--prompts`` 64-token prompts cut from pydocs train (after the first 32,768
tokens, the calibration part of the recovery benchmark), then scores a pool of ``--pool`` 512-token pydocs windows
by teacher minus reference log-likelihood (reference: the planner's 50%-width student, pruned, untrained) and
keeps half. Writes into a temporary folder; the JSON holds the reports and a sample line.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compress  # noqa: E402
from compress.corpus import prompts_from_documents  # noqa: E402
from compress.data import PYDOCS_TRAIN  # noqa: E402

from _common import machine  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--pool", type=int, default=64)
    p.add_argument("--out", default="benchmarks/results/corpus_tools.json")
    args = p.parse_args()
    teacher, tok = compress.load_teacher("smollm2")
    results = {"machine": machine(), "date": str(date.today()), "args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        prompts = prompts_from_documents(PYDOCS_TRAIN, tok, prompt_tokens=64, max_prompts=args.prompts,
                                         skip_tokens=32768)
        gen = compress.generate_corpus(teacher, prompts, Path(tmp) / "corpus.jsonl", tokenizer=tok,
                                       max_new_tokens=args.new_tokens, batch_size=16, seed=0)
        results["corpus"] = gen.to_dict()
        results["corpus_sample"] = json.loads((Path(tmp) / "corpus.jsonl").read_text().splitlines()[0])
        windows = compress.data.pack_tokens(tok, PYDOCS_TRAIN, seq_len=512, max_windows=args.pool,
                                            skip_tokens=32768)
        docs = [tok.decode(w.tolist()) for w in windows]
        reference = copy.deepcopy(teacher)
        compress.prune(reference, {"params": 0.5}, PYDOCS_TRAIN, tokenizer=tok,
                       calibration=compress.CalibrationConfig(num_samples=16, seq_len=256))
        sel = compress.select_by_difference(teacher, reference, docs, tokenizer=tok, keep_fraction=0.5,
                                            seq_len=512, out_path=Path(tmp) / "selected.jsonl")
        results["selection"] = sel.to_dict()
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps({k: v for k, v in results.items() if k != "corpus_sample"}, indent=1, default=str))
    print("sample:", results["corpus_sample"]["completion"][:300])


if __name__ == "__main__":
    main()
