"""Progress bars with an ETA for every stage that can take more than a few seconds.

One helper so that every stage behaves the same way: a tqdm bar that disappears when done (``leave=False``),
shown on rank 0 only under ``torchrun``, and off when ``COMPRESS_PROGRESS=0`` is set (logs, CI).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

from .distributed import rank_world

#: Seconds a stage runs before its bar is drawn.
DELAY_S = 2.0


def enabled() -> bool:
    """Bars are on unless ``COMPRESS_PROGRESS=0``; only rank 0 draws them."""
    return os.environ.get("COMPRESS_PROGRESS", "1") != "0" and rank_world()[0] == 0


def bar(
    iterable: Iterable | None = None,
    *,
    desc: str,
    unit: str = "it",
    total: int | None = None,
    show: bool = True,
    initial: int = 0,
) -> Any:
    """A tqdm bar over ``iterable`` (or one updated by hand with ``total`` steps) with an ETA. It appears only
    once the stage has run for :data:`DELAY_S` seconds, so quick stages print nothing; ``show=False`` (a
    config's ``progress=False``) keeps it off."""
    return tqdm(
        iterable,
        desc=desc,
        unit=unit,
        total=total,
        initial=initial,
        leave=False,
        delay=DELAY_S,
        disable=not (show and enabled()),
    )
