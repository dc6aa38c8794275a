"""Safe file output: refuse to clobber, write into a temporary sibling folder, rename into place."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutputExistsError


def check_output_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Fail early if ``out_dir`` exists, is not empty, and ``overwrite`` is False (or it is a file)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {str(out)!r} exists and is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output folder {str(out)!r} exists and is not empty; choose another folder or pass overwrite=True"
        )
    return out


@contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``out_dir``; on success it replaces ``out_dir``, on error it vanishes.

    So a crash or a failed check never leaves a half-written folder that looks like a finished one.
    """
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
