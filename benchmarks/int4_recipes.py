"""Which int4 recipe of onnxruntime-genai's model builder keeps the most quality: perplexity of each variant on
held-out text, against PyTorch fp32, side by side in one run.

The model is a Hugging Face folder (default: the real teacher, SmolLM2-135M-Instruct, saved from its GGUF);
perplexity on the first 4,096 tokens of pydocs valid in 512-token windows, computed through onnxruntime-genai's
own runtime. The variants are builder options on top of compress's defaults (blocks of 32, int8 compute):

    python benchmarks/int4_recipes.py --out benchmarks/results/int4_recipes.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compress.api import load_teacher  # noqa: E402
from compress.data import PYDOCS_VALID  # noqa: E402
from compress.evaluate import eval_windows, windows_perplexity  # noqa: E402
from compress.exporters import genai  # noqa: E402

from _common import machine  # noqa: E402

MIXED = "matmul_mixed_precision=last_matmul:int8,mixed_layers:int8"
# name -> (precision, extra builder options, keep compress's mixed int8 layers)
VARIANTS = {
    "int8": ("int8", [], True),
    "int4 rtn, blocks of 32": ("int4", [], False),
    "int4 rtn, blocks of 16": ("int4", ["block_size=16"], False),
    "int4 rtn asymmetric": ("int4", ["is_symmetric=false"], False),
    "int4 k-quant": ("int4", ["algo_config=k_quant"], False),
    "int4 rtn + LM head int8": ("int4", ["matmul_mixed_precision=last_matmul:int8"], False),
    "int4 k-quant + LM head int8": ("int4", ["algo_config=k_quant", "matmul_mixed_precision=last_matmul:int8"], False),
    "int4 rtn + mixed int8 (compress default)": ("int4", [], True),
    "int4 rtn blocks of 16 + mixed int8": ("int4", ["block_size=16"], True),
    "int4 k-quant + mixed int8": ("int4", ["algo_config=k_quant"], True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Hugging Face folder (default: the SmolLM2 teacher)")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as scratch:
        src = Path(args.model) if args.model else Path(scratch) / "teacher"
        if args.model is None:
            model, tokenizer = load_teacher("smollm2")
            model.save_pretrained(src)
            tokenizer.save_pretrained(src)
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(src)
        model = AutoModelForCausalLM.from_pretrained(src).eval()
        windows = eval_windows(tokenizer, PYDOCS_VALID, 512, args.eval_tokens)
        reference = windows_perplexity(model, windows)
        print(f"PyTorch fp32: {reference:.3f}", flush=True)
        rows = []
        for name, (precision, options, mixed) in VARIANTS.items():
            out = Path(scratch) / "variant"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            genai.build(src, out, precision, options, int4_mixed=mixed)
            ppl = genai.perplexity(genai.load(out), windows)
            size = sum(f.stat().st_size for f in out.iterdir() if f.suffix in (".onnx", ".data"))
            rows.append({"variant": name, "precision": precision, "options": options, "mixed_int8": mixed,
                         "perplexity": ppl,
                         "change": ppl / reference - 1, "onnx_mib": round(size / 2**20, 1),
                         "seconds": round(time.perf_counter() - start, 1)})
            print(f"{name:<42} {ppl:8.3f} {ppl / reference - 1:+8.2%} {size / 2**20:7.0f} MiB", flush=True)
    result = {"date": str(date.today()), "machine": machine(), "model": args.model or "SmolLM2-135M-Instruct",
              "evaluation": str(PYDOCS_VALID), "eval_tokens": windows.numel(), "ppl_fp32_pytorch": reference,
              "variants": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
