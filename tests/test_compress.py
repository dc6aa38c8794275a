"""The one call, end to end on a tiny model saved as a real checkpoint folder."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import compress

from conftest import SAMPLE_TEXT, tiny_model


def test_compress_end_to_end(tmp_path, tokenizer):
    teacher_dir = tmp_path / "teacher"
    tiny_model("qwen3").save_pretrained(teacher_dir, safe_serialization=True)
    tokenizer.save_pretrained(teacher_dir)
    calib = tmp_path / "train.txt"
    calib.write_text(SAMPLE_TEXT)
    out = tmp_path / "student"
    result = compress.compress(teacher_dir, {"params": 0.5}, calib, out, eval_data=[SAMPLE_TEXT[:3000]],
                               eval_seq_len=32, calibration=compress.CalibrationConfig(seq_len=32, num_samples=16))
    assert result.out_dir == out and result.prune.params_after <= 0.5 * result.prune.params_before
    assert set(result.perplexity) == {"teacher", "pruned"} and all(math.isfinite(v) for v in result.perplexity.values())
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", compress.api.REPORT_FILE} <= files
    assert not any(name.endswith((".bin", ".gguf")) for name in files)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".student")]  # no temp folders left
    saved = json.loads((out / compress.api.REPORT_FILE).read_text())
    assert saved["prune"]["params_after"] == result.prune.params_after and "export" in saved["seconds"]

    student = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert compress.pruning.shape.count_params(student) == result.prune.params_after
    ppl = compress.evaluate.perplexity(student, tok, [SAMPLE_TEXT[:3000]], seq_len=32)
    assert abs(ppl - result.perplexity["pruned"]) / ppl < 1e-4
    ids = tok("The quick brown", return_tensors="pt").input_ids
    assert student.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4


def test_overwrite_replaces_folder(tmp_path, tokenizer):
    out = tmp_path / "student"
    out.mkdir()
    (out / "old.txt").write_text("old")
    compress.compress((tiny_model("llama"), tokenizer), {"intermediate_size": 48}, [SAMPLE_TEXT], out,
                      eval_data=[SAMPLE_TEXT[:2000]], eval_seq_len=32, overwrite=True,
                      calibration=compress.CalibrationConfig(seq_len=32, num_samples=8))
    assert not (out / "old.txt").exists() and (out / "config.json").exists()


def test_perplexity_matches_hf_loss(tokenizer):
    model = tiny_model("llama")
    ids = compress.data.pack_tokens(tokenizer, [SAMPLE_TEXT], 32, max_windows=4)
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss for w in ids]
    expected = math.exp(float(torch.stack(losses).mean()))
    got = compress.evaluate.perplexity(model, tokenizer, [SAMPLE_TEXT], seq_len=32, max_tokens=128)
    assert abs(got - expected) / expected < 1e-5


def test_compress_with_distillation_stage(tmp_path, tokenizer):
    from conftest import SAMPLE_TEXT
    text = tmp_path / "train.txt"
    text.write_text(SAMPLE_TEXT * 3)
    cfg = compress.DistillConfig(max_steps=3, batch_size=2, seq_len=32, hidden_loss="cosine", progress=False)
    result = compress.compress((tiny_model("llama"), tokenizer), {"hidden_size": 48, "num_hidden_layers": 3}, text,
                               tmp_path / "out", strategy="width+depth", eval_data=[SAMPLE_TEXT[:3000]],
                               eval_seq_len=32, calibration=compress.CalibrationConfig(seq_len=32, num_samples=8),
                               distill=cfg)
    assert set(result.perplexity) == {"teacher", "pruned", "distilled"}
    d = result.stages["distill"]
    assert d["steps"] == 3 and d["projection"] == "learned linear 48 -> 96"
    assert list(d["layer_map"].values()) == result.prune.kept["layers"]
    assert result.data["distillation"]["skipped_tokens"] == result.data["calibration"]["tokens"] == 8 * 32
    assert result.data["distillation"]["tokens_trained"] == 3 * 2 * 32
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert compress.pruning.shape.count_params(student) == result.prune.params_after


def test_compress_with_shape_search_keeps_the_best_candidate_and_scores_importance_once(tmp_path, tokenizer,
                                                                                        monkeypatch):
    from compress.plugins.importance import ActivationImportance

    calls = []
    real_score = ActivationImportance.score
    monkeypatch.setattr(ActivationImportance, "score", lambda self, *a, **k: calls.append(1) or real_score(self, *a, **k))
    text = tmp_path / "train.txt"
    text.write_text(SAMPLE_TEXT * 3)
    short = compress.DistillConfig(max_steps=1, batch_size=2, seq_len=32, lr=1e-3, progress=False)
    search = compress.SearchConfig(candidates=3, tokens_per_candidate=128, eval_windows=2, distill=short,
                                   progress=False)
    result = compress.compress((tiny_model("llama"), tokenizer), {"params": 0.6}, text, tmp_path / "out",
                               eval_data=[SAMPLE_TEXT[:3000]], eval_seq_len=32, formats=["safetensors"],
                               calibration=compress.CalibrationConfig(seq_len=32, num_samples=8), search=search)
    assert len(calls) == 1
    found = result.stages["search"]
    scores = [c["score"] for c in found["candidates"]]
    assert len(scores) == 3 and len({json.dumps(c["shape"], sort_keys=True) for c in found["candidates"]}) == 3
    best = min(range(3), key=lambda i: scores[i])
    assert result.prune.shape_after == {**result.prune.shape_after, **found["candidates"][best]["shape"]}
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert compress.pruning.shape.count_params(student) == found["candidates"][best]["params"]
    # The search trained on text after the calibration windows and scored on text after that.
    assert found["data"]["train_tokens"][0] >= result.data["calibration"]["tokens"]


def test_compress_with_reconstruction_stage(tmp_path, tokenizer):
    text = tmp_path / "train.txt"
    text.write_text(SAMPLE_TEXT * 3)
    teacher = tiny_model("llama")
    kwargs = dict(eval_data=[SAMPLE_TEXT[:3000]], eval_seq_len=32, formats=["safetensors"],
                  calibration=compress.CalibrationConfig(seq_len=32, num_samples=12))
    result = compress.compress((teacher, tokenizer), {"intermediate_size": 48, "hidden_size": 48}, text,
                               tmp_path / "out", reconstruct={"least_squares": {"lambdas": [1e-2, 1e-1]}}, **kwargs)
    assert set(result.perplexity) == {"teacher", "pruned", "reconstructed"}
    stage = result.stages["reconstruct"]
    assert stage["plugin"] == "least_squares" and list(stage["config"]["lambdas"]) == [1e-2, 1e-1]
    # The saved student is the refit one: its perplexity is the "reconstructed" figure, not the pruned one.
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ppl = compress.evaluate.perplexity(student, tokenizer, [SAMPLE_TEXT[:3000]], seq_len=32)
    assert abs(ppl - result.perplexity["reconstructed"]) / ppl < 1e-4
    assert abs(ppl - result.perplexity["pruned"]) / ppl > 1e-3
    for bad in ("activation", {"least_squares": {"lambdas": [-1.0]}}, {"least_squares": {"nope": 1}}, ["x"]):
        with pytest.raises(compress.CompressError):
            compress.compress((tiny_model("llama"), tokenizer), {"intermediate_size": 48}, text, tmp_path / "bad",
                              reconstruct=bad, **kwargs)
        assert not (tmp_path / "bad").exists()


def test_search_and_reconstruct_are_refused_before_any_work(tmp_path, tokenizer, monkeypatch):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = dict(eval_data=[SAMPLE_TEXT[:3000]], eval_seq_len=32, formats=["safetensors"],
                  calibration=compress.CalibrationConfig(seq_len=32, num_samples=8))
    with pytest.raises(compress.CompressError, match="least_squares"):  # a config that is not one
        compress.compress((model, tokenizer), {"intermediate_size": 48}, [SAMPLE_TEXT], tmp_path / "a",
                          reconstruct={"least_squares": 5}, **kwargs)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(compress.ConfigError, match="one process"):
        compress.compress((model, tokenizer), {"params": 0.5}, [SAMPLE_TEXT], tmp_path / "b",
                          search=compress.SearchConfig(candidates=2), **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
