"""Text sources: reading files or strings, a default corpus that exists offline, and packing into token windows.

Text is read and tokenized in pieces and tokenization stops as soon as enough tokens are packed, so a
multi-gigabyte corpus costs only what the caller asked for.

Data is a path (``str`` or ``pathlib.Path``: UTF-8 text, or ``.jsonl`` with a ``text`` field), literal text, a
list of documents, or a ``datasets.Dataset``. A string is literal text unless it names an existing file or
folder, or looks like a file name: no whitespace, and a path separator or a file extension (``train.tx``,
``data/train.txt``). Such a name that does not exist is refused rather than read as text; to pass text that
looks like a file name, put it in a list.
"""

from __future__ import annotations

import codecs
import difflib
import hashlib
import importlib
import inspect
import json
import os
import re
import sys
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import DataError
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
    part (``held_out``), so calibration and evaluation never share text (even text two modules share).
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


def default_calibration_source() -> TextSource:
    """``../shared/data/pydocs/train.txt`` when this checkout has it, else stdlib docstrings."""
    return PYDOCS_TRAIN if PYDOCS_TRAIN.is_file() else stdlib_docstrings()


def default_eval_source() -> TextSource:
    """``../shared/data/pydocs/valid.txt`` when present, else held-out stdlib docstrings."""
    return PYDOCS_VALID if PYDOCS_VALID.is_file() else stdlib_docstrings(max_chars=400_000, held_out=True)


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
