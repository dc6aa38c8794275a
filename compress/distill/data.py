"""Distillation data: packed token windows served in a seeded, resumable order, sharded across ranks."""

from __future__ import annotations

import torch

from ..data import describe_source, pack_tokens
from ..errors import DataError
from .config import DistillConfig


class WindowLoader:
    """Serves global batches of ``batch_size × world`` windows; each rank gets its ``batch_size`` slice.

    The order is a seeded permutation per epoch, so the position (epoch, batch) is the whole state: saving and
    restoring it makes a resumed run see exactly the batches an uninterrupted one would.
    """

    def __init__(self, windows: torch.Tensor, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 pin_memory: bool = False, source: str = "<tensor>", skip_tokens: int = 0):
        global_batch = batch_size * world
        if windows.shape[0] < global_batch:
            raise DataError(f"{windows.shape[0]} training windows are fewer than one global batch of {global_batch}; "
                            "give more text or lower batch_size / seq_len")
        self.windows = windows.pin_memory() if pin_memory else windows
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.batches_per_epoch = windows.shape[0] // global_batch
        self.source, self.skip_tokens = source, skip_tokens
        self.epoch, self.index, self.served = 0, 0, 0
        self._order = self._permutation(0)

    @classmethod
    def from_source(cls, data, tokenizer, config: DistillConfig, *, skip_tokens: int = 0, rank: int = 0,
                    world: int = 1, pin_memory: bool = False) -> "WindowLoader":
        if isinstance(data, torch.Tensor):
            if data.dim() != 2:
                raise DataError(f"token windows must be [N, seq_len], got {tuple(data.shape)}")
            windows, where = data.long(), "<tensor>"
        else:
            if tokenizer is None:
                raise DataError("distillation data given as text needs a tokenizer")
            needed = config.total_steps * config.batch_size * config.grad_accum * world
            windows = pack_tokens(tokenizer, data, config.seq_len, max_windows=needed, skip_tokens=skip_tokens)
            where = describe_source(data)
        return cls(windows, config.batch_size, config.seed, rank, world, pin_memory, where, skip_tokens)

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.windows.shape[0], generator=torch.Generator().manual_seed(self.seed + epoch))

    def next_batch(self) -> torch.Tensor:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        start = self.index * self.batch_size * self.world + self.rank * self.batch_size
        idx = self._order[start:start + self.batch_size]
        self.index += 1
        self.served += 1
        return self.windows[idx]

    def reset(self) -> None:
        self.epoch, self.index, self.served = 0, 0, 0
        self._order = self._permutation(0)

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "served": self.served}

    def load_state(self, state: dict) -> None:
        self.epoch, self.index, self.served = state["epoch"], state["index"], state["served"]
        self._order = self._permutation(self.epoch)

    def describe(self) -> dict:
        n, seq = self.windows.shape
        return {"source": self.source, "windows": n, "seq_len": seq, "unique_tokens": n * seq,
                "skipped_tokens": self.skip_tokens, "epochs_seen": round(self.served / self.batches_per_epoch, 3)}
