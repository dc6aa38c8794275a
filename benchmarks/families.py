"""Every supported family, every axis, on tiny random models (and families without an adapter through the generic
Torch-Pruning backend): parameters before and after, wall time of the
prune, and how far the saved-and-reloaded student's logits are from the in-memory student's; and the families
compress refuses (Gemma 4, EXAONE 4.5): the time to refuse, and that nothing changed.

    python benchmarks/families.py --out benchmarks/results/families.json
    python benchmarks/families.py --families olmo3,glm4   # a subset (and the generic / refused ones named there)

The models are the test suite's (tests/conftest.py: hidden 96, MLP 96, 6 query heads over 2 KV heads,
head_dim 16, 4 layers, vocabulary 320, every family's particular features switched on), with random weights
scaled up so that importance differences are visible. Only SmolLM2 has real weights offline; its quality
figures are in benchmarks/prune_quality.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

CASES = {
    "mlp": ({"intermediate_size": 48}, "width"),
    "heads": ({"num_attention_heads": 3, "num_key_value_heads": 1}, "width"),
    "hidden": ({"hidden_size": 32}, "width"),
    "depth": ({"num_hidden_layers": 2}, "depth"),
    "50% params": ({"params": 0.5}, "width+depth"),
}
# GPT-NeoX (hidden 96, 6 heads of 16, no GQA) computes its head size as hidden_size // heads: heads are pruned
# with hidden channels; hidden alone is refused (recorded as such).
FAMILY_CASES = {"gpt_neox": {"heads": ({"num_attention_heads": 3, "hidden_size": 48}, "width")}}


def _image_prompt(config) -> dict:
    """Text around one image (begin-of-image, its soft tokens, end-of-image), with random pixels."""
    ids = torch.tensor([[1, 17, config.boi_token_index] + [config.image_token_index] * config.mm_tokens_per_image
                        + [config.eoi_token_index, 40, 41]])
    size = config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return dict(input_ids=ids, pixel_values=pixels, token_type_ids=(ids == config.image_token_index).long())


def run_case(family: str, target: dict, strategy: str, generic: bool = False) -> dict:
    from transformers import AutoModelForCausalLM

    import compress
    from conftest import tiny_model

    model = generic_model(family) if generic else tiny_model(family)
    ids = torch.randint(4, 320, (16, 32), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    try:
        report = compress.prune(model, target, ids, strategy=strategy,
                                calibration=compress.CalibrationConfig(min_samples=4))
    except compress.CompressError as exc:
        return {"refused": f"{type(exc).__name__}: {exc}"}
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="eager").eval()
        with torch.no_grad():
            diff = (reloaded(ids[:2]).logits - model(ids[:2]).logits).abs().max().item()
            if hasattr(model.config, "vision_config"):  # multimodal Gemma-3: a prompt with an image as well
                images = _image_prompt(model.config)
                diff = max(diff, (reloaded(**images).logits - model(**images).logits).abs().max().item())
        reloaded_params = compress.pruning.shape.count_params(reloaded)
    return {"params_before": report.params_before, "params_after": report.params_after,
            "reloaded_params": reloaded_params, "seconds": round(seconds, 3), "reload_max_logit_diff": diff,
            "shape_after": report.shape_after}


# Families without an adapter, through the generic Torch-Pruning backend (MLP neurons and hidden channels,
# attention kept): the same tiny sizes, every config class with its own defaults otherwise.
GENERIC = ("starcoder2", "glm", "nemotron", "cohere", "arcee", "stablelm", "persimmon", "helium")
GENERIC_CASES = {
    "mlp": ({"intermediate_size": 48}, "width"),
    "hidden": ({"hidden_size": 32}, "width"),
    "60% params": ({"params": 0.6}, "width"),
}


def generic_model(model_type: str):
    from transformers import AutoConfig

    from conftest import randomized

    fields = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_hidden_layers=3, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return randomized(AutoConfig.for_model(model_type, **fields))


def refused_models() -> dict:
    """Tiny models of the families compress refuses, as the installed transformers builds them (none on 4.57)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    text = dict(vocab_size=320, hidden_size=96, intermediate_size=96, num_attention_heads=6, num_key_value_heads=2,
                num_hidden_layers=4, head_dim=16, max_position_embeddings=256, sliding_window=8,
                layer_types=["sliding_attention", "full_attention"] * 2, bos_token_id=1, eos_token_id=2,
                pad_token_id=0)
    builders = {}
    if hasattr(transformers, "Gemma4TextConfig"):
        gemma4 = dict(text, vocab_size_per_layer_input=320, global_head_dim=32)
        # Gemma-4-31B's kind: full-attention layers with their own head size and KV heads, keys reused as values.
        builders["gemma4_text (31B-like)"] = lambda: AutoModelForCausalLM.from_config(transformers.Gemma4TextConfig(
            **gemma4, hidden_size_per_layer_input=0, num_global_key_value_heads=1, attention_k_eq_v=True))
        # Gemma-4-E2B's kind: per-layer embeddings and KV sharing too.
        builders["gemma4_text (E2B-like)"] = lambda: AutoModelForCausalLM.from_config(transformers.Gemma4TextConfig(
            **gemma4, hidden_size_per_layer_input=8, num_kv_shared_layers=2))
        builders["gemma4"] = lambda: AutoModelForCausalLM.from_config(transformers.Gemma4Config(
            text_config=transformers.Gemma4TextConfig(**gemma4, hidden_size_per_layer_input=0).to_dict()))
    if hasattr(transformers, "Exaone4_5_Config"):
        builders["exaone4_5"] = lambda: AutoModelForImageTextToText.from_config(transformers.Exaone4_5_Config(
            text_config=dict(text, model_type="exaone4"), image_token_id=318, video_token_id=319,
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=96)))
    return builders


def run_refused(name: str, build) -> dict:
    import compress

    model = build().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(4, 320, (16, 32), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    try:
        compress.prune(model, {"params": 0.5}, ids, calibration=compress.CalibrationConfig(min_samples=4))
    except compress.UnsupportedModelError as exc:
        seconds = time.perf_counter() - start
        unchanged = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        print(f"{name:<22} refused in {seconds:.3f} s, weights unchanged: {unchanged}\n    {exc}")
        return {"refused": str(exc), "seconds": round(seconds, 3), "unchanged": unchanged}
    raise AssertionError(f"{name} was pruned; it should be refused")


def run_family(family: str, cases: dict, generic: bool = False) -> dict:
    rows = {}
    for name, (target, strategy) in cases.items():
        row = rows[name] = run_case(family, target, strategy, generic)
        if "refused" in row:
            print(f"{family:<12} {name:<11} refused: {row['refused'][:110]}")
            continue
        assert row["reloaded_params"] == row["params_after"]
        print(f"{family:<12} {name:<11} {row['params_before']:>8,}->{row['params_after']:>7,} "
              f"{row['seconds']:>8.3f} {row['reload_max_logit_diff']:>12.2e}")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--families", default=None, help="comma-separated families (default: all)")
    args = p.parse_args()
    chosen = set(args.families.split(",")) if args.families else None
    import compress
    import transformers

    torch.set_num_threads(1)
    results = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
               "transformers": transformers.__version__, "families": {}}
    print(f"{'family':<12} {'axis':<11} {'params':>17} {'seconds':>8} {'reload diff':>12}")
    for family in compress.supported_families():
        if chosen is not None and family not in chosen:
            continue
        cases = {name: FAMILY_CASES.get(family, {}).get(name, case) for name, case in CASES.items()}
        results["families"][family] = run_family(family, cases)
    print("\nwithout an adapter (generic Torch-Pruning backend):")
    results["generic"] = {}
    for family in GENERIC:
        assert family not in compress.supported_families()
        if chosen is None or family in chosen:
            results["generic"][family] = run_family(family, GENERIC_CASES, generic=True)
    print("\nrefused before any work:")
    results["refused"] = {}
    for name, build in refused_models().items():
        if chosen is None or name.split()[0] in chosen:
            results["refused"][name] = run_refused(name, build)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
