"""The model card (README.md) written next to an exported student.

The card's common part (origin, shape, perplexity, distillation, loading with transformers) is written here;
each exported format adds its own :class:`CardSection`, given by its module (``card_section`` of a
:class:`compress.exporters.job.FormatHandler`), so this file knows no format.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple


class CardSection(NamedTuple):
    """A format's part of the model card: ``results`` (what its checks measured) go after the student's
    perplexity, ``usage`` (how to run it) after the section on loading the model with transformers."""

    results: list[str]
    usage: list[str]


def _fmt(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else (f"{value:.2f}" if isinstance(value, float) else str(value))


def model_card(
    name: str,
    params: int,
    shape: dict,
    *,
    history: dict | None = None,
    sections: Mapping[str, CardSection] | None = None,
) -> str:
    """Markdown describing where the student came from, what it is, how it scores, and how to load it.

    ``history`` is a :class:`compress.Result` as a dict (teacher, pruning, perplexity per stage, distillation);
    ``sections`` holds each exported format's part, keyed by the module that wrote it, in the order they appear.
    """
    history = history or {}
    parts = list((sections or {}).values())
    lines = _origin(name, params, shape, history)
    lines += _perplexity(history)
    for part in parts:
        lines += part.results
    lines += _distillation(history)
    lines += _transformers_usage()
    for part in parts:
        lines += part.usage
    return "\n".join(lines) + "\n"


def _origin(name: str, params: int, shape: dict, history: dict) -> list[str]:
    """Title, teacher, parameter count, pruning and the shape table (teacher beside student when pruned)."""
    prune = history.get("prune", {})
    lines = [
        f"# {name}",
        "",
        "A student model produced by [compress](https://pypi.org/project/compress-llm/): "
        "Minitron-style activation-based pruning, then distillation from the teacher.",
        "",
    ]
    if history.get("teacher"):
        lines += [f"- Teacher: `{history['teacher']}`"]
    lines += [f"- Parameters: {params:,}" + (f" (teacher: {prune['params_before']:,})" if prune else "")]
    if prune:
        lines += [
            f"- Pruning: {prune.get('strategy')} with {prune.get('importance')} importance; "
            f"{prune.get('plan_reason', '')}"
        ]
    lines += [
        "",
        "| shape | " + ("teacher | " if prune else "") + "student |",
        "|---|" + ("---|" if prune else "") + "---|",
    ]
    for key, value in shape.items():
        before = f"{_fmt(prune['shape_before'][key])} | " if prune and key in prune.get("shape_before", {}) else ""
        lines.append(f"| {key} | {before}{_fmt(value)} |")
    return lines


def _perplexity(history: dict) -> list[str]:
    ppl = history.get("perplexity", {})
    if not ppl:
        return []
    return [
        "",
        f"Perplexity on {history.get('evaluation', 'held-out text')} "
        f"(non-overlapping {history.get('eval_seq_len', 512)}-token windows):",
        "",
        "| stage | perplexity |",
        "|---|---|",
    ] + [f"| {k} | {v:.2f} |" for k, v in ppl.items()]


def _distillation(history: dict) -> list[str]:
    distill = history.get("distill")
    if not distill:
        return []
    cfg = distill.get("config", {})
    return [
        "",
        f"Distillation: {distill.get('tokens', 0):,} tokens, {cfg.get('logit_loss')} on logits "
        f"(T={cfg.get('temperature')}), hidden-state loss: {cfg.get('hidden_loss') or 'none'}, "
        f"lr {cfg.get('lr')}, {distill.get('steps')} steps.",
    ]


def _transformers_usage() -> list[str]:
    return [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        "```",
    ]


__all__ = ["CardSection", "model_card"]
