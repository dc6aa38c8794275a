"""Reports returned by the public calls: plain dataclasses that serialize to JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any


@dataclass
class PruneReport:
    """What :func:`compress.prune` did: shapes, parameter counts, what was removed and why."""

    strategy: str
    importance: str
    target: Any
    plan_reason: str
    shape_before: dict
    shape_after: dict
    params_before: int
    params_after: int
    removed: dict = field(default_factory=dict)
    importance_summary: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    seconds: float = 0.0
    #: Teacher indices the student kept where a later stage needs them: "hidden" channels (to initialize the
    #: hidden-state projection of distillation), "layers" (to map student layers to teacher layers), and "mlp"
    #: neurons and query "heads" per teacher layer (for the least-squares refit of the output projections).
    kept: dict = field(default_factory=dict)
    #: The importance scores the selection used (the report's heatmaps); not part of :meth:`to_dict`.
    scores: Any = field(default=None, repr=False, compare=False)

    @property
    def fraction_kept(self) -> float:
        return self.params_after / self.params_before

    def to_dict(self) -> dict:
        """The report as JSON values; of ``kept``, only hidden channels and layers (the per-layer neuron and head
        lists run to hundreds of thousands of numbers on large models, and stay on the object)."""
        d = asdict(replace(self, scores=None))
        del d["scores"]
        d["kept"] = {k: v for k, v in d["kept"].items() if k in ("hidden", "layers")}
        return d

    def __str__(self) -> str:
        changed = {k: f"{v} -> {self.shape_after[k]}" for k, v in self.shape_before.items() if self.shape_after[k] != v}
        return (
            f"pruned {self.params_before:,} -> {self.params_after:,} params ({self.fraction_kept:.1%}) by "
            f"{self.strategy} with {self.importance} importance: {changed}"
        )


@dataclass
class Result:
    """What :func:`compress.compress` produced. ``stages`` holds each stage's report in the order it ran."""

    out_dir: Path
    prune: PruneReport
    perplexity: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    #: Each stage's greedy continuation of the recipe's prompt: {"prompt", "teacher", "pruned", ...}.
    samples: dict = field(default_factory=dict)
    #: The run's report page (``report.html`` in the output folder), once written; not part of :meth:`to_dict`.
    report_html: Path | None = None

    def to_dict(self) -> dict:
        out = asdict(replace(self, prune=replace(self.prune, scores=None), report_html=None))
        out["out_dir"] = str(self.out_dir)
        out["prune"] = self.prune.to_dict()
        del out["report_html"]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)
