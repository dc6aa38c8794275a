"""Every stage that can take more than a few seconds draws a progress bar with an ETA (after a short delay)."""

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
    assert "perplexity" in err and "<" in err  # tqdm's "elapsed<remaining" is the ETA
    compress.prune(model, {"num_hidden_layers": 2}, [SAMPLE_TEXT], tokenizer=tokenizer, strategy="depth",
                   plugins={"depth": {"method": "contiguous_block", "eval_samples": 2}},
                   calibration_config=compress.CalibrationConfig(seq_len=32, num_samples=4, min_samples=2))
    assert "depth block search (2 of 4 layers)" in capsys.readouterr().err
    compress.export(model, tokenizer, tmp_path / "e", formats=["safetensors"])
    assert "export safetensors" in capsys.readouterr().err


def test_bars_stay_quiet_when_turned_off_or_quick(tokenizer, capsys, monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setenv("COMPRESS_PROGRESS", "0")
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    compress.evaluate.perplexity(model, tokenizer, [SAMPLE_TEXT], seq_len=32, max_tokens=256)
    assert "perplexity" not in capsys.readouterr().err
    monkeypatch.delenv("COMPRESS_PROGRESS")
    monkeypatch.setattr(progress, "DELAY_S", 60.0)  # a stage quicker than the delay prints nothing
    compress.evaluate.perplexity(model, tokenizer, [SAMPLE_TEXT], seq_len=32, max_tokens=256)
    assert "perplexity" not in capsys.readouterr().err
