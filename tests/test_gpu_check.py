"""The GPU check script runs in its CPU mode (tiny shapes, DDP and FSDP through torchrun), so it cannot rot
between the sessions that are lent a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def test_gpu_check_cpu_mode_runs_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--gpus", "2", "--no-teacher", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["throughput"]
    assert [(r["parallel"], r["world"], r["gradient_checkpointing"]) for r in rows] == [
        ("single", 1, False), ("single", 1, True), ("ddp", 2, False), ("fsdp", 2, False)]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["plan_mib"] > 0 and r["measured_steps"] == 2
        assert r["host_syncs"] == 0  # CPU: nothing to synchronize with
    assert result["agreement"]["agree_within_bf16_tolerance"]
    assert "tok/s" in proc.stdout and "agreement" in proc.stdout
