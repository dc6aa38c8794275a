"""How much of the teacher survives pruning + recovery? Seven arms, one token budget, three numbers each.

Student at ~50% of SmolLM2-135M's parameters. Arms: (1) pruned, no training; (2) pruned + LM-loss-only
fine-tuning; (3) pruned + logit KD; (4) pruned + logit + hidden-state KD; (5) same shape from random init +
logit KD; (6) depth-pruned student + logit + hidden-state KD; (7) arm 3 with teacher correction first (a copy
of the teacher fine-tuned on the distillation data for --correction-steps steps, then distilled from; the
KL is still measured against the original teacher). Each arm reports perplexity on pydocs valid
(in-domain), perplexity on tiny Shakespeare (out-of-domain, never trained on) and the mean per-token
KL(teacher || student) on pydocs valid (fidelity). Training data: pydocs train after the calibration tokens.
Results are written after every arm, so a partial run is still a record.

    python benchmarks/recovery.py --tokens 150000 --out benchmarks/results/recovery_cpu.json
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

ARMS = ["pruned", "pruned+lm", "pruned+kd", "pruned+kd+hidden", "random+kd", "depth+kd+hidden", "pruned+kd+correction"]
# Issue 12's arms (same budget, same three numbers). Config changes over arm 3 (pruned + logit KD):
OBJECTIVE_ARMS = {
    "pruned+skew_kd": dict(logit_loss="skew_forward_kl", skew_alpha=0.1),  # DistiLLM's default skew
    "pruned+skew_rkd": dict(logit_loss="skew_reverse_kl", skew_alpha=0.1),
    "pruned+on_policy": dict(logit_loss="jsd", jsd_beta=0.5, on_policy_fraction=0.5),  # GKD
}
# Arms that change the data or the student before distillation (see run_arm's comments).
PIPELINE_ARMS = ["recon", "recon+kd", "cache+kd", "search+kd", "blackbox_sft", "blackbox+kd", "diffsample+kd"]
NOT_BUDGET = ("arms", "log_dir", "correction_steps", "work_dir", "search_candidates", "search_tokens",
              "cache_top_k", "corpus_prompt_tokens")  # arguments that do not change what arms 1-6 measure


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=150_000, help="training tokens per arm")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--arms", default=",".join(ARMS), help=f"any of {ARMS + list(OBJECTIVE_ARMS) + PIPELINE_ARMS}")
    p.add_argument("--work-dir", default="runs/recovery-work", help="teacher cache and corpora of issue 12's arms")
    p.add_argument("--search-candidates", type=int, default=3)
    p.add_argument("--search-tokens", type=int, default=16384, help="short distillation per search candidate")
    p.add_argument("--cache-top-k", type=int, default=64)
    p.add_argument("--corpus-prompt-tokens", type=int, default=64)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--correction-steps", type=int, default=10, help="teacher-correction steps of arm 7")
    p.add_argument("--log-dir", default=None, help="per-arm metrics.jsonl and TensorBoard events in DIR/ARM")
    p.add_argument("--out", default="benchmarks/results/recovery_cpu.json")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    teacher, tok = compress.load_teacher("smollm2", device=device)
    def measure(model) -> dict:
        return {"ppl_pydocs": perplexity(model, tok, PYDOCS_VALID, seq_len=512, max_tokens=args.eval_tokens),
                "ppl_shakespeare": perplexity(model, tok, SHAKESPEARE, seq_len=512, max_tokens=args.eval_tokens),
                "kl_to_teacher": kl_to_teacher(model, teacher, tok, PYDOCS_VALID, seq_len=512,
                                               max_tokens=args.eval_tokens)}

    results = {"machine": machine(), "date": str(date.today()), "args": vars(args), "arms": {}}
    if out.exists():  # keep arms an earlier run of the same budget finished (a run can be split over sessions)
        earlier = json.loads(out.read_text())
        budget = lambda a: {k: v for k, v in a.items() if k not in NOT_BUDGET}
        same = budget(earlier.get("args", {})) == budget(vars(args))
        if same:
            results["arms"] = earlier.get("arms", {})
            results["earlier_runs"] = earlier.get("earlier_runs", []) + [earlier.get("date")]
    results["teacher"] = {**measure(teacher), "params": compress.pruning.shape.count_params(teacher)}
    results["teacher"].pop("kl_to_teacher")
    print("teacher", results["teacher"], flush=True)

    calib_cfg = compress.CalibrationConfig(num_samples=args.calib_samples, seq_len=512)
    calib = compress.pruning.calibrate.prepare_calibration(teacher, tok, PYDOCS_TRAIN, calib_cfg)
    scores = compress.score_importance(teacher, calib)
    calib_tokens = calib.num_tokens

    def pruned(strategy: str):
        student = copy.deepcopy(teacher)
        # Depth: the contiguous-block search (the default) evaluates on the same calibration windows.
        plugins = {"depth": {"method": "contiguous_block", "eval_samples": 8}} if strategy == "depth" else None
        report = compress.prune(student, {"params": 0.5}, calib, strategy=strategy, importance=scores,
                                plugins=plugins)
        return student, report

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    def base_config(**changes) -> DistillConfig:
        """Arm 3's distillation settings, with changes."""
        settings = dict(max_tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch, lr=args.lr,
                        warmup_steps=5, progress=False, seed=0, log_every=1)
        return DistillConfig(**{**settings, **changes})

    def distilled(d) -> dict:
        return {"tokens": d.tokens, "steps": d.steps, "seconds": d.seconds, "tokens_per_s": d.tokens_per_second,
                "final_loss": d.final_loss, "first_loss": d.losses[0]["loss"], "objective": d.objective,
                "data": d.data}

    def run_pipeline_arm(arm: str) -> tuple[torch.nn.Module, dict]:
        """Issue 12's arms that change the student or the data; every trained arm ends on base_config's KD."""
        extra: dict = {}
        if arm == "search+kd":  # K candidate shapes, a short KD each, the best one gets the rest of the budget
            from compress.pruning.search import SearchConfig, search_shapes

            scfg = SearchConfig(candidates=args.search_candidates, tokens_per_candidate=args.search_tokens)
            found = search_shapes(teacher, {"params": 0.5}, calib, tokenizer=tok, train_data=PYDOCS_TRAIN,
                                  importance=scores, config=scfg, skip_tokens=calib_tokens)
            extra["search"] = found.to_dict()
            student = copy.deepcopy(teacher)
            report = compress.prune(student, found.best_shape, calib, importance=scores)
            budget = args.tokens - found.tokens["training"]
            d = compress.distill(student, teacher, PYDOCS_TRAIN, base_config(max_tokens=budget), tokenizer=tok,
                                 skip_tokens=calib_tokens)
            extra["distill"] = distilled(d)
            extra["tokens_total"] = found.tokens["training"] + d.tokens
            return student, {"shape": report.shape_after, "params": report.params_after, **extra}
        student, report = pruned("width")
        entry = {"shape": report.shape_after, "params": report.params_after}
        if arm.startswith("recon"):  # least-squares refit of the output projections before any training
            from compress.pruning.reconstruct import reconstruct

            t = time.perf_counter()
            r = reconstruct(student, teacher, calib, kept=report.kept)
            entry["reconstruct"] = {**r.to_dict(), "seconds": round(time.perf_counter() - t, 1)}
            entry["before_training"] = measure(student)
            if arm == "recon":
                return student, entry
            d = compress.distill(student, teacher, PYDOCS_TRAIN, base_config(), tokenizer=tok,
                                 skip_tokens=calib_tokens, kept_hidden=report.kept.get("hidden"))
        elif arm == "cache+kd":  # the teacher's top-k log-probs stored once, then KD without the teacher forward
            from compress.distillation.data import WindowLoader
            from compress.distillation.teacher_cache import TeacherCache, build_teacher_cache

            cfg = base_config()
            windows = WindowLoader.from_source(PYDOCS_TRAIN, tok, cfg, skip_tokens=calib_tokens,
                                               vocab_size=len(tok)).windows
            cache_dir = work / f"teacher-cache-top{args.cache_top_k}"
            try:
                TeacherCache.open(cache_dir, windows=windows, teacher=teacher)
                entry["cache"] = {"reused": str(cache_dir)}
            except Exception:  # noqa: BLE001 - absent or stale: build it
                built = build_teacher_cache(teacher, windows, cache_dir, top_k=args.cache_top_k, overwrite=True)
                entry["cache"] = built.to_dict()
            cfg = base_config(teacher_cache=str(cache_dir))
            d = compress.distill(student, teacher, PYDOCS_TRAIN, cfg, tokenizer=tok, skip_tokens=calib_tokens)
        elif arm.startswith("blackbox"):  # the teacher writes the data (DeepSeek-R1-distill / DistilQwen2.5 style)
            from compress.corpus import generate_corpus, prompts_from_documents

            per_sample = args.seq_len
            n_prompts = -(-args.tokens // per_sample)
            prompts = prompts_from_documents(PYDOCS_TRAIN, tok, prompt_tokens=args.corpus_prompt_tokens,
                                             max_prompts=n_prompts, skip_tokens=calib_tokens)
            corpus = work / "teacher-corpus.jsonl"
            gen = generate_corpus(teacher, prompts, corpus, tokenizer=tok,
                                  max_new_tokens=per_sample - args.corpus_prompt_tokens, batch_size=16, seed=0)
            entry["corpus"] = gen.to_dict()
            sft = arm == "blackbox_sft"
            cfg = base_config(logit_weight=0.0 if sft else 1.0, alpha_ce=1.0)
            d = compress.distill(student, teacher, str(corpus), cfg, tokenizer=tok)
        elif arm == "diffsample+kd":  # MiniPLM: keep the half of a 2x pool the teacher knows best vs the student
            from compress.corpus import select_by_difference

            windows = compress.data.pack_tokens(tok, PYDOCS_TRAIN, seq_len=512,
                                                max_windows=-(-2 * args.tokens // 512), skip_tokens=calib_tokens)
            docs = [tok.decode(w.tolist()) for w in windows]
            chosen = work / "diffsample.jsonl"
            chosen.unlink(missing_ok=True)
            sel = select_by_difference(teacher, student, docs, tokenizer=tok, keep_fraction=0.5, seq_len=512,
                                       out_path=chosen)
            entry["selection"] = sel.to_dict()
            d = compress.distill(student, teacher, str(chosen), base_config(), tokenizer=tok)
        else:
            raise SystemExit(f"unknown arm {arm!r}")
        entry["distill"] = distilled(d)
        return student, entry

    for arm in args.arms.split(","):
        t0 = time.perf_counter()
        if arm in PIPELINE_ARMS:
            student, entry = run_pipeline_arm(arm)
            entry.update(measure(student))
            entry["seconds"] = round(time.perf_counter() - t0, 1)
            results["arms"][arm] = entry
            print(arm, {k: v for k, v in entry.items() if k not in ("distill", "search", "reconstruct")}, flush=True)
            out.write_text(json.dumps(results, indent=2))
            del student
            continue
        strategy = "depth" if arm.startswith("depth") else "width"
        student, report = pruned(strategy)
        if arm.startswith("random"):
            with torch.no_grad():
                student.apply(student._init_weights)
        entry = {"shape": report.shape_after, "params": report.params_after}
        if arm not in ("pruned",):
            cfg = DistillConfig(
                max_tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch, lr=args.lr, warmup_steps=5,
                logit_weight=0.0 if arm == "pruned+lm" else 1.0, alpha_ce=1.0 if arm == "pruned+lm" else 0.0,
                hidden_loss="cosine" if arm.endswith("hidden") else None, compile=args.compile,
                teacher_correction_steps=args.correction_steps if arm.endswith("correction") else 0,
                output_dir=str(Path(args.log_dir) / arm) if args.log_dir else None,
                tensorboard=bool(args.log_dir), progress=False, seed=0, log_every=1,
                **OBJECTIVE_ARMS.get(arm, {}))
            # Teacher correction trains the teacher it is given: give it a copy, keep the original for the KL.
            arm_teacher = copy.deepcopy(teacher) if cfg.teacher_correction_steps else teacher
            d = compress.distill(student, arm_teacher, PYDOCS_TRAIN, cfg, tokenizer=tok,
                                 skip_tokens=calib_tokens, kept_layers=report.kept.get("layers"),
                                 kept_hidden=report.kept.get("hidden"))
            entry["distill"] = {"tokens": d.tokens, "steps": d.steps, "seconds": d.seconds,
                                "tokens_per_s": d.tokens_per_second, "final_loss": d.final_loss,
                                "first_loss": d.losses[0]["loss"], "layer_map": d.layer_map,
                                "projection": d.projection, "data": d.data, "peak_memory_mib": d.peak_memory_mib,
                                "teacher_correction": d.teacher_correction, "objective": d.objective}
            if arm_teacher is not teacher:
                entry["corrected_teacher"] = {
                    "ppl_pydocs": perplexity(arm_teacher, tok, PYDOCS_VALID, seq_len=512, max_tokens=args.eval_tokens),
                    "ppl_shakespeare": perplexity(arm_teacher, tok, SHAKESPEARE, seq_len=512, max_tokens=args.eval_tokens)}
                del arm_teacher
        entry.update(measure(student))
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        results["arms"][arm] = entry
        print(arm, {k: v for k, v in entry.items() if k != "distill"}, flush=True)
        out.write_text(json.dumps(results, indent=2))
        del student

    print(f"\n| arm | params | PPL pydocs | PPL shakespeare | KL to teacher | train tokens |")
    print("|---|---|---|---|---|---|")
    t = results["teacher"]
    print(f"| teacher | {t['params']:,} | {t['ppl_pydocs']:.2f} | {t['ppl_shakespeare']:.2f} | 0 | - |")
    for arm, e in results["arms"].items():
        print(f"| {arm} | {e['params']:,} | {e['ppl_pydocs']:.2f} | {e['ppl_shakespeare']:.2f} | "
              f"{e['kl_to_teacher']:.3f} | {e.get('distill', {}).get('tokens', 0):,} |")


if __name__ == "__main__":
    main()
