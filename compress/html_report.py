"""A self-contained HTML page of one compress run: tables and matplotlib plots of every stage, in one file.

:func:`render_report` reads an output folder written by :func:`compress.compress` (``compress_report.json``,
and when present ``report/importance.safetensors`` and ``recipe.yaml``) and writes ``report.html`` beside them.
:func:`build_html` is the pure part: a report dict (``Result.to_dict()``) in, the page out.

The page loads nothing from anywhere: figures are PNGs embedded as ``data:`` URIs, styles are inline, and a
Content-Security-Policy forbids every other source, so it opens the same offline, in a mail attachment or in a
CI artifact viewer. Matplotlib is used through :class:`~matplotlib.figure.Figure` and the Agg canvas only (no
pyplot): no global figure registry to leak into, and no GUI backend that could need a display.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .errors import DataError, warn
from .io import write_text_atomic

REPORT_HTML = "report.html"
IMPORTANCE_FILE = "report/importance.safetensors"
REPORT_JSON = "compress_report.json"  # the same name as compress.api.REPORT_FILE (not imported: no cycle)
RECIPE_YAML = "recipe.yaml"

#: The student's stages in the order they run; perplexity keys outside this list are shown after them.
STAGES = ("teacher", "pruned", "reconstructed", "distilled")
DPI = 100
WIDTH_IN = 10.5  # inches at DPI: 1050 px, the widest image on the page
STAGE_COLOR, EXPORT_COLOR, REMOVED_COLOR, KEPT_COLOR = "#4c72b0", "#dd8452", "#c44e52", "#4c72b0"
SHAPE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_hidden_layers",
    "head_dim",
)

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1100px;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.changed td{background:#fff3cd;font-weight:600}tr.best td{background:#e6f4ea}tr.export td{color:#555}
.pass{color:#1a7f37;font-weight:700}.fail{color:#c62828;font-weight:700}.meta{color:#555}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}pre{background:#f7f7f7;border:1px solid #e3e3e3;padding:.6em;
white-space:pre-wrap;word-break:break-word}
table.kv th{background:none;font-weight:600}table.samples{width:100%}table.samples pre{margin:0}
code{background:#f4f4f4;padding:0 .2em}
"""


# ----------------------------------------------------------------------------------------------------------------
# small helpers


def _e(value: Any) -> str:
    """``value`` as HTML-escaped text (quotes too: the same helper fills attributes)."""
    return html.escape(str(value), quote=True)


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _e_text(value: Any) -> str:
    """Model output as HTML: escaped, and control characters (which a random student emits, and which HTML
    does not allow) shown as ``\\xNN`` instead of dropped or rendered as nothing."""
    return _e(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value)))


def _num(value: Any) -> float | None:
    """``value`` as a finite float, or None (absent, not a number, NaN or infinite)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _fmt_ppl(value: Any) -> str:
    """A perplexity as the page prints it (two decimals, no thousands separator), or an em dash."""
    x = _num(value)
    return "—" if x is None else f"{x:.2f}"


def _fmt_int(value: Any) -> str:
    x = _num(value)
    return "—" if x is None else f"{round(x):,}"


def _fmt_float(value: Any, spec: str = ".6g") -> str:
    x = _num(value)
    return "—" if x is None else format(x, spec)


def _fmt_pct(value: Any) -> str:
    x = _num(value)
    return "—" if x is None else f"{x:+.2%}"


def _fmt_value(value: Any) -> str:
    """Any JSON value as short text: numbers formatted, containers as compact JSON."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return _fmt_float(value)
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _table(
    header: Sequence[str],
    rows: Iterable[Sequence[Any]],
    numeric: Sequence[int] = (),
    row_classes: Sequence[str] | None = None,
) -> str:
    """An HTML table; cells are escaped here (pass raw values); ``numeric`` columns are right-aligned."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = row_classes[i] if row_classes and row_classes[i] else ""
        cells = "".join(
            f'<td class="num">{_e(c)}</td>' if j in numeric else f"<td>{_e(c)}</td>" for j, c in enumerate(row)
        )
        body.append(f'<tr class="{cls}">{cells}</tr>' if cls else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _kv_table(items: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(
        f"<tr><th>{_e(k)}</th><td>{_e(_fmt_value(v))}</td></tr>"
        for k, v in items
        if v is not None and v != {} and v != []
    )
    return f'<table class="kv"><tbody>{rows}</tbody></table>' if rows else ""


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{_e(anchor)}"><h2>{_e(title)}</h2>\n{body}\n</section>\n' if body else ""


def _figure(height_in: float, width_in: float = WIDTH_IN) -> Figure:
    """A figure bound to the Agg canvas (never pyplot: no global state, no GUI backend)."""
    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")  # titles never overlap ticks
    FigureCanvasAgg(fig)
    return fig


def _img(fig: Figure, alt: str, caption: str) -> str:
    """``fig`` as an embedded PNG with its alt text and caption; the figure is cleared (freed) here."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        fig.clear()
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _array(t: Any) -> np.ndarray:
    """A tensor (or array) as a float64 numpy array on the CPU."""
    if isinstance(t, torch.Tensor):
        return t.detach().to("cpu", torch.float64).numpy()
    return np.asarray(t, dtype=np.float64)


def _log_scores(a: np.ndarray) -> tuple[np.ndarray, str]:
    """log10 of importance scores for colour maps (non-positive and non-finite values clamp to the smallest
    positive score); raw values when none is positive. Returns the array and its label."""
    finite = np.isfinite(a)
    positive = a[finite & (a > 0)]
    if positive.size == 0:
        return np.where(finite, a, 0.0), "score"
    floor = positive.min()
    return np.log10(np.where(finite & (a > 0), a, floor)), "log10(score)"


def _mask(importance: Mapping[str, Any], name: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """``kept.<name>`` as a boolean array when present and of ``shape`` (a mask of another shape is ignored)."""
    m = importance.get(f"kept.{name}")
    if m is None:
        return None
    arr = _array(m)
    return arr > 0 if arr.shape == shape else None


# ----------------------------------------------------------------------------------------------------------------
# sections


def _header(result: dict) -> str:
    from .version import __version__

    data = _dict(result.get("data"))
    teacher = data.get("teacher") or _dict(result.get("prune")).get("teacher") or "unknown teacher"
    date = result.get("date") or result.get("created") or data.get("date")
    bits = [f"compress {__version__}"]
    if date:
        bits.insert(0, str(date))
    if result.get("out_dir"):
        bits.append(f"output folder {result['out_dir']}")
    prune = _dict(result.get("prune"))
    summary = ""
    before, after = _num(prune.get("params_before")), _num(prune.get("params_after"))
    if before and after is not None:
        summary = (
            f"<p>{_e(_fmt_int(before))} → {_e(_fmt_int(after))} parameters "
            f"({_e(f'{after / before:.1%}')} kept) by {_e(prune.get('strategy', '?'))} pruning with "
            f"{_e(prune.get('importance', '?'))} importance.</p>"
        )
    rows = []
    for key, value in data.items():
        if key == "teacher":
            continue
        rows.append((key, value if isinstance(value, str) else _fmt_value(value)))
    sources = _table(("input", "value"), rows) if rows else ""
    return (
        f"<header><h1>Compression report: {_e(teacher)}</h1>"
        f'<p class="meta">{" · ".join(_e(b) for b in bits)}</p>{summary}{sources}</header>\n'
    )


def _perplexity_rows(result: dict) -> list[dict]:
    """One row per measured model: the student's stages from ``perplexity`` and the quantized exports
    (Optimum int8, onnxruntime-genai int8/int4, GGUF). Each row: ``stage``, ``params``, ``ppl``, ``export``
    (True for an export, measured on the export's own evaluation windows) and ``note``."""
    prune = _dict(result.get("prune"))
    ppl = _dict(result.get("perplexity"))
    export = _dict(_dict(result.get("stages")).get("export"))
    rows: list[dict] = []
    for stage in [s for s in STAGES if s in ppl] + [s for s in ppl if s not in STAGES]:
        params = prune.get("params_before") if stage == "teacher" else prune.get("params_after")
        rows.append({"stage": stage, "params": params, "ppl": ppl[stage], "export": False, "note": ""})
    params = export.get("params") or prune.get("params_after")
    int8 = _dict(export.get("int8"))
    if int8:
        rows.append(
            {
                "stage": "onnx-int8 (int8)",
                "params": params,
                "ppl": int8.get("ppl_int8"),
                "export": True,
                "note": f"{_fmt_pct(int8.get('ppl_change'))} vs fp32 ONNX ({_fmt_ppl(int8.get('ppl_fp32'))})",
            }
        )
    for folder, entry in _dict(export.get("genai")).items():
        entry = _dict(entry)
        p = _dict(entry.get("perplexity"))
        if not p:
            continue
        precision = entry.get("precision") or "?"
        value = p.get(f"ppl_{precision}")
        if value is None:  # an unexpected key name: the one ppl_* that is not the reference
            value = next(
                (v for k, v in p.items() if k.startswith("ppl_") and k not in ("ppl_fp32", "ppl_change")), None
            )
        rows.append(
            {
                "stage": f"{folder} ({precision})",
                "params": params,
                "ppl": value,
                "export": True,
                "note": f"{_fmt_pct(p.get('ppl_change'))} vs {p.get('reference', 'fp32')} "
                f"({_fmt_ppl(p.get('ppl_fp32'))})",
            }
        )
    for kind, entry in _dict(export.get("gguf")).items():
        p = _dict(_dict(entry).get("perplexity"))
        if not p:
            continue
        rows.append(
            {
                "stage": f"gguf {kind}",
                "params": params,
                "ppl": p.get("ppl_gguf"),
                "export": True,
                "note": f"{_fmt_pct(p.get('ppl_change'))} vs PyTorch ({_fmt_ppl(p.get('ppl_torch'))})",
            }
        )
    return rows


def _perplexity_section(result: dict) -> str:
    rows = _perplexity_rows(result)
    if not rows:
        return ""
    teacher = _num(_dict(result.get("perplexity")).get("teacher"))
    table_rows, classes = [], []
    for r in rows:
        x = _num(r["ppl"])
        ratio = f"{x / teacher:.2f}×" if x is not None and teacher else "—"
        table_rows.append((r["stage"], _fmt_int(r["params"]), _fmt_ppl(r["ppl"]), ratio, r["note"]))
        classes.append("export" if r["export"] else "")
    body = _table(
        ("stage", "params", "perplexity", "× teacher", "note"), table_rows, numeric=(1, 2, 3), row_classes=classes
    )
    data = _dict(result.get("data"))
    source = data.get("evaluation")
    if source:
        source = source if isinstance(source, str) else _fmt_value(source)
        tokens = _fmt_int(data.get("eval_tokens")) if data.get("eval_tokens") else "all the"
        exports = (
            " Exports are measured on the export stage's own windows; compare them with the reference in their note."
            if any(r["export"] for r in rows)
            else ""
        )
        body += (
            f'<p class="meta">Student stages: perplexity on {_e(tokens)} '
            f"tokens of {_e(source)} in windows of {_e(_fmt_value(data.get('eval_seq_len')))}.{exports}</p>"
        )
    plotted = [(r, float(_num(r["ppl"]) or 0)) for r in rows if (_num(r["ppl"]) or 0) > 0]
    if plotted:
        body += _perplexity_chart(plotted)
    return _section("perplexity", "Parameters and perplexity", body)


def _perplexity_chart(plotted: list[tuple[dict, float]]) -> str:
    """Bars of the rows' perplexities (log scale): the student's stages in blue, quantized exports in orange; the
    caption explains only the colours the chart has."""
    fig = _figure(3.6, min(WIDTH_IN, 2.5 + 1.1 * len(plotted)))
    ax = fig.add_subplot()
    names = [r["stage"] for r, _ in plotted]
    values = [v for _, v in plotted]
    colors = [EXPORT_COLOR if r["export"] else STAGE_COLOR for r, _ in plotted]
    bars = ax.bar(range(len(values)), values, color=colors)
    ax.set_yscale("log")
    ax.set_xticks(
        range(len(values)),
        names,
        rotation=20 if len(values) > 4 else 0,
        ha="right" if len(values) > 4 else "center",
    )
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=8)
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("Perplexity per stage (lower is better)")
    ax.margins(y=0.15)
    legend = []
    if not all(r["export"] for r, _ in plotted):
        legend.append("blue: the student's stages on the run's evaluation text")
    if any(r["export"] for r, _ in plotted):
        legend.append("orange: quantized exports on the export's evaluation windows")
    return _img(
        fig,
        "Bar chart of perplexity per stage: " + ", ".join(f"{n} {v:.2f}" for n, v in zip(names, values)),
        f"Perplexity per stage, log scale; {', '.join(legend)}.",
    )


def _shape_section(result: dict) -> str:
    prune = _dict(result.get("prune"))
    before, after = _dict(prune.get("shape_before")), _dict(prune.get("shape_after"))
    if not before and not after:
        return ""
    fields = [f for f in SHAPE_FIELDS if f in before or f in after]
    fields += [f for f in list(before) + list(after) if f not in fields]
    fields = list(dict.fromkeys(fields))
    rows, classes = [], []
    for f in fields:
        b, a = before.get(f), after.get(f)
        rows.append((f, _fmt_value(b), _fmt_value(a)))
        classes.append("changed" if b != a else "")
    pb, pa = prune.get("params_before"), prune.get("params_after")
    if pb is not None or pa is not None:
        rows.append(("parameters", _fmt_int(pb), _fmt_int(pa)))
        classes.append("changed" if pb != pa else "")
    body = _table(("field", "teacher", "student"), rows, numeric=(1, 2), row_classes=classes)
    body += _kv_table(
        [
            ("strategy", prune.get("strategy")),
            ("importance", prune.get("importance")),
            ("target", prune.get("target")),
            ("plan", prune.get("plan_reason")),
            ("calibration", prune.get("calibration")),
        ]
    )
    removed = _dict(prune.get("removed"))
    if removed:
        per_axis = []
        for axis, what in removed.items():
            brief = {k: v for k, v in _dict(what).items() if k not in ("block_influence", "block_losses", "keep")}
            per_axis.append((axis, _fmt_value(brief)))
        body += "<p>Removed per axis (changed rows above are highlighted):</p>" + _table(("axis", "detail"), per_axis)
    return _section("shape", "Shape: teacher → student", body)


def _time_section(result: dict) -> str:
    seconds = {k: float(v) for k, v in _dict(result.get("seconds")).items() if _num(v) is not None}
    if not seconds:
        return ""
    total = _num(seconds.get("total"))
    rows = [(k, f"{v:.2f}", f"{v / total:.1%}" if total else "—") for k, v in seconds.items()]
    body = _table(
        ("stage", "seconds", "share of total"),
        rows,
        numeric=(1, 2),
        row_classes=["changed" if k == "total" else "" for k in seconds],
    )
    parts = [(k, v) for k, v in seconds.items() if k != "total"]
    if parts:
        fig = _figure(0.9 + 0.32 * len(parts))
        ax = fig.add_subplot()
        y = np.arange(len(parts))
        bars = ax.barh(y, [v for _, v in parts], color=STAGE_COLOR)
        ax.set_yticks(y, [k for k, _ in parts])
        ax.invert_yaxis()
        ax.bar_label(bars, labels=[f"{v:.1f} s" for _, v in parts], fontsize=8, padding=2)
        ax.set_xlabel("seconds")
        ax.margins(x=0.12)
        ax.set_title("Time per stage" + (f" (total {total:.1f} s)" if total else ""))
        body += _img(
            fig,
            "Horizontal bar chart of seconds per stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in parts),
            "Wall-clock seconds per stage in the order they ran; the total (which includes what no stage "
            "timed) is in the table only.",
        )
    return _section("time", "Time per stage", body)


def _mlp_figure(scores: np.ndarray, kept: np.ndarray | None) -> str:
    """MLP neurons: per layer, units sorted by score (highest first), and the keep mask in that same order."""
    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), axis=1, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=1)
    values, label = _log_scores(sorted_scores)
    layers, units = scores.shape
    panels = 2 if kept is not None else 1
    fig = _figure(0.8 + panels * (0.6 + min(3.2, 0.11 * layers + 0.6)))
    axes = fig.subplots(panels, 1, squeeze=False)[:, 0]
    finite = values[np.isfinite(values)]
    # Colour range from the 1st percentile: a few near-zero scores would otherwise wash out every other unit.
    vmin = float(np.percentile(finite, 1)) if finite.size else None
    im = axes[0].imshow(values, aspect="auto", cmap="viridis", interpolation="antialiased", vmin=vmin)
    axes[0].set_title(f"MLP neuron importance ({label}), units sorted by score within each layer")
    fig.colorbar(im, ax=axes[0], label=label, pad=0.01)
    if kept is not None:
        k = np.take_along_axis(kept, order, axis=1).astype(float)
        im2 = axes[1].imshow(k, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="antialiased")
        lo, hi = int(kept.sum(axis=1).min()), int(kept.sum(axis=1).max())
        axes[1].set_title(
            f"Kept by the student ({lo if lo == hi else f'{lo}–{hi}'} of {units} per layer), same order: dark = kept"
        )
        fig.colorbar(im2, ax=axes[1], label="kept", pad=0.01)
    for ax in axes:
        ax.set_ylabel("layer")
    axes[-1].set_xlabel("neuron rank within its layer (0 = most important)")
    caption = (
        f"MLP neurons, {layers} layers × {units} neurons. Each row is one teacher layer with its neurons "
        "sorted from most to least important (colour: log10 of the score)"
    )
    caption += (
        "; the lower panel shows which of them the student kept in the same order: a dark block on the "
        "left means the layer kept its highest-scoring neurons."
        if kept is not None
        else "."
    )
    kept_alt = ""
    if kept is not None:
        lo, hi = int(kept.sum(axis=1).min()), int(kept.sum(axis=1).max())
        kept_alt = f", with the kept neurons below ({lo if lo == hi else f'{lo} to {hi}'} of {units} per layer)"
    return _img(
        fig,
        f"Heatmap of MLP neuron importance, {layers} layers by {units} neurons, sorted per layer" + kept_alt,
        caption,
    )


def _heads_figure(scores: np.ndarray, kept: np.ndarray | None) -> str:
    """Attention heads in their own order (head index is meaningful for GQA groups), removed heads crossed."""
    values, label = _log_scores(scores)
    layers, heads = scores.shape
    fig = _figure(1.2 + min(6.0, 0.2 * layers + 0.6), min(WIDTH_IN, 3.0 + 0.45 * heads))
    ax = fig.add_subplot()
    im = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label=label, pad=0.02)
    if kept is not None:
        ly, hx = np.nonzero(~kept)
        ax.scatter(hx, ly, marker="x", color="white", s=22, linewidths=1.2)
    ax.set_xticks(range(heads))
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title("Attention head importance" + (" (× = removed)" if kept is not None else ""))
    caption = (
        f"Query heads, {layers} layers × {heads} heads, in the model's own head order (colour: log10 of the score)"
    )
    caption += "; heads the student removed are crossed out." if kept is not None else "."
    return _img(
        fig,
        f"Heatmap of attention head importance, {layers} layers by {heads} heads"
        + (f", {int((~kept).sum())} removed heads marked" if kept is not None else ""),
        caption,
    )


def _hidden_figure(scores: np.ndarray, kept: np.ndarray | None) -> str:
    """Hidden channels in their own order, kept and removed channels in two colours."""
    n = scores.shape[0]
    fig = _figure(2.8)
    ax = fig.add_subplot()
    x = np.arange(n)
    positive = bool(np.all(scores[np.isfinite(scores)] > 0))
    size = 4 if n > 1000 else 8
    if kept is None:
        ax.scatter(x, scores, s=size, color=KEPT_COLOR, linewidths=0)
    else:
        ax.scatter(x[kept], scores[kept], s=size, color=KEPT_COLOR, linewidths=0, label=f"kept ({int(kept.sum())})")
        ax.scatter(
            x[~kept], scores[~kept], s=size, color=REMOVED_COLOR, linewidths=0, label=f"removed ({int((~kept).sum())})"
        )
        ax.legend(fontsize=8, markerscale=2)
    if positive:
        ax.set_yscale("log")
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_xlabel("hidden channel")
    ax.set_ylabel("score" + (" (log scale)" if positive else ""))
    ax.set_title("Hidden channel importance")
    caption = f"Hidden (embedding) channels, {n} of them in channel order"
    caption += ", blue kept and red removed by the student." if kept is not None else "."
    return _img(
        fig,
        f"Scatter plot of the importance of {n} hidden channels"
        + (", kept and removed in two colours" if kept is not None else ""),
        caption,
    )


def _layer_bars(
    values: Sequence[float],
    removed: set[int],
    title: str,
    ylabel: str,
    xlabel: str = "layer",
    labels: Sequence[str] | None = None,
    legend: tuple[str, str] = ("kept", "removed"),
) -> Figure:
    """Bars per layer, ``removed`` ones in red (``legend`` names the two colours)."""
    n = len(values)
    fig = _figure(3.0, min(WIDTH_IN, 3.0 + 0.28 * n))
    ax = fig.add_subplot()
    colors = [REMOVED_COLOR if i in removed else KEPT_COLOR for i in range(n)]
    ax.bar(range(n), values, color=colors)
    ax.set_xticks(range(n), labels if labels is not None else [str(i) for i in range(n)], fontsize=7 if n > 24 else 9)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if removed:
        from matplotlib.patches import Patch

        ax.legend(
            handles=[Patch(color=KEPT_COLOR, label=legend[0]), Patch(color=REMOVED_COLOR, label=legend[1])], fontsize=8
        )
    return fig


def _removed_layers(result: dict) -> list[int]:
    depth = _dict(_dict(_dict(result.get("prune")).get("removed")).get("depth"))
    return [int(i) for i in depth.get("removed_layers") or [] if _num(i) is not None]


def _importance_section(result: dict, importance: Mapping[str, Any] | None) -> str:
    if not importance:
        return ""
    arrays = {
        name: _array(importance[name])
        for name in ("mlp", "heads", "hidden", "layers")
        if importance.get(name) is not None
    }
    arrays = {name: a for name, a in arrays.items() if a.size and a.ndim == (2 if name in ("mlp", "heads") else 1)}
    parts = []
    if "mlp" in arrays:
        parts.append(_mlp_figure(arrays["mlp"], _mask(importance, "mlp", arrays["mlp"].shape)))
    if "heads" in arrays:
        parts.append(_heads_figure(arrays["heads"], _mask(importance, "heads", arrays["heads"].shape)))
    if "hidden" in arrays:
        parts.append(_hidden_figure(arrays["hidden"], _mask(importance, "hidden", arrays["hidden"].shape)))
    if "layers" in arrays:
        a = arrays["layers"]
        mask = _mask(importance, "layers", a.shape)
        removed = set(np.nonzero(~mask)[0].tolist()) if mask is not None else set(_removed_layers(result))
        values = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        method = _dict(result.get("prune")).get("importance")
        what = (
            "Block Influence (1 − cosine similarity of a layer's input and output)"
            if method in (None, "activation")
            else f"the per-layer score of the {method!r} importance plugin"
        )
        fig = _layer_bars(
            values,
            removed,
            "Layer importance" + (" (Block Influence)" if method in (None, "activation") else ""),
            "score",
        )
        parts.append(
            _img(
                fig,
                f"Bar chart of the importance of {a.shape[0]} layers"
                + (f", removed layers {sorted(removed)} in red" if removed else ""),
                f"Per-layer importance: {what}; "
                + ("red: layers the student removed." if removed else "the student kept every layer."),
            )
        )
    if not parts:
        return ""
    summary = _dict(_dict(result.get("prune")).get("importance_summary"))
    meta = _kv_table([(k, summary.get(k)) for k in ("method", "samples", "tokens", "seconds")])
    return _section("importance", "Importance", meta + "".join(parts))


def _depth_section(result: dict) -> str:
    depth = _dict(_dict(_dict(result.get("prune")).get("removed")).get("depth"))
    removed = _removed_layers(result)
    if not depth:
        return ""
    body = _kv_table(
        [("method", depth.get("method")), ("removed layers", removed or None), ("kept layers", depth.get("keep"))]
    )
    influence = depth.get("block_influence")
    losses = _dict(depth.get("block_losses"))
    if isinstance(influence, list) and influence:
        values = [_num(v) or 0.0 for v in influence]
        fig = _layer_bars(
            values, set(removed), "Block Influence per teacher layer", "block influence", xlabel="teacher layer"
        )
        body += _img(
            fig,
            f"Bar chart of Block Influence for {len(values)} teacher layers, removed layers {removed} in red",
            "Block Influence per teacher layer (how much a layer changes the "
            "residual stream); red: the layers removed (the lowest scores).",
        )
    elif losses:
        starts = sorted(losses, key=lambda s: int(s) if str(s).lstrip("-").isdigit() else 0)
        values = [_num(losses[s]) or 0.0 for s in starts]
        chosen = depth.get("block_start")
        if chosen is None:
            chosen = starts[int(np.argmin(values))]
        chosen_i = next((i for i, s in enumerate(starts) if str(s) == str(chosen)), None)
        fig = _layer_bars(
            values,
            {chosen_i} if chosen_i is not None else set(),
            "Calibration loss with a contiguous block removed",
            "calibration loss",
            xlabel="first layer of the removed block",
            labels=[str(s) for s in starts],
            legend=("other starts", "block removed"),
        )
        ax = fig.axes[0]
        lo, hi = min(values), max(values)
        if hi > lo:
            ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
        width = len(removed) or "?"
        body += _img(
            fig,
            f"Bar chart of the calibration loss for each start of a removed block of {width} layers; "
            f"the chosen start {chosen} in red",
            f"Calibration loss of the teacher with {width} consecutive layers removed, by the first layer "
            f"of the block; red: the block removed (start {chosen}, the lowest loss).",
        )
    return _section("depth", "Depth pruning", body)


def _search_section(result: dict) -> str:
    search = _dict(_dict(result.get("stages")).get("search"))
    candidates = search.get("candidates")
    if not isinstance(candidates, list) or not candidates:
        return ""
    before = _dict(_dict(result.get("prune")).get("shape_before"))
    best = search.get("best")
    score = search.get("score") or "score"
    rows, classes = [], []
    for i, c in enumerate(candidates):
        c = _dict(c)
        shape = _dict(c.get("shape"))
        changed = {k: v for k, v in shape.items() if before.get(k) != v} if before else shape
        rows.append(
            (
                i,
                ", ".join(f"{k}={v}" for k, v in changed.items()) or "(unchanged)",
                _fmt_int(c.get("params")),
                _fmt_float(c.get("score_before"), ".3f"),
                _fmt_float(c.get("score"), ".3f"),
                c.get("error") or "",
            )
        )
        classes.append("best" if i == best else "")
    body = _table(
        (
            "#",
            "shape (fields that differ from the teacher)",
            "params",
            f"{score} after pruning",
            f"{score} after short distillation",
            "error",
        ),
        rows,
        numeric=(0, 2, 3, 4),
        row_classes=classes,
    )
    if best is not None:
        body += f"<p>Chosen: candidate {_e(best)} (highlighted), the lowest {_e(score)} after the short run.</p>"
    return _section("search", "Shape search", body)


def _distill_section(result: dict) -> str:
    d = _dict(_dict(result.get("stages")).get("distill"))
    if not d:
        return ""
    body = _kv_table(
        [
            (k, d.get(k))
            for k in (
                "steps",
                "tokens",
                "tokens_per_second",
                "seconds",
                "final_loss",
                "total_steps",
                "total_tokens",
                "peak_memory_mib",
                "projection",
                "resumed_from_step",
                "schedule",
            )
        ]
    )
    records = [r for r in d.get("losses") or [] if isinstance(r, dict) and _num(r.get("step")) is not None]
    if records:
        steps = np.array([_num(r["step"]) for r in records])

        def series(key: str) -> np.ndarray:
            return np.array([_num(r.get(key)) if _num(r.get(key)) is not None else np.nan for r in records])

        marker = "o" if len(records) <= 30 else None
        fig = _figure(3.2)
        ax_loss, ax_lr, ax_tps = fig.subplots(1, 3)
        shown = []
        for key in ("loss", "kd", "ce", "hidden"):
            y = series(key)
            if key != "loss" and not np.any(np.nan_to_num(y) != 0):
                continue
            ax_loss.plot(steps, y, marker=marker, markersize=3, label=key, lw=1.6 if key == "loss" else 1.0)
            shown.append(key)
        ax_loss.set_title("Loss")
        ax_loss.legend(fontsize=8)
        ax_lr.plot(steps, series("lr"), marker=marker, markersize=3, color="#55a868")
        ax_lr.set_title("Learning rate")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax_tps.plot(steps, series("tokens_per_s"), marker=marker, markersize=3, color="#8172b3")
        ax_tps.set_title("Tokens per second")
        for ax in (ax_loss, ax_lr, ax_tps):
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        body += _img(
            fig,
            f"Three line charts against training step over {len(records)} logged steps: loss "
            f"({', '.join(shown)}), learning rate, tokens per second",
            f"Distillation, one point per logged step: the total loss and its non-zero parts "
            f"({', '.join(shown)}), the learning rate, and throughput (tokens per second since the start).",
        )
    return _section("distill", "Distillation", body)


def _parity_html(p: dict) -> str:
    verdict = '<span class="pass">PASSED</span>' if p.get("passed") else '<span class="fail">FAILED</span>'
    return (
        f"{verdict} max |Δlogit| {_e(_fmt_float(p.get('max_abs_diff'), '.3g'))}, relative "
        f"{_e(_fmt_float(p.get('relative_diff'), '.3g'))} of the largest logit "
        f"{_e(_fmt_float(p.get('max_abs_logit'), '.3g'))} (tolerance {_e(_fmt_float(p.get('tolerance'), 'g'))})"
    )


def _export_section(result: dict) -> str:
    export = _dict(_dict(result.get("stages")).get("export"))
    if not export:
        return ""
    parts = []
    formats = export.get("formats")
    if formats:
        parts.append(f"<p>Formats written: {', '.join(f'<code>{_e(f)}</code>' for f in formats)}.</p>")
    if export.get("written_by") is not None:
        parts.append(f"<p>Written by rank {_e(export['written_by'])}.</p>")
    checks = []  # (what, html verdict)
    parity = _dict(export.get("parity"))
    if parity:
        checks.append(("onnx (Optimum) logits vs PyTorch", _parity_html(parity)))
    for folder, entry in _dict(export.get("genai")).items():
        entry = _dict(entry)
        if _dict(entry.get("parity")):
            checks.append(
                (f"{folder} ({entry.get('precision', '?')}) logits vs PyTorch", _parity_html(_dict(entry["parity"])))
            )
    for kind, entry in _dict(export.get("gguf")).items():
        entry = _dict(entry)
        if "passed" in entry:
            tok = entry.get("tokenizer_match")
            checks.append(
                (
                    f"gguf {kind} logits vs PyTorch",
                    _parity_html(entry) + ("" if tok is None else f"; tokenizer {'matches' if tok else 'differs'}"),
                )
            )
    if checks:
        rows = "".join(f"<tr><td>{_e(w)}</td><td>{v}</td></tr>" for w, v in checks)
        parts.append(
            f"<h3>Parity</h3><table><thead><tr><th>check</th><th>result</th></tr></thead><tbody>{rows}</tbody></table>"
        )
    quant = []
    int8 = _dict(export.get("int8"))
    if int8:
        quant.append(
            (
                "onnx-int8",
                "int8",
                _fmt_ppl(int8.get("ppl_fp32")),
                _fmt_ppl(int8.get("ppl_int8")),
                _fmt_pct(int8.get("ppl_change")),
            )
        )
    for folder, entry in _dict(export.get("genai")).items():
        entry = _dict(entry)
        p = _dict(entry.get("perplexity"))
        if p:
            precision = entry.get("precision", "?")
            quant.append(
                (
                    folder,
                    precision,
                    _fmt_ppl(p.get("ppl_fp32")),
                    _fmt_ppl(p.get(f"ppl_{precision}")),
                    _fmt_pct(p.get("ppl_change")),
                )
            )
    for kind, entry in _dict(export.get("gguf")).items():
        p = _dict(_dict(entry).get("perplexity"))
        if p:
            quant.append(
                (
                    f"gguf {_dict(entry).get('gguf_file') or kind}",
                    kind,
                    _fmt_ppl(p.get("ppl_torch")),
                    _fmt_ppl(p.get("ppl_gguf")),
                    _fmt_pct(p.get("ppl_change")),
                )
            )
    if quant:
        parts.append(
            "<h3>Quantized perplexity</h3>"
            + _table(("export", "precision", "reference perplexity", "perplexity", "change"), quant, numeric=(2, 3, 4))
        )
    skipped = _dict(export.get("skipped"))
    if skipped:
        parts.append("<h3>Skipped formats</h3>" + _table(("format", "why"), list(skipped.items())))
    return _section("export", "Export", "".join(parts))


def _samples_section(result: dict) -> str:
    samples = _dict(result.get("samples"))
    if not samples:
        return ""
    prompt = samples.get("prompt")
    order = [s for s in STAGES if s in samples] + [s for s in samples if s not in STAGES and s != "prompt"]
    body = f"<p>Prompt:</p><pre>{_e_text(prompt)}</pre>" if prompt is not None else ""
    rows = "".join(f"<tr><th>{_e(s)}</th><td><pre>{_e_text(samples[s])}</pre></td></tr>" for s in order)
    if rows:
        body += f'<p>Greedy continuation per stage:</p><table class="samples"><tbody>{rows}</tbody></table>'
    return _section("samples", "Samples", body)


def _recipe_section(recipe_text: str | None) -> str:
    if not recipe_text:
        return ""
    return _section(
        "recipe", "Recipe", f"<p>The run's <code>{_e(RECIPE_YAML)}</code>, verbatim:</p><pre>{_e(recipe_text)}</pre>"
    )


# ----------------------------------------------------------------------------------------------------------------
# public API


def build_html(result: dict, importance: dict[str, torch.Tensor] | None = None, recipe_text: str | None = None) -> str:
    """The whole report page for ``result`` (a ``Result.to_dict()``), optional importance scores and keep masks
    (``mlp``/``heads``/``hidden``/``layers`` and ``kept.<name>``) and the recipe's text. Pure: reads and writes
    nothing. Sections whose data is absent are left out."""
    if not isinstance(result, dict):
        raise DataError(f"build_html needs the report as a dict (Result.to_dict()), got {type(result).__name__}")
    teacher = _dict(result.get("data")).get("teacher") or "compress run"
    sections = [
        _header(result),
        _perplexity_section(result),
        _shape_section(result),
        _time_section(result),
        _importance_section(result, importance),
        _depth_section(result),
        _search_section(result),
        _distill_section(result),
        _export_section(result),
        _samples_section(result),
        _recipe_section(recipe_text),
    ]
    # No source but this file: data: images and inline styles only (a strict CSP also stops favicon requests).
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<link rel="icon" href="data:,">\n'
        f"<title>{_e('compress report: ' + str(teacher))}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        + "".join(sections)
        + "</body>\n</html>\n"
    )


def render_report(out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/report.html`` from the folder's ``compress_report.json`` (and ``report/importance.safetensors``
    and ``recipe.yaml`` when there), replacing any earlier page whole (a temporary file, then a rename).

    Raises :class:`~compress.errors.DataError` when the report JSON is missing or unreadable; the folder is then
    left as it was. An unreadable importance file is warned about and its section left out."""
    folder = Path(out_dir)
    path = folder / REPORT_JSON
    what = (
        "render_report needs an output folder written by compress.compress(...) or `compress run` (it holds "
        f"{REPORT_JSON}); pass that folder, or run compress again to write one"
    )
    if not path.is_file():
        raise DataError(f"{path} not found: {folder} has no {REPORT_JSON}; {what}")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path} could not be read ({type(exc).__name__}: {exc}); {what}") from None
    if not isinstance(result, dict):
        raise DataError(f"{path} holds a JSON {type(result).__name__}, not a report object; {what}")
    importance = None
    imp_path = folder / IMPORTANCE_FILE
    if imp_path.is_file():
        try:
            from safetensors.torch import load_file

            importance = load_file(str(imp_path))
        except Exception as exc:  # noqa: BLE001 - the rest of the page is still worth writing
            warn(
                f"{imp_path} could not be read ({type(exc).__name__}: {exc}); the report leaves out the "
                "importance heatmaps"
            )
    recipe_path = folder / RECIPE_YAML
    recipe_text = None
    if recipe_path.is_file():
        try:
            recipe_text = recipe_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            warn(f"{recipe_path} could not be read ({exc}); the report leaves out the recipe")
    page = build_html(result, importance, recipe_text)
    return write_text_atomic(folder / REPORT_HTML, page)
