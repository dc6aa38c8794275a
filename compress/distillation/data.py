"""Distillation data: packed token windows served in a seeded, resumable order, sharded across ranks.

On CUDA a batch travels through pinned staging buffers on a side stream, one batch ahead of the one being
trained on, so the host-to-device copy overlaps the previous step's compute and never makes the host wait.
"""

from __future__ import annotations

import torch

from ..data import describe_source, pack_tokens
from ..errors import DataError
from ..validate import check_token_ids
from .config import DistillConfig


class WindowLoader:
    """Serves global batches of ``batch_size × world`` windows; each rank gets its ``batch_size`` slice.

    The order is a seeded permutation per epoch, so the position (epoch, batch) is the whole state: saving and
    restoring it makes a resumed run see exactly the batches an uninterrupted one would.

    ``device``: where batches are delivered. For a CUDA device the windows stay in ordinary host memory and
    each batch is gathered (``index_select(out=...)``) straight into one of two pinned staging buffers, then
    copied with ``non_blocking=True`` on a copy stream; the next batch is already on its way while the current
    one trains. (Indexing a pinned tensor would give a new, unpinned tensor: that copy would block.)
    """

    def __init__(
        self,
        windows: torch.Tensor,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        device: str | torch.device = "cpu",
        source: str = "<tensor>",
        skip_tokens: int = 0,
    ):
        global_batch = batch_size * world
        if windows.shape[0] < global_batch:
            raise DataError(
                f"{windows.shape[0]} training windows are fewer than one global batch of {global_batch}; "
                "give more text or lower batch_size / seq_len"
            )
        self.windows = windows
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.batches_per_epoch = windows.shape[0] // global_batch
        self.source, self.skip_tokens = source, skip_tokens
        self.device = torch.device(device)
        self.epoch, self.index, self.served = 0, 0, 0
        self._order = self._permutation(0)
        self._staging: list[torch.Tensor] = []
        self._copy_done: list[torch.cuda.Event | None] = []
        self._stream = None
        self._ahead: tuple[tuple[torch.Tensor, torch.Tensor], dict] | None = None
        self.last_indices: torch.Tensor | None = None
        if self.device.type == "cuda":
            shape = (batch_size, windows.shape[1])
            self._staging = [torch.empty(shape, dtype=windows.dtype, pin_memory=True) for _ in range(2)]
            self._copy_done = [None, None]
            self._stream = torch.cuda.Stream(self.device)

    @classmethod
    def from_source(
        cls,
        data,
        tokenizer,
        config: DistillConfig,
        *,
        skip_tokens: int = 0,
        rank: int = 0,
        world: int = 1,
        device: str | torch.device = "cpu",
        vocab_size: int | None = None,
    ) -> WindowLoader:
        """Token windows from ``data`` (an integer ``[N, seq_len]`` tensor, or text packed with ``tokenizer``).

        Refused with :class:`DataError`: a tensor that is not 2-D, not integer, or whose windows are not
        ``config.seq_len`` tokens long, and (given ``vocab_size``) token ids outside ``[0, vocab_size)``."""
        assert config.seq_len is not None and config.batch_size is not None  # set by DistillConfig.validate()
        if isinstance(data, torch.Tensor):
            if data.dim() != 2:
                raise DataError(f"token windows must be a [N, seq_len] tensor, got shape {tuple(data.shape)}")
            if data.dtype == torch.bool or data.is_floating_point() or data.is_complex():
                raise DataError(
                    f"token windows must be an integer tensor of token ids, got dtype {data.dtype}: "
                    "pass the tokenizer's ids (torch.long)"
                )
            if data.shape[1] != config.seq_len:
                raise DataError(
                    f"token windows are {data.shape[1]} tokens long (shape {tuple(data.shape)}) but "
                    f"DistillConfig.seq_len={config.seq_len}: pass windows of seq_len tokens or set "
                    f"seq_len={data.shape[1]}"
                )
            windows, where = data.long().cpu(), "<tensor>"
        else:
            if tokenizer is None:
                raise DataError("distillation data given as text needs a tokenizer (pass tokenizer=...)")
            needed = config.steps_for(world) * config.batch_size * config.grad_accum * world
            windows = pack_tokens(tokenizer, data, config.seq_len, max_windows=needed, skip_tokens=skip_tokens)
            where = describe_source(data)
        if vocab_size is not None:
            check_token_ids(windows, vocab_size, f"the distillation data ({where})")
        return cls(windows, config.batch_size, config.seed, rank, world, device, where, skip_tokens)

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.windows.shape[0], generator=torch.Generator().manual_seed(self.seed + epoch))

    def _next_indices(self) -> torch.Tensor:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        start = self.index * self.batch_size * self.world + self.rank * self.batch_size
        idx = self._order[start : start + self.batch_size]
        self.index += 1
        self.served += 1
        return idx

    def _fetch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Start delivering the next batch (and say which windows it holds); on CUDA the returned tensor is filled
        asynchronously."""
        idx = self._next_indices()
        if self._stream is None:
            return self.windows.index_select(0, idx).to(self.device), idx
        slot = self.served % 2
        done = self._copy_done[slot]
        if done is not None:
            done.synchronize()  # the copy out of this buffer, two batches ago, has finished
        buf = self._staging[slot]
        torch.index_select(self.windows, 0, idx, out=buf)
        with torch.cuda.stream(self._stream):
            batch = buf.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._copy_done[slot] = event
        return batch, idx

    def next_batch(self) -> torch.Tensor:
        """This rank's next ``[batch_size, seq_len]`` batch, on the loader's device. ``last_indices`` then holds
        the rows of ``windows`` it was taken from (a teacher cache looks its targets up by them)."""
        if self._ahead is None:
            batch, idx = self._fetch()
        else:
            (batch, idx), self._ahead = self._ahead[0], None
        self.last_indices = idx
        if self._stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self._stream)
            batch.record_stream(current)
            state = self.state()
            self._ahead = (self._fetch(), state)  # prefetch: overlaps with the step that trains on `batch`
        return batch

    def reset(self) -> None:
        self.epoch, self.index, self.served = 0, 0, 0
        self._order = self._permutation(0)
        self._ahead = None

    def state(self) -> dict:
        """The position after the last batch handed out (a prefetched batch does not count)."""
        if self._ahead is not None:
            return dict(self._ahead[1])
        return {"epoch": self.epoch, "index": self.index, "served": self.served}

    def load_state(self, state: dict) -> None:
        self.epoch, self.index, self.served = state["epoch"], state["index"], state["served"]
        self._order = self._permutation(self.epoch)
        self._ahead = None

    def describe(self) -> dict:
        n, seq = self.windows.shape
        return {
            "source": self.source,
            "windows": n,
            "seq_len": seq,
            "unique_tokens": n * seq,
            "skipped_tokens": self.skip_tokens,
            "epochs_seen": round(self.served / self.batches_per_epoch, 3),
        }


def distillation_windows(
    data, tokenizer, config: DistillConfig, *, skip_tokens: int = 0, world: int = 1
) -> torch.Tensor:
    """The token windows ``[N, seq_len]`` that :func:`~compress.distill` trains on for these arguments (``world``:
    the number of processes, as the text needed grows with it): what a teacher cache must be built over."""
    config.validate()
    return WindowLoader.from_source(data, tokenizer, config, skip_tokens=skip_tokens, world=world).windows
