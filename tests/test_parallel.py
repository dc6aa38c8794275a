"""Multi-process distillation through real `torchrun` launches on CPU (gloo): DDP and FSDP match one process,
the token budget is global, a NaN on one rank stops every rank, an FSDP run resumes exactly after SIGKILL, and a
checkpoint from another setup is refused."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compress.distillation.checkpoint import checkpoints

JOB = Path(__file__).with_name("parallel_job.py")
TIMEOUT = 240


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def launch(report_dir: Path, *args: str, nproc: int = 2, wait: bool = True, timeout: float = TIMEOUT):
    """Run the job under `torchrun --nproc_per_node nproc` (nproc=0: plain python, no torchrun)."""
    report_dir.mkdir(parents=True, exist_ok=True)
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(_port()), str(JOB)]
    else:
        cmd = [sys.executable, str(JOB)]
    cmd += ["--report-dir", str(report_dir), *args]
    if not wait:
        return subprocess.Popen(cmd, env=_env())
    proc = subprocess.run(cmd, env=_env(), timeout=timeout, capture_output=True, text=True)
    return proc


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every worker it started (workers run in sessions of their own)."""
    import psutil

    family = psutil.Process(proc.pid).children(recursive=True)
    for p in [psutil.Process(proc.pid), *family]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(family, timeout=30)


def ranks(report_dir: Path, n: int) -> list[dict]:
    return [json.loads((report_dir / f"rank{r}.json").read_text()) for r in range(n)]


def _losses(record: dict) -> list[float]:
    return [h["loss"] for h in record["report"]["losses"]]


def _assert_same_training(single_dir: Path, multi_dir: Path, world: int) -> None:
    single = ranks(single_dir, 1)[0]
    multi = ranks(multi_dir, world)
    for record in multi:
        assert "error" not in record, record.get("error")
        assert _losses(record) == pytest.approx(_losses(single), abs=1e-4)
    a, b = load_file(str(single_dir / "student.safetensors")), load_file(str(multi_dir / "student.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The reference: one process, global batch 4, 6 steps, hidden-state loss on."""
    out = tmp_path_factory.mktemp("single")
    proc = launch(out, "--steps", "6", "--batch-size", "4", "--hidden", nproc=0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("engine, extra", [("ddp", ()), ("fsdp", ("--shard-teacher",)),
                                           ("fsdp", ("--checkpointing",))])
def test_two_processes_match_one_process_on_the_same_global_batch(engine, extra, single_run, tmp_path):
    proc = launch(tmp_path, "--steps", "6", "--batch-size", "2", "--hidden", "--parallel", engine, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_training(single_run, tmp_path, 2)
    report = ranks(tmp_path, 2)[0]["report"]
    assert report["engine"]["mode"] == engine and report["engine"]["world_size"] == 2
    assert report["engine"]["shard_teacher"] == ("--shard-teacher" in extra)
    # A sharded teacher is gathered one layer at a time and freed again: after the run its layers are shards.
    assert ranks(tmp_path, 2)[0]["teacher_layers_sharded_after_run"] == ("--shard-teacher" in extra)
    assert report["tokens"] == 6 * 4 * 32


def test_token_budget_is_global_and_teacher_correction_agrees_across_ranks(tmp_path):
    """max_tokens counts every process's tokens; teacher correction leaves every rank with the same teacher."""
    proc = launch(tmp_path, "--max-tokens", str(8 * 2 * 2 * 32), "--batch-size", "2", "--teacher-correction", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = ranks(tmp_path, 2)
    assert r0["report"]["steps"] == 8 and r0["report"]["tokens"] == 8 * 2 * 2 * 32
    assert r0["report"]["teacher_correction"]["steps"] == 2
    assert r0["teacher_digest"] == r1["teacher_digest"]


def test_nan_on_one_rank_stops_every_rank_with_the_message(tmp_path):
    start = time.time()
    proc = launch(tmp_path, "--steps", "20", "--batch-size", "2", "--nan-rank", "1", "--nan-step", "3",
                  "--out", str(tmp_path / "run"), "--checkpoint-every", "1", timeout=120)
    assert time.time() - start < 120
    assert proc.returncode == 0, proc.stderr[-3000:]  # the job catches the error on every rank and reports it
    for record in ranks(tmp_path, 2):
        assert "nan/inf at step 3" in record["error"], record
        assert "checkpoint-00000002" in record["error"]
    assert [step for step, _ in checkpoints(tmp_path / "run")] == [2]


def test_fsdp_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    common = ["--steps", "10", "--batch-size", "2", "--parallel", "fsdp", "--hidden"]
    full = launch(tmp_path / "full", *common)
    assert full.returncode == 0, full.stderr[-3000:]
    run = tmp_path / "killed-run"
    proc = launch(tmp_path / "killed", *common, "--out", str(run), "--checkpoint-every", "2", "--step-delay",
                  "0.3", wait=False)
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        found = checkpoints(run)
        if found and found[-1][0] >= 4:
            break
        time.sleep(0.05)
    _kill_tree(proc)
    assert not (tmp_path / "killed" / "rank0.json").exists(), "the job finished before it could be killed"
    killed_at = checkpoints(run)[-1][0]
    assert 4 <= killed_at < 10
    resumed = launch(tmp_path / "killed", *common, "--out", str(run), "--checkpoint-every", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = ranks(tmp_path / "full", 2)[0], ranks(tmp_path / "killed", 2)[0]
    assert "error" not in b, b.get("error")
    assert b["report"]["resumed_from_step"] == killed_at
    assert b["report"]["final_loss"] == pytest.approx(a["report"]["final_loss"], abs=1e-5)
    assert [h["step"] for h in b["report"]["losses"]] == list(range(1, 11))
    sa, sb = load_file(str(tmp_path / "full" / "student.safetensors")), load_file(
        str(tmp_path / "killed" / "student.safetensors"))
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-5)

    # The same checkpoint with another world size, batch size or sequence length is refused, clearly.
    for args, nproc, says in ((["--batch-size", "2"], 1, "world size 2 -> 1"),
                              (["--batch-size", "4"], 2, "batch_size 2 -> 4"),
                              (["--batch-size", "2", "--seq-len", "16"], 2, "seq_len 32 -> 16")):
        refused = tmp_path / f"refused-{nproc}-{'-'.join(args)}"
        cmd = ["--steps", "10", "--parallel", "fsdp", "--hidden", "--out", str(run), "--resume", *args]
        proc = launch(refused, *cmd, nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
        record = json.loads((refused / "rank0.json").read_text())
        assert "CheckpointError" in record["error"] and says in record["error"], record["error"]


def test_bf16_student_trains_on_fp32_master_weights(tmp_path):
    """A bf16 student: bf16 autocast compute, fp32 weights in the optimizer (and the checkpoint), bf16 back."""
    proc = launch(tmp_path, "--steps", "2", "--batch-size", "4", "--student-dtype", "bf16", "--dtype", "bf16",
                  "--hidden", "--out", str(tmp_path / "run"), "--checkpoint-every", "2", nproc=0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = ranks(tmp_path, 1)[0]
    assert "error" not in record, record.get("error")
    assert record["student_dtype"] == "torch.bfloat16"
    assert record["report"]["engine"]["precision"] == "bf16 compute, fp32 master weights"
    assert record["report"]["memory_plan"]["total_mib"] > 0  # the estimate travels in the report
    saved = load_file(str(tmp_path / "run" / "checkpoint-00000002" / "student.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.float32}


def test_torchrun_compress_command_writes_one_complete_folder(tmp_path, tokenizer):
    """`torchrun --nproc_per_node 2 -m compress ...`: both ranks prune and distill (FSDP: the gathered student
    is what gets saved), rank 0 alone writes."""
    from transformers import AutoModelForCausalLM

    from conftest import SAMPLE_TEXT, tiny_model

    teacher = tmp_path / "teacher"
    tiny_model("llama").save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    (tmp_path / "train.txt").write_text(SAMPLE_TEXT)
    (tmp_path / "valid.txt").write_text(SAMPLE_TEXT[:3000])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_port()), "-m", "compress", str(teacher), "--out", str(tmp_path / "student"),
           "--data", str(tmp_path / "train.txt"), "--eval-data", str(tmp_path / "valid.txt"), "--samples", "8",
           "--seq-len", "32", "--eval-tokens", "256", "--distill-tokens", "1024", "--formats", "safetensors",
           "--parallel", "fsdp", "--json"]
    proc = subprocess.run(cmd, env=_env(), timeout=TIMEOUT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # one JSON document: only rank 0 reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student", "teacher", "train.txt", "valid.txt"]
    distilled = result["stages"]["distill"]
    assert distilled["engine"]["mode"] == "fsdp" and distilled["engine"]["world_size"] == 2
    # The budget is global: 4 steps of 2 processes x 4 windows (the default batch of a small budget) x 32 tokens.
    assert distilled["tokens"] == 1024 and distilled["steps"] == 4
    assert result["prune"]["importance_summary"]["ranks"] == 2
    assert set(result["perplexity"]) == {"teacher", "pruned", "distilled"}
    AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert json.loads((tmp_path / "student" / "compress_report.json").read_text())["perplexity"] == result["perplexity"]
