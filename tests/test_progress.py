"""Every stage that can take more than a few seconds draws a progress bar with an ETA (after a short delay)."""

import re
import time

import pytest

import compress
from compress import progress

from conftest import SAMPLE_TEXT, tiny_model


@pytest.fixture
def no_delay(monkeypatch):
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    monkeypatch.delenv("COMPRESS_PROGRESS", raising=False)


def test_stages_draw_bars_with_an_eta(tmp_path, tokenizer, capsys, no_delay):
    model = tiny_model("llama")
    compress.evaluate.perplexity(model, tokenizer, [SAMPLE_TEXT], seq_len=32, max_tokens=256)
    err = capsys.readouterr().err
    assert "perplexity" in err
    for _ in progress.bar(range(3), desc="slow stage", unit="step"):  # every stage's bar is this one
        time.sleep(0.15)
    assert re.search(r"slow stage: +\d+%.*\[00:0\d<00:0\d", capsys.readouterr().err)  # elapsed<remaining: ETA
    compress.prune(model, {"num_hidden_layers": 2}, [SAMPLE_TEXT], tokenizer=tokenizer, strategy="depth",
                   plugins={"depth": {"method": "contiguous_block", "eval_samples": 2}},
                   calibration_config=compress.CalibrationConfig(seq_len=32, num_samples=4, min_samples=2))
    assert "depth block search (2 of 4 layers)" in capsys.readouterr().err
    compress.export(model, tokenizer, tmp_path / "e", formats=["safetensors"])
    assert "export safetensors" in capsys.readouterr().err
    student = tiny_model("llama", seed=1)
    compress.distill(student, tiny_model("llama"), [SAMPLE_TEXT * 2],
                     compress.DistillConfig(max_steps=2, batch_size=2, seq_len=32), tokenizer=tokenizer)
    assert "distilling" in capsys.readouterr().err


def test_bars_stay_quiet_when_turned_off_or_quick(tokenizer, capsys, monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setenv("COMPRESS_PROGRESS", "0")
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    compress.evaluate.perplexity(model, tokenizer, [SAMPLE_TEXT], seq_len=32, max_tokens=256)
    student = tiny_model("llama", seed=1)
    compress.distill(student, model, [SAMPLE_TEXT * 2], compress.DistillConfig(max_steps=2, batch_size=2, seq_len=32),
                     tokenizer=tokenizer)
    err = capsys.readouterr().err
    assert "perplexity" not in err and "distilling" not in err
    monkeypatch.delenv("COMPRESS_PROGRESS")
    monkeypatch.setattr(progress, "DELAY_S", 60.0)  # a stage quicker than the delay prints nothing
    compress.evaluate.perplexity(model, tokenizer, [SAMPLE_TEXT], seq_len=32, max_tokens=256)
    assert "perplexity" not in capsys.readouterr().err
