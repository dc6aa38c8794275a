"""The HTML run report: numbers on the page match the run's JSON, one decodable PNG per figure the data calls for,
importance heatmaps follow the importance file, the page loads offline in a real browser, and the file is written
atomically (or not at all)."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_TEXT, tiny_model
from safetensors.torch import save_file

import compress
from compress import html_report
from compress.html_report import IMPORTANCE_FILE, REPORT_HTML, build_html, render_report

IMPORTANCE_NAMES = ("mlp", "heads", "hidden", "layers")


class Page(HTMLParser):
    """What a test needs from a page: tables (header, rows of cell text, row classes), images, section ids and
    the text of <pre> blocks, parsed independently of how the page was written."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tables: list[dict] = []
        self.images: list[dict] = []
        self.sections: list[str] = []
        self.pres: list[str] = []
        self._stack: list[dict] = []
        self._row: list[str] | None = None
        self._row_class = ""
        self._cell: list[str] | None = None
        self._pre: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._stack.append({"header": [], "rows": [], "classes": [], "class": a.get("class", "")})
        elif tag == "tr":
            self._row, self._row_class = [], a.get("class", "")
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(a)
        elif tag == "section":
            self.sections.append(a.get("id", ""))
        elif tag == "pre":
            self._pre = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._stack:
            t = self._stack[-1]
            if not t["header"] and not t["rows"] and t["class"] != "kv" and t["class"] != "samples":
                t["header"] = self._row
            else:
                t["rows"].append(self._row)
                t["classes"].append(self._row_class)
            self._row = None
        elif tag == "table" and self._stack:
            self.tables.append(self._stack.pop())
        elif tag == "pre" and self._pre is not None:
            self.pres.append("".join(self._pre))
            self._pre = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._pre is not None:
            self._pre.append(data)

    def table(self, *header: str) -> dict:
        found = [t for t in self.tables if tuple(t["header"][:len(header)]) == header]
        assert len(found) == 1, f"expected one table with header {header}, found {len(found)}"
        return found[0]

    def kv(self) -> dict:
        """Every two-cell row of the key/value tables, merged (later tables win)."""
        out = {}
        for t in self.tables:
            if t["class"] == "kv":
                out.update({r[0]: r[1] for r in t["rows"] if len(r) == 2})
        return out


def _number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("×%").strip())


def _png_sizes(page: Page) -> list[tuple[int, int]]:
    """Every image's (height, width), checking it is an inline PNG that matplotlib reads back."""
    from matplotlib.image import imread

    sizes = []
    for img in page.images:
        src = img["src"]
        assert src.startswith("data:image/png;base64,"), src[:60]
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        pixels = imread(io.BytesIO(data), format="png")
        assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
        sizes.append(pixels.shape[:2])
        assert img.get("alt", "").strip(), "every image has an alt text"
    return sizes


def _expected_figures(report: dict, importance: dict | None) -> int:
    """The figure count the data calls for, worked out from the JSON and the importance tensors."""
    n = int(any(isinstance(v, (int, float)) and v > 0 for v in report["perplexity"].values()))
    n += int(any(k != "total" for k in report.get("seconds", {})))
    n += sum(1 for k in IMPORTANCE_NAMES if importance and k in importance)
    depth = report["prune"].get("removed", {}).get("depth", {})
    n += int(bool(depth.get("block_influence") or depth.get("block_losses")))
    n += int(bool(report["stages"].get("distill", {}).get("losses")))
    return n


def _shown_as_text(s: str) -> str:
    """Control characters as the page shows them (\\xNN); everything else as is."""
    return "".join(f"\\x{ord(c):02x}" if (ord(c) < 32 and c not in "\t\n\r") or ord(c) == 127 else c for c in s)


def _importance_tensors(tokenizer, result) -> dict[str, torch.Tensor]:
    """Scores of the same teacher (a fresh copy: compress pruned the first one in place) and keep masks from the
    selection the run made; heads were not pruned, so their mask is made by hand (heads 4 and 5 removed)."""
    teacher = tiny_model("llama")
    scores = compress.score_importance(teacher, [SAMPLE_TEXT], tokenizer=tokenizer,
                                       calibration_config=compress.CalibrationConfig(seq_len=32, num_samples=16))
    shape = result.prune.shape_before
    layers, inter, heads, hidden = (shape["num_hidden_layers"], shape["intermediate_size"],
                                    shape["num_attention_heads"], shape["hidden_size"])
    tensors = {name: getattr(scores, name).float().contiguous() for name in IMPORTANCE_NAMES}
    kept = result.prune.kept
    mlp = torch.zeros(layers, inter, dtype=torch.uint8)
    for layer, units in enumerate(kept["mlp"]):
        mlp[layer, list(units)] = 1
    head_mask = torch.ones(layers, heads, dtype=torch.uint8)
    head_mask[:, 4:] = 0
    hidden_mask = torch.zeros(hidden, dtype=torch.uint8)
    hidden_mask[list(kept["hidden"])] = 1
    layer_mask = torch.zeros(layers, dtype=torch.uint8)
    layer_mask[list(kept["layers"])] = 1
    tensors.update({"kept.mlp": mlp, "kept.heads": head_mask, "kept.hidden": hidden_mask, "kept.layers": layer_mask})
    return tensors


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer):
    """One tiny width+depth run with distillation, and an importance file written by this test (replacing the
    one compress may have written) so that its contents are known here."""
    tmp = tmp_path_factory.mktemp("html_report")
    text = tmp / "train.txt"
    text.write_text(SAMPLE_TEXT * 3)
    out = tmp / "out"
    result = compress.compress(
        (tiny_model("llama"), tokenizer), {"hidden_size": 48, "intermediate_size": 48, "num_hidden_layers": 3},
        text, out, strategy="width+depth", eval_data=[SAMPLE_TEXT[:3000]], eval_seq_len=32, eval_tokens=256,
        formats=["safetensors"], calibration=compress.CalibrationConfig(seq_len=32, num_samples=16),
        distill=compress.DistillConfig(max_tokens=4 * 64, seq_len=32, batch_size=2, progress=False, log_every=1))
    importance = _importance_tensors(tokenizer, result)
    (out / IMPORTANCE_FILE).parent.mkdir(parents=True, exist_ok=True)
    save_file(importance, str(out / IMPORTANCE_FILE))
    path = render_report(out)
    return {"out": out, "result": result, "importance": importance, "path": path,
            "report": json.loads((out / "compress_report.json").read_text())}


def test_report_numbers_and_figures_match_the_run(run):
    out, report = run["out"], run["report"]
    assert run["path"] == out / REPORT_HTML and run["path"].is_file()
    text = run["path"].read_text(encoding="utf-8")
    page = Page(text)

    ppl = page.table("stage", "params", "perplexity", "× teacher")
    rows = {r[0]: r for r in ppl["rows"]}
    assert set(rows) == set(report["perplexity"]) == {"teacher", "pruned", "distilled"}
    teacher = report["perplexity"]["teacher"]
    for stage, value in report["perplexity"].items():
        assert abs(_number(rows[stage][2]) - value) <= 0.0051, (stage, rows[stage][2], value)
        assert abs(_number(rows[stage][3]) - value / teacher) <= 0.0051
        params = report["prune"]["params_before" if stage == "teacher" else "params_after"]
        assert _number(rows[stage][1]) == params

    shape = page.table("field", "teacher", "student")
    before, after = report["prune"]["shape_before"], report["prune"]["shape_after"]
    cells = {r[0]: (r[1], r[2]) for r in shape["rows"]}
    for field in before:
        assert (_number(cells[field][0]), _number(cells[field][1])) == (before[field], after[field])
    highlighted = {r[0] for r, c in zip(shape["rows"], shape["classes"]) if c == "changed"}
    assert highlighted == {f for f in before if before[f] != after[f]} | {"parameters"}
    assert highlighted >= {"hidden_size", "intermediate_size", "num_hidden_layers"}

    times = page.table("stage", "seconds")
    shown = {r[0]: _number(r[1]) for r in times["rows"]}
    assert set(shown) == set(report["seconds"]) and "total" in shown
    assert all(abs(shown[k] - v) <= 0.0051 for k, v in report["seconds"].items())

    d = report["stages"]["distill"]
    kv = page.kv()
    assert _number(kv["steps"]) == d["steps"] and _number(kv["tokens"]) == d["tokens"] == 4 * 64
    assert len(d["losses"]) == d["steps"]  # log_every=1: one point per step

    expected = _expected_figures(report, run["importance"])
    assert expected == 1 + 1 + 4 + 1 + 1  # perplexity, time, 4 importance, depth block losses, distillation
    assert len(page.images) == expected == text.count("<img ")
    for height, width in _png_sizes(page):
        assert width <= 1100 and height <= 1100
    for section in ("perplexity", "shape", "time", "importance", "depth", "distill", "export", "samples"):
        assert section in page.sections
    assert "search" not in page.sections  # no search stage in this run

    samples = report["samples"]
    assert samples["prompt"] and {"teacher", "pruned", "distilled"} <= set(samples)
    for stage in ("prompt", "teacher", "pruned", "distilled"):
        assert _shown_as_text(samples[stage]) in page.pres
        assert html.escape(_shown_as_text(samples[stage])) in text
    recipe = out / "recipe.yaml"  # compress writes it; the page shows it verbatim
    assert recipe.read_text() in page.pres
    assert f"compress {compress.__version__}" in text
    # One file that opens offline: every source is inline.
    assert all(v.startswith("data:") for v in re.findall(r'(?:src|href)="([^"]*)"', text))
    assert "<script" not in text and "http://" not in text and "https://" not in text


def test_importance_heatmaps_follow_the_importance_file(run, tmp_path):
    page = Page(run["path"].read_text(encoding="utf-8"))
    alts = [img["alt"] for img in page.images]
    imp = run["importance"]
    layers, inter = imp["mlp"].shape
    mlp_alt = [a for a in alts if a.startswith("Heatmap of MLP")]
    assert len(mlp_alt) == 1 and f"{layers} layers by {inter} neurons" in mlp_alt[0]
    assert f"48 of {inter} per layer" in mlp_alt[0]  # the masks written above: 48 neurons kept in every layer
    heads_alt = [a for a in alts if a.startswith("Heatmap of attention head")]
    removed_heads = int((imp["kept.heads"] == 0).sum())
    assert len(heads_alt) == 1 and f"{removed_heads} removed heads marked" in heads_alt[0] and removed_heads == 8
    removed_layers = [i for i in range(layers) if not imp["kept.layers"][i]]
    assert removed_layers == run["report"]["prune"]["removed"]["depth"]["removed_layers"]
    assert any(a.startswith(f"Bar chart of the importance of {layers} layers") and str(removed_layers) in a
               for a in alts)

    # A copy of the folder with only some of the tensors: one heatmap per tensor given, none without the file.
    copy = tmp_path / "copy"
    shutil.copytree(run["out"], copy)
    subset = {k: imp[k] for k in ("mlp", "kept.mlp", "hidden")}
    save_file(subset, str(copy / IMPORTANCE_FILE))
    fewer = Page(render_report(copy).read_text(encoding="utf-8"))
    assert len(fewer.images) == _expected_figures(run["report"], subset) == len(page.images) - 2
    assert not any(img["alt"].startswith("Heatmap of attention head") for img in fewer.images)
    (copy / IMPORTANCE_FILE).unlink()
    none = Page(render_report(copy).read_text(encoding="utf-8"))
    assert "importance" not in none.sections and len(none.images) == len(page.images) - 4
    # An unreadable file is left out with a warning; the page is still written.
    (copy / IMPORTANCE_FILE).write_bytes(b"not safetensors")
    with pytest.warns(UserWarning, match="importance"):
        again = Page(render_report(copy).read_text(encoding="utf-8"))
    assert len(again.images) == len(none.images)


def test_page_loads_offline_in_a_headless_browser(run):
    required = os.environ.get("COMPRESS_REQUIRE_BROWSER") == "1"
    chromium = Path("/usr/bin/chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            pytest.fail("COMPRESS_REQUIRE_BROWSER=1 but the playwright package is not installed")
        pytest.skip("the playwright package is not installed")
    if not chromium.exists():
        if required:
            pytest.fail("COMPRESS_REQUIRE_BROWSER=1 but /usr/bin/chromium is missing")
        pytest.skip("/usr/bin/chromium is missing")
    expected = _expected_figures(run["report"], run["importance"])
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            tab = browser.new_page()
            tab.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            tab.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            tab.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            requests: list[str] = []
            tab.on("request", lambda r: requests.append(r.url))
            tab.goto(run["path"].resolve().as_uri(), wait_until="load")
            images = tab.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
            title = tab.title()
        finally:
            browser.close()
    assert not problems, problems
    assert len(images) == expected
    assert all(complete and width > 0 and alt for complete, width, alt in images), images
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    assert "compress report" in title


def test_missing_or_unreadable_report_is_a_data_error_and_writes_nothing(tmp_path):
    (tmp_path / "notes.txt").write_text("not a compress folder")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(compress.DataError, match=re.escape(str(tmp_path))) as info:
        render_report(tmp_path)
    assert "compress_report.json" in str(info.value) and "compress run" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    (tmp_path / "compress_report.json").write_text("{not json")
    with pytest.raises(compress.DataError, match="could not be read"):
        render_report(tmp_path)
    (tmp_path / "compress_report.json").write_text("[1, 2]")
    with pytest.raises(compress.DataError, match="not a report"):
        render_report(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["compress_report.json"])


def test_rendering_replaces_the_page_whole_and_leaves_no_temp_files(run, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(run["out"], copy)
    names = sorted(p.name for p in copy.iterdir())
    first = render_report(copy).read_bytes()
    second = render_report(copy).read_bytes()
    assert Page(second.decode()).tables and len(second) == len(first)  # same inputs: a page of the same size
    assert sorted(p.name for p in copy.iterdir()) == names  # only report.html, replaced; no temp file
    (copy / REPORT_HTML).write_text("old page")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(html_report.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        render_report(copy)
    assert (copy / REPORT_HTML).read_text() == "old page"  # untouched by the failed write
    assert sorted(p.name for p in copy.iterdir()) == names


def _synthetic_report() -> dict:
    """A report with every optional part (search, export with quantized checks, samples to escape), by hand."""
    shape = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2,
             "num_hidden_layers": 4, "head_dim": 16}
    return {
        "prune": {"shape_before": shape, "shape_after": {**shape, "intermediate_size": 48},
                  "params_before": 1000, "params_after": 600, "strategy": "width", "importance": "activation",
                  "plan_reason": "explicit <shape>", "removed": {"mlp": {"kept": 48, "removed": 48}}},
        "perplexity": {"teacher": 10.0, "pruned": 40.0, "reconstructed": 25.0},
        "stages": {
            "search": {"best": 1, "score": "perplexity", "candidates": [
                {"shape": {"intermediate_size": 64}, "params": 700, "score_before": 50.0, "score": 30.0, "error": None},
                {"shape": {"intermediate_size": 48}, "params": 600, "score_before": 40.0, "score": 20.0, "error": None},
                {"shape": {"hidden_size": 32}, "params": 500, "score_before": 90.0, "score": None,
                 "error": "out of <memory>"}]},
            "export": {
                "formats": ["safetensors", "onnx-genai-int4"],
                "parity": {"max_abs_diff": 0.5, "relative_diff": 0.01, "max_abs_logit": 50.0, "tolerance": 1e-4,
                           "passed": False},
                "int8": {"ppl_fp32": 25.0, "ppl_int8": 26.0, "ppl_change": 0.04},
                "genai": {"onnx-genai": {"precision": "fp32", "parity": {"max_abs_diff": 1e-5, "relative_diff": 2e-7,
                                                                          "max_abs_logit": 50.0, "tolerance": 1e-4,
                                                                          "passed": True}},
                          "onnx-genai-int4": {"precision": "int4", "perplexity": {"ppl_fp32": 25.0, "ppl_int4": 27.5,
                                                                                   "ppl_change": 0.1}}},
                "gguf": {"q8_0": {"gguf_file": "m.q8_0.gguf", "perplexity": {"ppl_torch": 25.0, "ppl_gguf": 25.25,
                                                                           "ppl_change": 0.01}}},
                "skipped": {"onnx": "needs <optimum> & onnx"}},
        },
        "seconds": {"total": 5.0},
        "samples": {"prompt": "<script>alert(1)</script>", "teacher": "a & b", "pruned": "x\x01y"},
    }


def test_build_html_shows_every_optional_part_escaped():
    report = _synthetic_report()
    text = build_html(report, None, "teacher: <x>\n")
    page = Page(text)
    assert "<script" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&lt;optimum&gt; &amp; onnx" in text and "out of &lt;memory&gt;" in text and "teacher: &lt;x&gt;" in text
    assert "x\\x01y" in page.pres and "a & b" in page.pres
    rows = {r[0]: r for r in page.table("stage", "params", "perplexity")["rows"]}
    assert list(rows) == ["teacher", "pruned", "reconstructed", "onnx-int8 (int8)", "onnx-genai-int4 (int4)",
                          "gguf q8_0"]
    assert [_number(rows[s][2]) for s in rows] == [10.0, 40.0, 25.0, 26.0, 27.5, 25.25]
    assert _number(rows["onnx-genai-int4 (int4)"][3]) == 2.75  # × teacher
    parity = page.table("check", "result")["rows"]
    assert [r[1].split()[0] for r in parity] == ["FAILED", "PASSED"]
    assert "0.5" in parity[0][1] and "0.0001" in parity[0][1]
    quant = page.table("export", "precision", "reference perplexity")["rows"]
    assert [r[-1] for r in quant] == ["+4.00%", "+10.00%", "+1.00%"]
    search = page.table("#", "shape (fields that differ from the teacher)")
    assert [c for c in search["classes"]] == ["", "best", ""] and search["rows"][2][-1] == "out of <memory>"
    assert page.table("format", "why")["rows"] == [["onnx", "needs <optimum> & onnx"]]
    # Figures: perplexity only (seconds hold just the total: a table, no bars; no importance, depth, distillation).
    assert len(page.images) == _expected_figures(report, None) == 1
    assert "time" in page.sections and not {"importance", "depth", "distill"} & set(page.sections)


def test_build_html_leaves_out_absent_sections():
    shape = {"hidden_size": 64, "num_hidden_layers": 4}
    minimal = {"prune": {"shape_before": shape, "shape_after": shape}, "perplexity": {}, "stages": {},
               "seconds": {}}
    page = Page(build_html(minimal))
    assert page.sections == ["shape"] and not page.images
    depth = {"removed_layers": [2], "method": "block_influence", "block_influence": [0.9, 0.5, 0.1, 0.4]}
    minimal["prune"]["removed"] = {"depth": depth}
    page = Page(build_html(minimal))
    assert page.sections == ["shape", "depth"] and len(page.images) == 1
    assert "[2]" in page.images[0]["alt"]
    with pytest.raises(compress.DataError):
        build_html([1, 2])  # type: ignore[arg-type]


def test_page_stays_small_for_a_30_layer_model():
    """SmolLM2-135M's sizes (30 layers, 1536 neurons, 9 heads, 576 channels) with every importance figure: the
    page stays well under 1.5 MB and every image within 1100 px."""
    g = torch.Generator().manual_seed(0)
    layers, inter, heads, hidden = 30, 1536, 9, 576
    importance = {"mlp": torch.rand(layers, inter, generator=g) ** 4 * 100,
                  "heads": torch.rand(layers, heads, generator=g) * 100,
                  "hidden": torch.rand(hidden, generator=g) * 1000, "layers": torch.rand(layers, generator=g)}
    importance["kept.mlp"] = torch.zeros(layers, inter, dtype=torch.uint8).scatter_(
        1, importance["mlp"].topk(384, dim=1).indices, 1)
    importance["kept.heads"] = (torch.arange(heads) < 6).to(torch.uint8).expand(layers, heads).contiguous()
    importance["kept.hidden"] = (torch.rand(hidden, generator=g) > 0.2).to(torch.uint8)
    importance["kept.layers"] = torch.ones(layers, dtype=torch.uint8)
    report = _synthetic_report()
    report["seconds"] = {"load": 1.0, "prune": 3.0, "total": 4.5}
    text = build_html(report, importance)
    page = Page(text)
    assert len(text.encode()) < 1_500_000
    assert len(page.images) == _expected_figures(report, importance) == 1 + 1 + 4
    assert all(h <= 1100 and w <= 1100 for h, w in _png_sizes(page))
    assert "the student kept every layer" in text


def test_perplexity_caption_describes_only_what_the_chart_shows():
    """The chart's caption and the note under the table explain orange bars (quantized exports) only when the
    chart has some, and blue bars (the student's stages) only when it has those."""
    report = _synthetic_report()
    report["data"] = {"evaluation": "held-out text", "eval_tokens": 256, "eval_seq_len": 32}
    text = build_html(report)
    [caption] = re.findall(r"<figcaption>(Perplexity per stage.*?)</figcaption>", text)
    assert "blue" in caption and "orange: quantized exports" in caption
    assert "Exports are measured" in text

    report["stages"]["export"] = {"formats": ["safetensors"], "parity": {}, "int8": {}, "genai": {}, "gguf": {},
                                  "skipped": {}}
    text = build_html(report)
    [caption] = re.findall(r"<figcaption>(Perplexity per stage.*?)</figcaption>", text)
    assert "blue" in caption
    assert "orange" not in text and "quantized" not in text.lower() and "Exports are measured" not in text

    exports_only = _synthetic_report()
    exports_only["perplexity"] = {}
    [caption] = re.findall(r"<figcaption>(Perplexity per stage.*?)</figcaption>", build_html(exports_only))
    assert "orange: quantized exports" in caption and "blue" not in caption
