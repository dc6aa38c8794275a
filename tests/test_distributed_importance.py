"""Calibration sharded across ranks: activation importance, calibration_loss and the depth block search under a
real ``torchrun`` (gloo, CPU) give every rank the one-process answer while each rank runs only its batches."""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys

import pytest
import torch

import compress
from compress.pruning.calibrate import accumulator_dtype, all_reduce_tensors

JOB = os.path.join(os.path.dirname(__file__), "importance_job.py")
CASES = {"even": (24, 4), "odd": (10, 4), "few": (8, 4)}  # as in importance_job.CASES
SCORES = ("mlp", "heads", "hidden", "layers")


def _launch(out: str, nproc: int | None) -> list[dict]:
    """Run the job (plain ``python`` when ``nproc`` is None, else ``torchrun``); every rank's results."""
    if nproc is None:
        cmd = [sys.executable, JOB, "--out", out]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               JOB, "--out", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COMPRESS_PLUGINS": "none", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: the session this test started
        log, _ = proc.communicate()
        pytest.fail(f"{cmd} hung (a rank skipped a collective?):\n{log[-4000:]}")
    assert proc.returncode == 0, f"{cmd} failed:\n{log[-4000:]}"
    ranks = nproc or 1
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(ranks)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, list[dict]]:
    """1 process, 2 ranks and 3 ranks (three launches for the whole file)."""
    return {n: _launch(str(tmp_path_factory.mktemp(f"world{n}")), None if n == 1 else n) for n in (1, 2, 3)}


def _my_batches(windows: int, batch_size: int, rank: int, world: int) -> list[int]:
    sizes = [len(b) for b in torch.arange(windows).split(batch_size)]
    return sizes[rank::world]


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_scores_equal_one_process(runs, world):
    ref = runs[1][0]
    assert ref["world"] == 1
    for result in runs[world]:
        assert result["world"] == world
        for case in CASES:
            for name in SCORES:
                torch.testing.assert_close(result[case][name], ref[case][name], rtol=1e-5, atol=1e-7,
                                           msg=lambda m: f"{case}/{name} on rank {result['rank']}/{world}: {m}")
            assert result[case]["loss"] == pytest.approx(ref[case]["loss"], rel=1e-6)
            assert result[case]["loss_limited"] == pytest.approx(ref[case]["loss_limited"], rel=1e-6)
            assert result[case]["depth_keep"] == ref[case]["depth_keep"]


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_gets_identical_results(runs, world):
    first, *others = runs[world]
    for result in others:
        for case in CASES:
            for name in SCORES:
                assert torch.equal(result[case][name], first[case][name]), (case, name, result["rank"])
            for key in ("loss", "loss_limited", "depth_keep", "block_losses"):
                assert result[case][key] == first[case][key], (case, key, result["rank"])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_rank_runs_only_its_share_and_stats_are_global(runs, world):
    # 3 ranks on the "few" case (2 batches): rank 2 runs nothing, yet joined every collective (no hang above).
    for result in runs[world]:
        rank = result["rank"]
        for case, (windows, batch_size) in CASES.items():
            mine = _my_batches(windows, batch_size, rank, world)
            assert result[case]["scored_batches"] == mine, (case, rank)
            assert result[case]["loss_batches"] == mine, (case, rank)
            stats = result[case]["stats"]
            assert stats["samples"] == windows and stats["tokens"] == windows * 32, stats
            assert stats["ranks"] == world and stats["batches"] == len(mine), stats
    assert runs[3][2]["few"]["scored_batches"] == []


def test_importance_hooks_do_not_sync_with_the_host(monkeypatch, calib_ids):
    """Host round trips from the importance code must not grow with the number of batches (one copy at the end)."""
    from conftest import tiny_model

    import compress.pruning.calibrate as calibrate_module
    from compress.registry import get_plugin

    watched = {os.path.abspath(inspect.getfile(get_plugin("activation"))), os.path.abspath(calibrate_module.__file__)}
    calls: list[str] = []

    def spy(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if os.path.abspath(sys._getframe(1).f_code.co_filename) in watched:
                calls.append(name)
            return original(self, *args, **kwargs)
        return wrapper

    for name in ("cpu", "item", "tolist", "__float__", "__int__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    model = tiny_model("llama")
    counted = []
    for batch_size in (8, 2):  # 2 batches, then 8
        calls.clear()
        compress.score_importance(model, calib_ids, calibration_config=compress.CalibrationConfig(
            num_samples=16, batch_size=batch_size, min_samples=1))
        counted.append(len(calls))
        calls.clear()
        compress.pruning.calibrate.calibration_loss(model, compress.pruning.calibrate.Calibration(calib_ids, batch_size=batch_size))
        counted.append(len(calls))
    assert counted[:2] == counted[2:], f"host syncs per run grow with the batch count: {counted}"
    assert counted[1] <= 1


def test_accumulator_helpers_single_process():
    assert accumulator_dtype("cpu") == torch.float64 and accumulator_dtype("mps") == torch.float32
    tensors = {"a": torch.ones(3), "b": torch.arange(4)}
    assert all_reduce_tensors(tensors) is tensors and tensors["a"].tolist() == [1.0, 1.0, 1.0]
