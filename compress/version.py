"""The library version, in one place (setup.cfg reads it; reports and recipes record it), and the transformers
line it runs on."""

from importlib.metadata import PackageNotFoundError, version

__version__ = "0.1.0"


def installed_version(package: str) -> tuple[int, int]:
    """``(major, minor)`` of an installed distribution, read from its metadata without importing it; ``(0, 0)``
    when it is not installed."""
    try:
        major, minor = version(package).split(".")[:2]
    except PackageNotFoundError:
        return (0, 0)
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def transformers_version() -> tuple[int, int]:
    """The installed transformers' ``(major, minor)``: 5.x is the main line, 4.57 the compatibility line kept for
    Optimum's ONNX exporter."""
    return installed_version("transformers")
