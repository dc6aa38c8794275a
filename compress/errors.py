"""Exceptions raised by compress.

Every error a user can cause derives from :class:`CompressError` so callers can catch one type; the subclasses
say which stage refused the input. Messages say what was wrong and what to do about it, naming inputs in the
spelling of the interface in use (:func:`spelled`). :func:`warn` points warnings at the caller's line.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import FrameType


class CompressError(Exception):
    """Base class of every error compress raises on bad input."""


class ConfigError(CompressError, ValueError):
    """A config dataclass, target or argument has a bad value."""


class PluginError(CompressError, LookupError):
    """A plugin is unknown, registered twice, or malformed."""


class UnsupportedModelError(CompressError, TypeError):
    """The model's architecture has no adapter."""


class DataError(CompressError, ValueError):
    """Calibration or evaluation data is missing, empty or too short, or does not match the model."""


class TargetError(CompressError, ValueError):
    """A pruning target cannot be met (too large, too small, or breaks the model's structure)."""


class CheckpointError(CompressError, OSError):
    """A checkpoint is missing, corrupt, or not in a safe format."""


class OutputExistsError(CompressError, FileExistsError):
    """The output folder exists and is not empty."""


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` pointed at the caller's line: the first frame outside the compress package (the user's
    script, or the command line's entry point), however deep inside the library the warning is raised."""
    import os
    import sys
    import warnings

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame: FrameType | None = sys._getframe(1)
    level = 2  # stacklevel 2 is the line that called warn()
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)


_INTERFACE: ContextVar[str] = ContextVar("compress_interface", default="python")


@contextmanager
def interface(name: str) -> Iterator[None]:
    """Inside this block, messages spell inputs the way interface ``name`` takes them: ``"python"`` (keywords,
    the default), ``"cli"`` (flags) or ``"recipe"`` (recipe YAML fields). The command line sets it."""
    token = _INTERFACE.set(name)
    try:
        yield
    finally:
        _INTERFACE.reset(token)


def spelled(python: str, cli: str | None = None, recipe: str | None = None) -> str:
    """One input's name in the spelling of the interface in use (see :func:`interface`): an error read by someone
    at a shell says ``--overwrite``, not ``overwrite=True``."""
    chosen = {"cli": cli, "recipe": recipe}.get(_INTERFACE.get())
    return chosen if chosen is not None else python
