"""The library version, in one place (setup.cfg reads it; reports and recipes record it), and the transformers
line it runs on."""

from importlib.metadata import PackageNotFoundError, version

__version__ = "0.1.0"


def transformers_version() -> tuple[int, int]:
    """The installed transformers' ``(major, minor)``: 5.x is the main line, 4.57 the compatibility line kept for
    Optimum's ONNX exporter. Read from the package metadata, without importing transformers."""
    try:
        major, minor = version("transformers").split(".")[:2]
    except PackageNotFoundError:
        return (0, 0)
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)
