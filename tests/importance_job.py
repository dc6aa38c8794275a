"""Activation importance, calibration loss and the depth block search on a tiny model, run by
tests/test_distributed_importance.py both as a plain process and under ``torchrun`` (gloo, CPU).

Every rank writes ``<out>/rank{r}.pt``: for each case (a number of windows and a batch size), the importance
scores and stats, ``calibration_loss`` over all windows and over the first ``LIMIT``, the layers the depth block
search keeps, and the sizes of the batches this rank itself ran (while scoring, and in ``calibration_loss``).
The test checks that every rank agrees, that each ran only its share, and that the result equals a one-process
run.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from contextlib import contextmanager
from typing import Iterator

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conftest import tiny_model  # noqa: E402

import compress  # noqa: E402
from compress import distributed  # noqa: E402
from compress.pruning.calibrate import Calibration, CalibrationConfig, calibration_loss  # noqa: E402

#: name -> (windows, batch size). With 2 ranks: 3+3, 2+1 and 1+1 batches; with 3 ranks: 2+2+2, 1+1+1 and
#: 1+1+0 (a rank with no batch at all, which must still join every collective).
CASES = {"even": (24, 4), "odd": (10, 4), "few": (8, 4)}
LIMIT = 6  # calibration_loss(limit=6) with batch size 4: batches of 4 and 2 windows


@contextmanager
def batches_run(model: torch.nn.Module) -> Iterator[list[int]]:
    """The sizes of the batches this rank runs through ``model`` meanwhile: its shard, counted independently."""
    seen: list[int] = []
    handle = model.get_input_embeddings().register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    try:
        yield seen
    finally:
        handle.remove()


def run_case(model: torch.nn.Module, windows: int, batch_size: int) -> dict:
    ids = torch.randint(4, 320, (windows, 32), generator=torch.Generator().manual_seed(0))
    config = CalibrationConfig(num_samples=windows, batch_size=batch_size, min_samples=1)
    calib = Calibration(ids, batch_size=batch_size)
    with batches_run(model) as scored:
        imp = compress.score_importance(model, ids, plugin="activation", calibration_config=config)
    with batches_run(model) as evaluated:
        loss = calibration_loss(model, calib)
    pruned = copy.deepcopy(model)
    report = compress.prune(pruned, {"num_hidden_layers": 2}, ids, strategy="depth", calibration_config=config,
                            plugins={"depth": {"method": "contiguous_block", "eval_samples": LIMIT}})
    return {
        "mlp": imp.mlp, "heads": imp.heads, "hidden": imp.hidden, "layers": imp.layers, "stats": imp.stats,
        "scored_batches": scored, "loss_batches": evaluated,
        "loss": loss, "loss_limited": calibration_loss(model, calib, limit=LIMIT),
        "depth_keep": report.kept["layers"], "block_losses": report.removed["depth"]["block_losses"],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True, help="directory for rank{r}.pt")
    args = p.parse_args()
    torch.set_num_threads(1)
    rank, world = distributed.init()
    try:
        model = tiny_model("llama")
        result = {"rank": rank, "world": world}
        result.update({name: run_case(model, *case) for name, case in CASES.items()})
        os.makedirs(args.out, exist_ok=True)
        torch.save(result, os.path.join(args.out, f"rank{rank}.pt"))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
