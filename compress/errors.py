"""Exceptions raised by compress.

Every error a user can cause derives from :class:`CompressError` so callers can catch one type; the subclasses
say which stage refused the input. Messages say what was wrong and what to do about it.
"""


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
