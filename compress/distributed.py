"""Process-group plumbing shared by every stage: which rank this is, which device it owns, and the collectives.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the first call to :func:`init` creates the process
group (NCCL on GPUs, gloo on CPU) and every rank takes the GPU named by ``LOCAL_RANK`` — never the global rank,
which is wrong as soon as there is more than one node or fewer processes than GPUs. Outside ``torchrun`` every
helper degrades to the single-process answer, so stage code calls them unconditionally.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from .validate import check_device


def world_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


# Rank 0 evaluates and exports alone while the others wait in a collective: allow it time (the default of
# 10 minutes would abort a long evaluation of a large model).
COLLECTIVE_TIMEOUT = timedelta(minutes=int(os.environ.get("COMPRESS_COLLECTIVE_TIMEOUT_MIN", "60")))


def init() -> tuple[int, int]:
    """Create the process group when launched by ``torchrun`` (idempotent); return ``(rank, world)``."""
    if not dist.is_initialized() and world_from_env() > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank()), timeout=COLLECTIVE_TIMEOUT)
        else:
            dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    return rank_world()


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device this process computes on: ``device`` if given, else ``cuda:LOCAL_RANK`` or the CPU.

    A bare ``"cuda"`` also becomes ``cuda:LOCAL_RANK`` (under ``torchrun`` every rank would otherwise land on
    GPU 0), and the chosen GPU is made current with ``torch.cuda.set_device`` so that NCCL, autocast and any
    tensor created without an explicit device use it too. A device torch does not know, or this machine does not
    have, is refused first (:func:`compress.validate.check_device`), the same way in every stage.
    """
    check_device(device)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    return device


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum``, ``max`` or ``min``) of ``tensor``; a no-op with one process.

    gloo reduces CPU tensors and NCCL CUDA ones, so the tensor travels to the backend's device and back.
    """
    rank, world = rank_world()
    if world == 1:
        return tensor
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    backend_cuda = dist.get_backend() == "nccl"
    work = (
        tensor
        if (tensor.device.type == "cuda") == backend_cuda
        else tensor.to(torch.device("cuda", torch.cuda.current_device()) if backend_cuda else "cpu")
    )
    dist.all_reduce(work, op=ops[op])
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (any picklable value; used for small results, never weights)."""
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@contextmanager
def main_first() -> Iterator[bool]:
    """Run the body on rank 0 first, then on the other ranks (e.g. a download or a cache fill); yields is_main."""
    main = is_main()
    if not main:
        barrier()
    try:
        yield main
    finally:
        if main:
            barrier()


def shard_range(n: int) -> range:
    """The indices ``0..n-1`` this rank owns when ``n`` items are dealt round-robin across ranks."""
    rank, world = rank_world()
    return range(rank, n, world)
