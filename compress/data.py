"""Text sources: reading files or strings, a default corpus that exists offline, and packing into token windows.

Text is read and tokenized in pieces and tokenization stops as soon as enough tokens are packed, so a
multi-gigabyte corpus costs only what the caller asked for.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
import warnings
import zlib
from pathlib import Path
from typing import Iterable, Iterator, Union

import torch

from .errors import DataError

TextSource = Union[str, os.PathLike, Iterable[str]]

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
PYDOCS_TRAIN = SHARED_DATA / "pydocs" / "train.txt"
PYDOCS_VALID = SHARED_DATA / "pydocs" / "valid.txt"
SHAKESPEARE = SHARED_DATA / "shakespeare" / "input.txt"

_CHUNK_CHARS = 1 << 20
# Standard-library modules whose import does something (opens a browser, prints, starts a GUI).
_SIDE_EFFECT_MODULES = {"antigravity", "this", "idlelib", "turtle", "turtledemo", "tkinter", "pydoc_data"}


def _looks_like_path(source: str | os.PathLike) -> bool:
    if isinstance(source, os.PathLike):
        return True
    return "\n" not in source and len(source) < 4096 and (
        os.sep in source or source.endswith((".txt", ".md", ".jsonl", ".json")))


TEXT_FIELD = "text"


def _iter_jsonl(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number} is not valid JSON: {exc.msg}") from exc
            if not isinstance(row, dict) or not isinstance(row.get(TEXT_FIELD), str):
                raise DataError(f"{path}:{number} has no string field {TEXT_FIELD!r}; each line must be "
                                f'{{"{TEXT_FIELD}": "..."}}')
            yield row[TEXT_FIELD]


def iter_text(source: TextSource) -> Iterator[str]:
    """Yield text pieces from a path (plain text, or ``.jsonl`` with a ``text`` field), a literal string, an
    iterable of strings or of ``{"text": ...}`` rows — which covers a ``datasets.Dataset`` — read lazily."""
    if isinstance(source, (str, os.PathLike)):
        if _looks_like_path(source):
            path = Path(source)
            if not path.is_file():
                raise DataError(f"text file {str(path)!r} does not exist")
            if path.suffix in (".jsonl", ".json"):
                yield from _iter_jsonl(path)
                return
            with path.open(encoding="utf-8", errors="replace") as fh:
                while piece := fh.read(_CHUNK_CHARS):
                    yield piece
        else:
            yield source
        return
    for doc in source:
        if isinstance(doc, dict):
            doc = doc.get(TEXT_FIELD)
        if not isinstance(doc, str):
            raise DataError(f"text sources must yield str or rows with a {TEXT_FIELD!r} string, got {type(doc).__name__}")
        yield doc


def describe_source(source: TextSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source) if _looks_like_path(source) else f"<text, {len(source)} chars>"
    return f"<{type(source).__name__} of documents>"


def pack_tokens(
    tokenizer, source: TextSource, seq_len: int, max_windows: int | None = None, skip_tokens: int = 0
) -> torch.Tensor:
    """Tokenize ``source`` and pack it into non-overlapping windows of ``seq_len`` tokens, ``[N, seq_len]``.

    Documents are joined with the tokenizer's EOS token. Stops once ``max_windows`` windows are full; the first
    ``skip_tokens`` tokens are dropped (used to keep splits of one file apart). A trailing partial window is
    dropped.
    """
    if seq_len < 2:
        raise DataError(f"seq_len should be at least 2, got {seq_len}")
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
