"""Distillation end to end on tiny models: it recovers, it resumes after SIGKILL, it stops on NaN (multi-process
runs are in test_parallel.py)."""

import copy
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import compress
from compress.distillation import DistillConfig, DistillError, default_layer_map, distill, divergence
from compress.distillation.checkpoint import checkpoints
from compress.errors import CheckpointError, ConfigError, DataError

from conftest import tiny_model
from distill_job import make_pair

JOB = Path(__file__).with_name("distill_job.py")


def _mean_kl(student, teacher, ids):
    with torch.no_grad():
        s, t = student(ids).logits, teacher(ids).logits
    return float(divergence(s.flatten(0, 1), t.flatten(0, 1))) / s.shape[0] / s.shape[1]


@pytest.mark.parametrize("hidden_loss, hidden_weight", [(None, 1.0), ("cosine", 1.0), ("mse", 0.01)])
def test_distillation_brings_student_closer_to_teacher(hidden_loss, hidden_weight, tmp_path):
    teacher, student, data = make_pair()
    held_out = torch.randint(4, 320, (8, 32), generator=torch.Generator().manual_seed(9))
    before = _mean_kl(student, teacher, held_out)
    cfg = DistillConfig(max_steps=25, batch_size=4, seq_len=32, lr=3e-3, hidden_loss=hidden_loss,
                        hidden_weight=hidden_weight, output_dir=str(tmp_path), progress=False, log_every=1)
    report = distill(student, teacher, data, cfg)
    after = _mean_kl(student, teacher, held_out)
    assert after < 0.9 * before
    assert report.steps == 25 and report.tokens == 25 * 4 * 32 and report.tokens_per_second > 0
    assert report.losses[-1]["loss"] < report.losses[0]["loss"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 25 and json.loads(lines[-1])["step"] == 25
    if hidden_loss:
        assert report.layer_map == {"0": 0, "1": 1, "2": 2, "3": 3}
        assert report.projection == "learned linear 48 -> 96"
    student.save_pretrained(tmp_path / "student")  # projections are not part of the model
    from safetensors import safe_open
    with safe_open(str(tmp_path / "student" / "model.safetensors"), "pt") as fh:
        assert not any("proj" in k and "layers" not in k for k in fh.keys())


def test_tensorboard_events_match_metrics_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    teacher, student, data = make_pair()
    cfg = DistillConfig(max_steps=4, batch_size=2, seq_len=32, output_dir=str(tmp_path), tensorboard=True,
                        progress=False, log_every=1)
    distill(student, teacher, data, cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    losses = events.Scalars("distill/loss")
    assert [e.step for e in losses] == [r["step"] for r in records] == [1, 2, 3, 4]
    assert [e.value for e in losses] == pytest.approx([r["loss"] for r in records], rel=1e-5)
    assert {"distill/kd", "distill/lr", "distill/tokens_per_s"} <= set(events.Tags()["scalars"])
    with pytest.raises(ConfigError, match="output_dir"):
        DistillConfig(max_steps=1, tensorboard=True)


def test_tensorboard_missing_is_a_clear_error_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    teacher, student, data = make_pair()
    cfg = DistillConfig(max_steps=1, batch_size=2, seq_len=32, output_dir=str(tmp_path / "run"), tensorboard=True,
                        progress=False)
    with pytest.raises(ConfigError, match="pip install"):
        distill(student, teacher, data, cfg)
    assert not (tmp_path / "run").exists()


def test_kept_layers_and_channels_shape_the_hidden_loss():
    teacher = tiny_model("qwen2")
    student = copy.deepcopy(teacher)
    ids = torch.randint(4, 320, (16, 32), generator=torch.Generator().manual_seed(1))
    compress.prune(student, {"num_hidden_layers": 2, "hidden_size": 32}, ids, strategy="width+depth",
                   calibration_config=compress.CalibrationConfig(min_samples=4))
    kept_layers = [0, 3]
    cfg = DistillConfig(max_steps=2, batch_size=4, seq_len=32, hidden_loss="cosine", progress=False)
    report = distill(student, teacher, ids, cfg, kept_layers=kept_layers, kept_hidden=list(range(0, 64, 2)))
    assert report.layer_map == {"0": 0, "1": 3}
    assert default_layer_map(2, 4) == {0: 1, 1: 3}


def test_vocabulary_mismatch_is_refused():
    teacher = tiny_model("llama", vocab_size=400)
    with pytest.raises(DataError, match="vocabulary"):
        distill(tiny_model("llama"), teacher, torch.randint(0, 300, (8, 16)), DistillConfig(max_steps=1, batch_size=2, seq_len=16))


def test_bad_config_values_name_the_field():
    with pytest.raises(ConfigError, match=r"logit_loss.*'kl'"):
        DistillConfig(max_steps=1, logit_loss="kl")
    with pytest.raises(ConfigError, match="budget"):
        DistillConfig()
    with pytest.raises(ConfigError, match="output_dir"):
        DistillConfig(max_steps=1, resume=True)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    teacher, student, data = make_pair()
    calls = {"n": 0}

    def poison(_module, _args, out):
        calls["n"] += 1
        return out * float("nan") if calls["n"] > 5 else None

    student.model.layers[0].register_forward_hook(poison)
    cfg = DistillConfig(max_steps=10, batch_size=4, seq_len=32, output_dir=str(tmp_path), checkpoint_every=2,
                        progress=False)
    with pytest.raises(DistillError, match=r"nan/inf at step 6.*checkpoint-00000004"):
        distill(student, teacher, data, cfg)
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-00000004"]
    state = json.loads((tmp_path / "checkpoint-00000004" / "state.json").read_text())
    assert state["step"] == 4


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoint-00000002").mkdir()
    (tmp_path / "checkpoint-00000002" / "state.json").write_text("{not json")
    teacher, student, data = make_pair()
    with pytest.raises(CheckpointError, match="cannot resume"):
        distill(student, teacher, data, DistillConfig(max_steps=2, batch_size=4, seq_len=32, output_dir=str(tmp_path),
                                                      resume=True, progress=False))


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    def job(out, report, *extra):
        return [sys.executable, str(JOB), "--out", str(out), "--report", str(report), "--steps", "12", *extra]

    subprocess.run(job(tmp_path / "full", tmp_path / "full.json"), check=True)
    proc = subprocess.Popen(job(tmp_path / "killed", tmp_path / "killed.json", "--checkpoint-every", "2",
                                "--step-delay", "0.15"))
    deadline = time.time() + 120
    while time.time() < deadline:
        found = checkpoints(tmp_path / "killed")
        if found and found[-1][0] >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed.json").exists(), "the job finished before it could be killed"
    killed_at = checkpoints(tmp_path / "killed")[-1][0]
    assert 4 <= killed_at < 12
    subprocess.run(job(tmp_path / "killed", tmp_path / "killed.json", "--checkpoint-every", "2", "--resume"),
                   check=True)
    full = json.loads((tmp_path / "full.json").read_text())
    resumed = json.loads((tmp_path / "killed.json").read_text())
    assert resumed["resumed_from_step"] == killed_at
    assert abs(resumed["final_loss"] - full["final_loss"]) < 1e-3
    assert [r["step"] for r in resumed["losses"]] == list(range(1, 13))


def test_teacher_correction_fine_tunes_the_teacher_first():
    teacher, student, data = make_pair()
    before = [p.detach().clone() for p in teacher.parameters()]
    cfg = DistillConfig(max_steps=2, batch_size=4, seq_len=32, teacher_correction_steps=3, progress=False)
    report = distill(student, teacher, data, cfg)
    assert report.teacher_correction["steps"] == 3
    assert report.teacher_correction["last_loss"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, teacher.parameters()))


def test_teacher_is_not_left_frozen_and_a_later_copy_trains():
    """A student copied from the teacher after one distillation run must still be trainable."""
    teacher, student, data = make_pair()
    cfg = DistillConfig(max_steps=1, batch_size=4, seq_len=32, progress=False)
    distill(student, teacher, data, cfg)
    assert all(p.requires_grad for p in teacher.parameters())
    second = copy.deepcopy(teacher)
    compress.prune(second, {"intermediate_size": 64}, None, plugins=["magnitude"])
    for p in second.parameters():
        p.requires_grad_(False)  # even a frozen student is trained: distillation trains the student
    report = distill(second, teacher, data, cfg)
    assert report.steps == 1


def test_lm_only_fine_tuning_runs_without_teacher_forward():
    teacher, student, data = make_pair()
    calls = {"n": 0}
    teacher.model.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    cfg = DistillConfig(max_steps=3, batch_size=4, seq_len=32, logit_weight=0.0, alpha_ce=1.0, progress=False)
    report = distill(student, teacher, data, cfg)
    assert calls["n"] == 0 and report.losses[-1]["kd"] == 0.0 and report.losses[-1]["ce"] > 0
