"""The library version, in one place (setup.cfg reads it; reports and recipes record it)."""

__version__ = "0.1.0"
