"""Helpers shared by the benchmark scripts: machine description and peak-memory measurement."""

from __future__ import annotations

import ctypes
import gc
import os
import platform
from contextlib import contextmanager

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}"


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


@contextmanager
def peak_memory():
    """Measure the extra peak memory of a block: resident set (CPU, Linux) and CUDA allocator, in MiB."""
    out: dict = {}
    gc.collect()
    try:  # hand freed heap pages back to the OS so the resident set is live memory only
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:  # writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        rss_before = _status_kib("VmRSS")
    except OSError:
        rss_before = None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    yield out
    if rss_before is not None:
        out["peak_rss_extra_mib"] = round((_status_kib("VmHWM") - rss_before) / 1024, 1)
    if torch.cuda.is_available():
        out["peak_cuda_extra_mib"] = round((torch.cuda.max_memory_allocated() - cuda_before) / 2**20, 1)
