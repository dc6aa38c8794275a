"""Safe file output: refuse to clobber, write into a temporary folder, move into place only when all succeeded.

The rules, all checked by :func:`check_output_dir` before any work starts:

* a non-empty output folder is refused unless ``overwrite=True``, and ``overwrite=True`` replaces the *whole*
  folder, including files compress did not write;
* a folder that holds the run's own inputs (calibration, distillation or evaluation text, the teacher) or the
  distillation checkpoints is refused even with ``overwrite=True``: replacing it would delete them;
* a symbolic link is kept: the files go into the folder it points to (a link to nothing is refused);
* the parent folder (or the nearest one that exists) must be a writable folder;
* a folder that cannot be renamed (the current working directory, a mount point, a folder in a parent that is
  not writable) has its contents replaced entry by entry instead of being swapped whole.

Whatever happens, no ``.*.tmp-*`` / ``.*.old-*`` folder is left behind, and on any failure (Ctrl-C included)
the output folder is as it was before.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from .errors import ConfigError, OutputExistsError, spelled


def overwrite_rule() -> str:
    """What overwriting means, in the spelling of the interface in use."""
    flag = spelled("overwrite=True", "--overwrite")
    return f"{flag} replaces the whole folder, including files compress did not write"


@dataclass(frozen=True)
class OutputPlan:
    """Where the files will go (``real``: the output folder with symlinks resolved) and how they get there
    (``in_place``: replace the folder's contents entry by entry because the folder itself cannot be renamed)."""

    path: Path
    real: Path
    in_place: bool


def _inside(child: Path, folder: Path) -> bool:
    return child == folder or folder in child.parents


def _input_paths(value) -> list[Path]:
    """The file system paths an input names: a path-like, or a string that is an existing path."""
    if isinstance(value, os.PathLike) or (
        isinstance(value, str) and value.strip() and "\n" not in value and len(value) < 4096
    ):
        try:
            if os.path.lexists(value):
                return [Path(os.path.abspath(value)), Path(value).resolve()]
        except (OSError, ValueError):
            return []
    return []


def _cwd() -> Path | None:
    try:
        return Path.cwd().resolve()
    except OSError:  # the current folder was deleted
        return None


def _probe_writable(folder: Path) -> str | None:
    """None when a folder can be created in ``folder``, else why not (os.access is wrong for root and for
    read-only file systems, so this really creates and removes an empty folder)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".compress-probe-", dir=folder))
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    return None


def check_output_dir(
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    *,
    inputs: Mapping[str, object] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
) -> OutputPlan:
    """Refuse, before any work, an output folder the run could not write or would damage.

    ``inputs`` maps a description ("calibration data", "teacher", ...) to what the run reads; any that is a
    path inside ``out_dir`` is refused even with ``overwrite=True`` (replacing the folder would delete it).
    ``checkpoint_dir`` (``DistillConfig.output_dir``) must not lie inside ``out_dir`` either. Without
    ``overwrite`` a non-empty folder is refused; with it the whole folder is replaced, including files
    compress did not write. Returns where and how the files will be written.
    """
    if not isinstance(out_dir, (str, os.PathLike)) or not str(os.fspath(out_dir)).strip():
        raise ConfigError(f"out_dir should be a folder path, got {out_dir!r}; give the folder to write the student to")
    path = Path(out_dir)
    if path.is_symlink() and not path.exists():
        raise ConfigError(
            f"output path {str(path)!r} is a symbolic link to {os.readlink(path)!r}, which does not "
            "exist; create that folder, remove the link, or give another folder"
        )
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise ConfigError(f"output path {str(path)!r} cannot be resolved ({exc}); give a plain folder path") from exc
    if real == Path(real.anchor):
        raise ConfigError(f"output folder {str(path)!r} is the root of the file system; give a folder inside it")
    if real.exists() and not real.is_dir():
        raise OutputExistsError(f"output path {str(path)!r} exists and is a file; give a folder path")

    for what, value in (inputs or {}).items():
        for p in _input_paths(value):
            if _inside(p, real):
                raise OutputExistsError(
                    f"output folder {str(path)!r} holds this run's {what} ({str(value)!r}); writing the student "
                    f"there would replace it, {what} included (even with "
                    f"{spelled('overwrite=True', '--overwrite')}). Write to another folder, "
                    "or move the input out of it"
                )
    if checkpoint_dir is not None:
        ckpt = Path(os.path.abspath(checkpoint_dir))
        if _inside(ckpt, real) or _inside(Path(checkpoint_dir).resolve(), real):
            raise ConfigError(
                f"DistillConfig.output_dir {str(checkpoint_dir)!r} lies inside the output folder {str(path)!r}: the "
                "checkpoints would make it non-empty before the student is written (and be replaced with it). "
                f"Put the checkpoints in a folder beside it, e.g. {str(real) + '-checkpoints'!r}"
            )

    if real.is_dir():
        if any(real.iterdir()) and not overwrite:
            where = f" (a link to {str(real)!r})" if path.is_symlink() else ""
            raise OutputExistsError(
                f"output folder {str(path)!r}{where} exists and is not empty; choose another folder or pass "
                f"{spelled('overwrite=True', '--overwrite')} ({overwrite_rule()})"
            )
        parent_problem = _probe_writable(real.parent)
        in_place = real == _cwd() or os.path.ismount(real) or parent_problem is not None
        if in_place:
            problem = _probe_writable(real)
            if problem:
                raise ConfigError(f"cannot write into output folder {str(path)!r} ({problem}); give a writable folder")
        return OutputPlan(path, real, in_place)

    ancestor = real.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(
            f"cannot create output folder {str(path)!r}: {str(ancestor)!r} is a file, not a folder; "
            "give a path whose parent is a folder"
        )
    problem = _probe_writable(ancestor)
    if problem:
        raise ConfigError(
            f"cannot create output folder {str(path)!r}: {str(ancestor)!r} is not writable "
            f"({problem}); give a folder you can write to"
        )
    return OutputPlan(path, real, False)


def _remove(folder: Path) -> None:
    """Delete a temporary folder, even when Ctrl-C arrives meanwhile (then finish, and pass it on)."""
    try:
        shutil.rmtree(folder, ignore_errors=True)
    except KeyboardInterrupt:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _clear(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def _replace_contents(src: Path, out: Path) -> None:
    """Make ``out``'s contents those of ``src``, entry by entry, for a folder that cannot be renamed.

    The old entries are first moved aside into a hidden folder inside ``out`` (same file system: renames),
    the new ones moved in, then the old ones deleted. On any failure only what this call moved in is removed
    and every entry it moved aside is put back; an entry it never moved is never touched. If putting an entry
    back fails, the hidden folder is kept (the error names it) rather than deleted with the user's files in it.
    """
    old = Path(tempfile.mkdtemp(prefix=".compress.old-", dir=out))
    moved_aside: list[str] = []
    moved_in: list[str] = []
    try:
        for entry in list(out.iterdir()):
            if entry not in (old, src):
                os.rename(entry, old / entry.name)
                moved_aside.append(entry.name)
        for entry in list(src.iterdir()):
            moving: str | None = entry.name
            shutil.move(str(entry), str(out / entry.name))
            moved_in.append(entry.name)
            moving = None
    except BaseException as failure:
        # a copy cut short (another file system); `moving` is a name (str) whenever it is set and truthy
        partial = [cast(str, moving)] if locals().get("moving") else []
        for name in moved_in + partial:  # what came in so far goes; nothing else in `out` is touched
            if os.path.lexists(out / name):
                _clear(out / name)
        stuck = []
        for name in moved_aside:  # what was there comes back
            try:
                os.rename(old / name, out / name)
            except OSError:
                stuck.append(name)
        if stuck:
            raise OSError(
                f"writing into {str(out)!r} failed ({failure}), and {stuck} could not be moved back: "
                f"they are safe in {str(old)!r}; move them back by hand"
            ) from failure
        _remove(old)
        raise
    _remove(old)


def _swap(tmp: Path, real: Path) -> None:
    """Put the finished ``tmp`` folder at ``real``: rename when possible, else replace contents."""
    if not real.exists():
        try:
            tmp.rename(real)
            return
        except OSError:
            real.mkdir(parents=True, exist_ok=True)
        _replace_contents(tmp, real)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{real.name}.old-", dir=real.parent))
    try:
        try:
            real.rename(old / real.name)
        except OSError:  # busy, a mount point, a bind mount os.path.ismount misses: move the files instead
            _replace_contents(tmp, real)
            return
        try:
            tmp.rename(real)
        except BaseException:
            (old / real.name).rename(real)  # put the old folder back
            raise
    finally:
        _remove(old)


@contextmanager
def atomic_output_dir(
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    *,
    inputs: Mapping[str, object] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
) -> Iterator[Path]:
    """Yield a temporary folder; on success its contents become ``out_dir``, on error (or Ctrl-C) it vanishes.

    So a crash or a failed check never leaves a half-written folder that looks like a finished one. The
    checks are :func:`check_output_dir`'s (``overwrite=True`` replaces the whole folder, including files
    compress did not write). A symlinked ``out_dir`` stays a link: its target receives the files. A folder
    that cannot be renamed (the current directory, a mount point) keeps its identity and has its contents
    replaced instead.
    """
    plan = check_output_dir(out_dir, overwrite, inputs=inputs, checkpoint_dir=checkpoint_dir)
    real = plan.real
    if plan.in_place:  # inside the folder itself: same file system, and its parent may not be writable
        tmp = Path(tempfile.mkdtemp(prefix=".compress.tmp-", dir=real))
    else:
        created = [p for p in (real.parent, *real.parent.parents) if not p.exists()]  # deepest first
        real.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{real.name}.tmp-", dir=real.parent))
    done = False
    try:
        yield tmp
        if plan.in_place:
            _replace_contents(tmp, real)
        else:
            _swap(tmp, real)
        done = True
    finally:
        if tmp.exists():
            _remove(tmp)
        if not done and not plan.in_place:
            for folder in created:  # the parent folders this call created, if they are still empty
                try:
                    folder.rmdir()
                except OSError:
                    break


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Replace the file ``path`` whole with ``text``: written to a temporary file beside it (a unique name,
    created exclusively, the umask applying as for any new file), flushed to disk, then renamed into place. A
    reader, a crash or a kill sees the old file or the new one, never half of one; on failure the temporary file
    is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
