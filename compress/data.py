"""Text sources: reading files or strings, a default corpus that exists offline, and packing into token windows.

When no text is given, the default corpus is the development checkout's ``../shared/data/pydocs`` files when
they exist, else :func:`package_docstrings`: the docstrings of the installed packages, read without importing
them, split by package into train and held-out sides.

Text is read and tokenized in pieces and tokenization stops as soon as enough tokens are packed, so a
multi-gigabyte corpus costs only what the caller asked for.

Data is a path (``str`` or ``pathlib.Path``: UTF-8 text, or ``.jsonl`` with a ``text`` field), literal text, a
list of documents, or a ``datasets.Dataset``. A string is literal text unless it names an existing file or
folder, or looks like a file name: no whitespace, and a path separator or a file extension (``train.tx``,
``data/train.txt``). Such a name that does not exist is refused rather than read as text; to pass text that
looks like a file name, put it in a list.
"""

from __future__ import annotations

import ast
import codecs
import copy
import difflib
import functools
import hashlib
import importlib
import inspect
import json
import os
import re
import sys
import sysconfig
import time
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import DataError, warn
from .validate import check_int

TextSource = str | os.PathLike | Iterable[str]

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
PYDOCS_TRAIN = SHARED_DATA / "pydocs" / "train.txt"
PYDOCS_VALID = SHARED_DATA / "pydocs" / "valid.txt"
SHAKESPEARE = SHARED_DATA / "shakespeare" / "input.txt"

_CHUNK_CHARS = 1 << 20
_SNIFF_BYTES = 8192
_MAX_PATH_CHARS = 4096
# "train.txt", "docs.jsonl", "train.tx": a dot and a short extension that starts with a letter ("v1.0" is text).
_FILE_SUFFIX = re.compile(r"\.[A-Za-z][A-Za-z0-9_-]{0,9}$")
# Side-effect-free hints for binary formats people hand over as data by mistake.
_BINARY_HINTS = {
    ".parquet": "load it with datasets.load_dataset('parquet', data_files=...)['train'] and pass the Dataset",
    ".arrow": "load it with datasets.Dataset.from_file(...) and pass the Dataset",
    ".gz": "decompress it first",
    ".zip": "extract it first",
    ".bz2": "decompress it first",
    ".xz": "decompress it first",
    ".zst": "decompress it first",
    ".safetensors": "that is a weights file, not text",
    ".bin": "that looks like a weights file, not text",
    ".gguf": "that is a model file, not text",
    ".pt": "that is a PyTorch file, not text",
}
# Standard-library modules whose import does something (opens a browser, prints, starts a GUI).
_SIDE_EFFECT_MODULES = {"antigravity", "this", "idlelib", "turtle", "turtledemo", "tkinter", "pydoc_data"}


def as_path(source: str | os.PathLike) -> Path | None:
    """The file a text source names, or None when it is literal text.

    The rule: an ``os.PathLike`` (``pathlib.Path``) is always a path. A ``str`` is a path when it names an
    existing file or directory, or when it *looks like* one: a single line under 4096 characters with no
    whitespace that contains a path separator (``data/train.txt``), starts with ``~``, or ends in a file
    extension (``train.tx``, ``valid.jsonl``); or, with whitespace, one that has both a path separator and a
    file extension (``My Data/train.txt``). Such a string that names nothing is refused ("does not exist")
    rather than read as a few words of text. Every other string is literal text; to pass text that could look
    like a path, give it in a list (``["data/train.txt"]`` is one document).
    """
    if isinstance(source, os.PathLike):
        return Path(source)
    if (
        not isinstance(source, str)
        or not source
        or len(source) >= _MAX_PATH_CHARS
        or "\x00" in source
        or "\n" in source
        or "\r" in source
    ):
        return None
    path = Path(source).expanduser() if source.startswith("~") else Path(source)
    try:
        if path.exists():
            return path
    except (OSError, ValueError):  # a name the file system cannot even look up is not a path
        return None
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    has_separator = any(sep in source for sep in separators) or source.startswith("~")
    if any(ch.isspace() for ch in source):  # text, unless it is a folder path to a file name ("My Data/x.txt")
        return path if has_separator and _FILE_SUFFIX.search(source) and len(source) < 260 else None
    if has_separator or _FILE_SUFFIX.search(source):
        return path
    return None


def looks_like_path(source: str | os.PathLike) -> bool:
    return as_path(source) is not None


TEXT_FIELD = "text"
_LITERAL_RULE = (
    "A string without whitespace that has a path separator or a file extension (or one with a path "
    "separator and a file extension) is taken as a file name; to pass literal text, give a string with "
    "whitespace or a list of strings."
)


def _missing_file(path: Path, given: str | os.PathLike) -> DataError:
    """Say that ``path`` does not exist, where it was looked for, and what similar names exist there."""
    text = str(given)
    notes = [] if path.is_absolute() else [f"looked for in the working directory {os.getcwd()!r}"]
    if "://" in text:
        notes.append("URLs are not downloaded: download the file and pass its path")
    else:
        parent = path.parent if str(path.parent) else Path(".")
        try:
            if parent.is_dir():
                names = [p.name for _, p in zip(range(2000), parent.iterdir())]
                close = difflib.get_close_matches(path.name, names, n=3, cutoff=0.6)
                if close:
                    notes.append(f"did you mean {' or '.join(repr(str(parent / c)) for c in close)}?")
            else:
                notes.append(f"its folder {str(parent)!r} does not exist either")
        except OSError:
            pass
    where = f" ({'; '.join(notes)})" if notes else ""
    return DataError(f"text file {text!r} does not exist{where}. {_LITERAL_RULE}")


def check_text_file(path: Path, given: str | os.PathLike) -> None:
    """Refuse a path that is missing, a directory, or not UTF-8 text (judged by its first 8 KiB)."""
    if path.is_dir():
        try:
            inside = sorted(p.name for p in path.iterdir() if p.suffix in (".txt", ".md", ".jsonl", ".json"))[:3]
        except OSError:
            inside = []
        example = f" such as {', '.join(repr(str(path / n)) for n in inside)}" if inside else ""
        raise DataError(
            f"{str(given)!r} is a directory, not a text file; give a file inside it{example} (or a list of documents)"
        )
    if not path.exists():
        raise _missing_file(path, given)
    if not path.is_file():
        raise DataError(f"{str(given)!r} is not a regular file; give a UTF-8 text or .jsonl file")
    with path.open("rb") as fh:
        head = fh.read(_SNIFF_BYTES)
    hint = _BINARY_HINTS.get(path.suffix.lower())
    if b"\x00" in head:
        raise DataError(
            f"{str(given)!r} looks like a binary file (NUL bytes in its first {_SNIFF_BYTES} bytes), not UTF-8 "
            f"text{'; ' + hint if hint else ' (or it is UTF-16: convert it to UTF-8)'}. Give a text file, a .jsonl "
            "file with a 'text' field, a list of strings or a datasets.Dataset"
        )
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{str(given)!r} is not UTF-8 text (undecodable byte {head[exc.start : exc.start + 1]!r} at offset "
            f"{exc.start}){'; ' + hint if hint else ''}; convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def derived_seed(*parts: object) -> int:
    """A 63-bit seed derived from ``parts`` (e.g. run seed, rank, step): independent for every combination and
    the same in every process and every rerun, so any piece of a seeded run can be redone alone."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def iter_jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` for each non-blank line of a JSON-lines file; a line that is not JSON or
    not UTF-8 raises a :class:`DataError` naming the file and the line."""
    number = 0
    try:
        with path.open(encoding="utf-8-sig") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{number} is not valid JSON: {exc.msg}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:{number + 1} is not UTF-8 text ({exc.reason}); convert the file to UTF-8") from None


def _iter_jsonl(path: Path) -> Iterator[str]:
    for number, row in iter_jsonl_rows(path):
        if not isinstance(row, dict) or not isinstance(row.get(TEXT_FIELD), str):
            raise DataError(
                f'{path}:{number} has no string field {TEXT_FIELD!r}; each line must be {{"{TEXT_FIELD}": "..."}}'
            )
        yield row[TEXT_FIELD]


def _describe_item(doc: object) -> str:
    text = repr(doc)
    return f"{type(doc).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def iter_text(source: TextSource) -> Iterator[str]:
    """Yield text pieces from a path (plain text, or ``.jsonl`` with a ``text`` field), a literal string, an
    iterable of strings or of ``{"text": ...}`` rows — which covers a ``datasets.Dataset`` — read lazily.

    Which strings are paths: see :func:`as_path` (a string with no whitespace and a path separator or a file
    extension must name an existing file; other strings are literal text). Refused with a :class:`DataError`:
    a missing file, a directory, a binary or non-UTF-8 file (judged by its first 8 KiB), bytes, a dict (pick a
    split or a column), anything that is not iterable, and list items that are not text (naming their
    position and type).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        raise DataError(
            f"data given as {type(source).__name__} ({len(source)} bytes); decode it to str "
            "(e.g. data.decode('utf-8')) or pass the file's path"
        )
    if isinstance(source, (str, os.PathLike)):
        path = as_path(source)
        if path is None:
            assert isinstance(source, str)  # as_path gives a Path for every os.PathLike
            yield source
            return
        check_text_file(path, source)
        if path.suffix in (".jsonl", ".json"):
            yield from _iter_jsonl(path)
            return
        with path.open(encoding="utf-8-sig", errors="replace") as fh:
            while piece := fh.read(_CHUNK_CHARS):
                yield piece
        return
    if isinstance(source, Mapping):
        keys = list(source)[:5]
        raise DataError(
            f"data given as a {type(source).__name__} with keys {keys}; give text documents: a list of "
            "strings, a datasets.Dataset (for a DatasetDict pick a split, e.g. data['train']) or a path"
        )
    if not isinstance(source, Iterable):
        raise DataError(f"data should be a path, a string or a list of documents, got {_describe_item(source)}")
    for position, doc in enumerate(source):
        if isinstance(doc, Mapping):
            text = doc.get(TEXT_FIELD)
            if not isinstance(text, str):
                raise DataError(
                    f"data[{position}] is a row without a string {TEXT_FIELD!r} field (its keys: "
                    f"{list(doc)[:5]}); every row must hold its document under {TEXT_FIELD!r}"
                )
            doc = text
        elif not isinstance(doc, str):
            raise DataError(
                f"data[{position}] is {_describe_item(doc)}, not text: every document must be a str "
                f"(or a {{{TEXT_FIELD!r}: str}} row)"
                + ("; decode bytes first" if isinstance(doc, (bytes, bytearray)) else "")
            )
        yield doc


def check_source(source: TextSource) -> None:
    """Refuse, without reading it, a text source :func:`iter_text` would refuse: a missing, directory, binary or
    non-UTF-8 file (its first 8 KiB are read), bytes, a dict, something not iterable, and — for a list or tuple —
    items that are not text. Generators and datasets are not consumed (their items are checked when read).
    Meant for pipelines that should fail before any expensive work (``compress.compress``)."""
    if isinstance(source, (str, os.PathLike)):
        path = as_path(source)
        if path is not None:
            check_text_file(path, source)
        return
    if isinstance(source, (list, tuple)):
        for _ in iter_text(source):  # a list is in memory already: checking its items reads no file
            pass
        return
    if isinstance(source, (bytes, bytearray, memoryview, Mapping)) or not isinstance(source, Iterable):
        next(iter_text(source), None)  # raises the same message iter_text gives


def describe_source(source: TextSource) -> str:
    """How reports name a text source: a path, ``<text, N chars>``, a :class:`Corpus`'s description, or
    ``<list of documents>``."""
    if isinstance(source, Corpus) and source.description:
        return source.description
    if isinstance(source, (str, os.PathLike)):
        if looks_like_path(source):
            return str(source)
        assert isinstance(source, str)  # every os.PathLike is a path
        return f"<text, {len(source)} chars>"
    return f"<{type(source).__name__} of documents>"


def pack_tokens(
    tokenizer, source: TextSource, seq_len: int, max_windows: int | None = None, skip_tokens: int = 0
) -> torch.Tensor:
    """Tokenize ``source`` and pack it into non-overlapping windows of ``seq_len`` tokens, ``[N, seq_len]``.

    Documents are joined with the tokenizer's EOS token. Stops once ``max_windows`` windows are full; the first
    ``skip_tokens`` tokens are dropped (used to keep splits of one file apart). A trailing partial window is
    dropped.
    """
    check_int("seq_len", seq_len, 2)
    check_int("max_windows", max_windows, 1, allow_none=True)
    check_int("skip_tokens", skip_tokens, 0)
    if tokenizer is None:
        raise DataError(
            f"{describe_source(source)} is text, which needs a tokenizer to become token ids; pass "
            "the model's tokenizer"
        )
    need = None if max_windows is None else skip_tokens + max_windows * seq_len
    ids: list[int] = []
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for piece in iter_text(source):
        if not piece.strip():
            continue
        ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
        ids.extend(sep)
        if need is not None and len(ids) >= need:
            break
    ids = ids[skip_tokens:]
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise DataError(
            f"{describe_source(source)} gives {len(ids)} tokens after skipping {skip_tokens}, fewer than one "
            f"window of seq_len={seq_len}; give more text or a shorter seq_len"
        )
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def stdlib_docstrings(max_chars: int = 4_000_000, held_out: bool = False) -> list[str]:
    """Docstrings of Python's standard library: an English technical corpus on any machine, offline.

    Docstrings are split deterministically by a checksum of their text into a calibration part and a held-out
    part (``held_out``), so calibration and evaluation never share text (even text two modules share). The
    modules are imported (all but a few known to open windows or print). About 260,000 characters of calibration
    text with Python 3.11: too little for a default run, whose text is :func:`package_docstrings`; kept for
    code that writes a small sample file (the README's Python API example).
    """
    docs: list[str] = []
    seen: set[str] = set()
    total = 0
    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in _SIDE_EFFECT_MODULES)
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecated modules announce themselves on import
                module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - some stdlib modules need optional system libraries
            continue
        for _, obj in inspect.getmembers(module):
            own = (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", None) == name
            # Only what the module itself defines and documents (getdoc would inherit docstrings).
            doc = inspect.cleandoc(obj.__doc__) if own and isinstance(obj.__doc__, str) else None
            if not doc or len(doc) <= 200 or doc in seen or (zlib.crc32(doc.encode()) % 5 == 0) != held_out:
                continue
            seen.add(doc)
            docs.append(doc)
            total += len(doc)
        if total >= max_chars:
            break
    return docs


#: Characters of text the train side of the default corpus reads (see :func:`package_docstrings`); the held-out
#: side grows alongside (about a fifth as much, at least a tenth). SmolLM2's tokenizer makes about 3.8
#: characters of these docstrings one token, so this is some 650,000 tokens: a default calibration (1024 windows
#: of 512 tokens, 524,288 tokens) followed by over 100,000 tokens of distillation it never read, no window seen
#: twice. The README's demo reads 65,536 + 32,768. Building it took 3.3 s on 2 CPU cores, once per process.
DEFAULT_CORPUS_CHARS = 2_500_000
# A docstring shorter than this is a one-line summary: little text and mostly repeated phrasing.
_MIN_DOC_CHARS = 200
# Source files larger than this are generated tables or data (parsing them costs time and yields no prose).
_MAX_SOURCE_BYTES = 1 << 20
# Folders left out: tests and test helpers, vendored copies of other packages (duplicate text), and folders
# that are not part of the package they sit in.
_TEST_DIRS = frozenset({"test", "tests", "testing", "idle_test"})
_VENDORED_DIRS = frozenset({"_vendor", "vendor", "vendored", "_vendored", "third_party", "_distutils"})
_SKIP_DIRS = _TEST_DIRS | _VENDORED_DIRS | {"site-packages", "dist-packages", "__pycache__"}
# This library's own docstrings change with every commit; the default corpus should not.
_NOT_IN_CORPUS = frozenset({"compress"})
# A docstring that opens with a licence is the same boilerplate in many files.
_BOILERPLATE = re.compile(r"copyright|licen[cs]ed under|permission is hereby granted", re.IGNORECASE)
_TRIPLE_QUOTES = (re.compile(rb'"""'), re.compile(rb"'''"))
# Statements that hold other statements: where a function or class, and so a docstring, can be defined.
_DEFINITIONS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_COMPOUND = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try, ast.ExceptHandler, ast.Match)
_BLOCKS: tuple[type[ast.AST], ...] = (*_DEFINITIONS, *_COMPOUND, ast.match_case, getattr(ast, "TryStar", ast.Try))
_HELD_OUT_EVERY = 5  # one package in five, by a hash of its name, is held out


class Corpus(list):
    """A list of documents that says what it is: :func:`describe_source` (and so every report) prints its
    ``description`` rather than ``<list of documents>``."""

    description: str = ""


def _site_dirs() -> list[Path]:
    """The interpreter's standard library folder, then its site-packages folders in ``sys.path`` order."""
    folders = [Path(sysconfig.get_paths()["stdlib"])]
    for entry in sys.path:
        path = Path(entry or ".")
        if path.name in ("site-packages", "dist-packages") and path.is_dir() and path not in folders:
            folders.append(path)
    return folders


def installed_packages() -> list[tuple[str, Path]]:
    """``(name, path)`` of every top-level package or module of the standard library and of the installed
    packages (a folder or a ``.py`` file), sorted by name. A name found twice is taken where ``import`` would find
    it first (the standard library before site-packages). Nothing is imported."""
    found: dict[str, Path] = {}
    stdlib, *sites = _site_dirs()
    for name in sorted(sys.stdlib_module_names):
        for path in (stdlib / name, stdlib / f"{name}.py"):
            if name not in _SKIP_DIRS and name not in found and path.exists():
                found[name] = path
    for folder in sites:
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            continue
        for path in entries:
            is_dir = path.is_dir()
            name = path.name if is_dir else path.stem
            if (is_dir and path.suffix) or (not is_dir and path.suffix != ".py"):  # foo.dist-info, foo.so
                continue
            if name.isidentifier() and not name.startswith("__") and name not in _SKIP_DIRS | _NOT_IN_CORPUS:
                found.setdefault(name, path)
    return sorted(found.items())


def _source_files(path: Path) -> Iterator[Path]:
    """The ``.py`` files of a package in a fixed order, leaving out tests and vendored copies (found lazily)."""
    if path.is_file():
        yield path
        return
    for folder, dirs, names in os.walk(path):  # symbolic links to folders are not followed
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(names):
            test = name.startswith("test_") or name.endswith("_test.py") or name == "conftest.py"
            if name.endswith(".py") and not test:
                yield Path(folder) / name


def _may_hold_long_docstring(source: bytes) -> bool:
    """False when no two successive triple quotes of a kind are ``_MIN_DOC_CHARS`` apart: the file then has no
    docstring long enough to keep (a cleaned docstring is never longer than its source), and is not parsed."""
    for quotes in _TRIPLE_QUOTES:
        starts = [m.start() for m in quotes.finditer(source)]
        if any(b - a >= _MIN_DOC_CHARS for a, b in zip(starts, starts[1:])):
            return True
    return False


def source_docstrings(path: str | os.PathLike, min_chars: int = 0) -> list[str]:
    """The module, class and function docstrings of one Python source file (those of ``min_chars`` or more),
    read with :mod:`ast`: the file is never imported or run. Cleaned of their indentation, in source order;
    ``[]`` for a file that cannot be read or parsed or is over 1 MiB (generated tables, not prose)."""
    path = Path(path)
    try:
        if path.stat().st_size > _MAX_SOURCE_BYTES:
            return []
        source = path.read_bytes()
    except OSError:
        return []
    if min_chars >= _MIN_DOC_CHARS and not _may_hold_long_docstring(source):
        return []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences and the like in old sources
            tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # Python 2 files, templates, deep nesting
        return []
    docs: list[str] = []
    stack: list[ast.AST] = [tree]
    while stack:  # statements only (a docstring opens a body): expressions are never visited, which is fast
        node = stack.pop()
        if isinstance(node, (ast.Module, *_DEFINITIONS)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= min_chars:
                docs.append(doc)
        for field_name in ("body", "orelse", "finalbody", "handlers", "cases"):
            block = getattr(node, field_name, None)
            if isinstance(block, list):
                stack.extend(reversed([child for child in block if isinstance(child, _BLOCKS)]))
    return docs


def is_held_out(package: str) -> bool:
    """Whether a package's docstrings are on the held-out side of the default corpus (a hash of its name)."""
    return derived_seed("held-out package", package) % _HELD_OUT_EVERY == 0


@functools.lru_cache(maxsize=4)
def _package_corpus(max_chars: int) -> tuple[Corpus, Corpus, dict]:
    """The default corpus: its train and held-out sides and what it read (see :func:`package_docstrings`)."""
    start = time.perf_counter()
    queues = [(name, _source_files(path)) for name, path in installed_packages()]
    sides: tuple[Corpus, Corpus] = (Corpus(), Corpus())
    chars = [0, 0]
    used: tuple[set[str], set[str]] = (set(), set())
    seen: set[str] = set()

    def full() -> bool:
        return chars[0] >= max_chars and chars[1] >= max_chars // 10

    while queues and not full():  # a round reads the next file of every package that has one left
        remaining = []
        for name, files in queues:
            path = next(files, None)
            if path is None:
                continue
            remaining.append((name, files))
            side = int(is_held_out(name))
            for doc in source_docstrings(path, _MIN_DOC_CHARS):
                if doc in seen or _BOILERPLATE.search(doc[:300]):
                    continue
                seen.add(doc)
                sides[side].append(doc)
                used[side].add(name)
                chars[side] += len(doc)
            if full():
                break
        queues = remaining
    for corpus, names, label in zip(sides, used, ("train", "held-out")):
        corpus.description = (
            f"<docstrings of {len(names)} installed packages ({label} side): {len(corpus)} documents, "
            f"{sum(map(len, corpus)):,} chars>"
        )
    info = {
        "packages": {"train": sorted(used[0]), "held_out": sorted(used[1])},
        "documents": {"train": len(sides[0]), "held_out": len(sides[1])},
        "chars": {"train": chars[0], "held_out": chars[1]},
        "complete": full(),
        "seconds": round(time.perf_counter() - start, 2),
    }
    if not full():
        warn(
            f"the installed packages hold {chars[0]:,} + {chars[1]:,} characters of docstrings (train + held-out), "
            f"fewer than the default corpus reads ({max_chars:,} + {max_chars // 10:,}): a run that needs more "
            "text repeats windows (the report's distillation 'epochs_seen' is then above 1). Pass your own text "
            "with data= and eval_data= (--data, --eval-data)"
        )
    return sides[0], sides[1], info


def package_docstrings(held_out: bool = False, max_chars: int = DEFAULT_CORPUS_CHARS) -> Corpus:
    """Docstrings of the standard library and of every installed package: the default text when no data is
    given, on any machine, offline (an environment with torch and transformers holds tens of megabytes).

    Read from the source files with :mod:`ast`, never imported: nothing runs, prints, opens a window or hangs.
    Left out: test folders and files, vendored copies (``_vendor``, ``third_party``, ...), files over 1 MiB,
    docstrings under 200 characters, licence boilerplate, this library itself, and every docstring already
    taken (forks and re-exports repeat text).

    Split **by package**: a package (``torch``, ``email``, ...) goes wholly to the train or to the held-out side,
    by a hash of its name (:func:`is_held_out`: one in five), so calibration and distillation (train) and
    evaluation (held-out) never read the same package. The files are visited in one fixed order — the next
    file of every package in turn, packages sorted by name — so the text is the same on the same machine and
    any stretch of it mixes many packages. Reading stops once the train side holds ``max_chars`` characters and
    the held-out side a tenth of that; that order does not depend on ``max_chars``, and a docstring is kept
    only where it first occurs in it, so no two calls (either side, any ``max_chars``) share a document.

    Built once per process and ``max_chars`` (a few seconds for the default; :func:`package_corpus_info` says
    what it read and how long it took); each call returns a new list. When the installed packages hold less
    text than that, a warning says so.
    """
    check_int("max_chars", max_chars, 1)
    train, held, _ = _package_corpus(max_chars)
    side = held if held_out else train
    documents = Corpus(side)
    documents.description = side.description
    return documents


def package_corpus_info(max_chars: int = DEFAULT_CORPUS_CHARS) -> dict:
    """What :func:`package_docstrings` read for ``max_chars``: each side's packages, documents and characters,
    whether it reached its budget (``complete``) and the seconds the build took (built now if not yet)."""
    check_int("max_chars", max_chars, 1)
    return copy.deepcopy(_package_corpus(max_chars)[2])


def default_calibration_source() -> TextSource:
    """``../shared/data/pydocs/train.txt`` when this checkout has it (development), else the train side of the
    installed packages' docstrings (:func:`package_docstrings`): enough for a default calibration and
    distillation that never repeats a window."""
    return PYDOCS_TRAIN if PYDOCS_TRAIN.is_file() else package_docstrings()


def default_eval_source() -> TextSource:
    """``../shared/data/pydocs/valid.txt`` when present, else the held-out side of the installed packages'
    docstrings (packages the calibration text never reads)."""
    return PYDOCS_VALID if PYDOCS_VALID.is_file() else package_docstrings(held_out=True)


def same_file(a: TextSource, b: TextSource) -> bool:
    """True when ``a`` and ``b`` are paths of one existing file (calibration and held-out text must differ)."""
    try:
        return (
            isinstance(a, (str, os.PathLike))
            and isinstance(b, (str, os.PathLike))
            and Path(a).is_file()
            and Path(b).is_file()
            and Path(a).resolve() == Path(b).resolve()
        )
    except (OSError, ValueError):
        return False
