"""Each bad input gets a clear error before any work, and leaves the model and the disk as they were."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import compress
from compress.errors import (CheckpointError, ConfigError, DataError, OutputExistsError, PluginError, TargetError,
                             UnsupportedModelError)

from conftest import tiny_model

CAL = compress.CalibrationConfig(min_samples=4)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "target, strategy, error, match",
    [
        ({"params": 1.0}, "width", TargetError, "not smaller than the teacher"),
        ({"params": 10**9}, "width", TargetError, "not smaller than the teacher"),
        ({"params": 0.01}, "width", TargetError, "below the smallest shape"),
        ({"params": 0.05}, "depth", TargetError, "below the smallest shape"),
        ({"params": -1}, "width", TargetError, "positive"),
        ({"hidden_size": 128}, "width", TargetError, "larger than the teacher"),
        ({"num_attention_heads": 5}, "width", TargetError, "not a multiple"),
        ({"num_attention_heads": 4, "num_key_value_heads": 1}, "width", TargetError, "per group"),
        ({"num_hidden_layers": 2}, "width", TargetError, "strategy='width'"),
        ({"hidden_size": 32}, "depth", TargetError, "strategy='depth'"),
        ({"hidden_size": 32.5}, "width", TargetError, "integer"),
        ({"width": 3}, "width", TargetError, "unknown target key"),
        ({"params": 0.5}, "sideways", ConfigError, "strategy should be one of"),
    ],
)
def test_bad_targets(target, strategy, error, match, calib_ids):
    model = tiny_model("llama")
    before = _state(model)
    with pytest.raises(error, match=match):
        compress.prune(model, target, calib_ids, strategy=strategy, calibration_config=CAL)
    assert _unchanged(model, before)


def test_unknown_architecture_names_supported_families(calib_ids):
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match=r"'gpt2'.*supported families: .*register_adapter") as err:
        compress.prune(model, {"params": 0.5}, calib_ids)
    # Every family an adapter is declared for in setup.cfg's entry points (each entry point names one of its
    # adapter's families), in the message.
    import configparser
    from pathlib import Path

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).parent.parent / "setup.cfg")
    declared = [line.split("=")[0].strip() for line in cfg["options.entry_points"]["compress.plugins"].splitlines()
                if "compress.models:" in line]
    named = str(err.value).split("supported families: ")[1].split(")")[0].split(", ")
    assert len(declared) >= 20 and set(declared) <= set(named) and named == sorted(named)


@pytest.mark.parametrize("text, match", [("", "fewer than one window"), ("tiny text", "fewer than one window")])
def test_empty_or_short_calibration_text(text, match, tokenizer):
    model = tiny_model("llama")
    before = _state(model)
    with pytest.raises(DataError, match=match):
        compress.prune(model, {"params": 0.5}, [text], tokenizer=tokenizer, calibration_config=CAL)
    assert _unchanged(model, before)


def test_too_few_calibration_windows(tokenizer):
    model = tiny_model("llama")
    with pytest.raises(DataError, match="min_samples=8"):
        compress.prune(model, {"params": 0.5}, ["some words here and there " * 20], tokenizer=tokenizer,
                       calibration_config=compress.CalibrationConfig(seq_len=64))


def test_block_search_without_calibration_says_so():
    scores = compress.score_importance(tiny_model("llama"), torch.randint(4, 300, (8, 16)), calibration_config=CAL)
    with pytest.raises(ConfigError, match="contiguous-block search needs calibration data"):
        compress.prune(tiny_model("llama"), {"num_hidden_layers": 2}, None, strategy="depth", importance=scores)


def test_missing_calibration_file(tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        compress.prune(tiny_model("llama"), {"params": 0.5}, "/no/such/file.txt", tokenizer=tokenizer)


def test_tokenizer_that_does_not_match_the_model(tokenizer):
    model = tiny_model("llama", vocab_size=100)
    with pytest.raises(DataError, match="do not belong together"):
        compress.prune(model, {"params": 0.5}, ["text " * 500], tokenizer=tokenizer, calibration_config=CAL)


def test_calibration_ids_outside_vocabulary():
    model = tiny_model("llama", vocab_size=100)
    with pytest.raises(DataError, match="outside the model's vocabulary"):
        compress.prune(model, {"params": 0.5}, torch.full((8, 16), 150), calibration_config=CAL)


def test_unknown_plugin_and_bad_plugin_config(calib_ids):
    model = tiny_model("llama")
    before = _state(model)
    with pytest.raises(PluginError, match="unknown plugin 'wand'"):
        compress.prune(model, {"params": 0.5}, calib_ids, plugins=["wand"], calibration_config=CAL)
    with pytest.raises(ConfigError, match=r"batch_agg.*'max'"):
        compress.prune(model, {"params": 0.5}, calib_ids, plugins={"activation": {"batch_agg": "max"}},
                       calibration_config=CAL)
    with pytest.raises(ConfigError, match=r"CalibrationConfig.seq_len.*0"):
        compress.CalibrationConfig(seq_len=0)
    with pytest.raises(ConfigError, match=r"tolerance"):
        compress.PlanConfig(tolerance=2)
    assert _unchanged(model, before)


def test_output_folder_not_empty(tmp_path, tokenizer):
    out = tmp_path / "student"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        compress.compress((tiny_model("llama"), tokenizer), {"params": 0.5}, ["x " * 2000], out, eval_data=["y " * 300])
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failure_mid_pipeline_leaves_no_output(tmp_path, tokenizer):
    out = tmp_path / "student"
    with pytest.raises(PluginError):
        compress.compress((tiny_model("llama"), tokenizer), {"params": 0.5}, ["x " * 2000], out,
                          eval_data=["y " * 300], plugins=["nope"], calibration=CAL)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_unknown_export_format_is_refused_before_any_work(tmp_path, tokenizer):
    model = tiny_model("llama")
    before = _state(model)
    with pytest.raises(ConfigError, match="unknown export format"):
        compress.compress((model, tokenizer), {"params": 0.5}, ["x " * 2000], tmp_path / "o", formats=["tflite"])
    with pytest.raises(ConfigError, match="unknown quantization"):
        compress.compress((model, tokenizer), {"params": 0.5}, ["x " * 2000], tmp_path / "o", quantize="fp8")
    assert _unchanged(model, before) and not (tmp_path / "o").exists()


def test_same_file_for_calibration_and_evaluation(tmp_path, tokenizer):
    text = tmp_path / "a.txt"
    text.write_text("words " * 1000)
    with pytest.raises(DataError, match="same file"):
        compress.compress((tiny_model("llama"), tokenizer), {"params": 0.5}, text, tmp_path / "o", eval_data=text)


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        compress.load_teacher(tmp_path / "nope.gguf")
    with pytest.raises(CheckpointError, match="neither an existing folder"):
        compress.load_teacher(tmp_path / "nope")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="could not load"):
        compress.load_teacher(tmp_path / "bad.gguf")

    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder, safe_serialization=True)
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="could not load"):
        compress.load_teacher(folder)

    pickled = tmp_path / "pickled"
    pickled_model = tiny_model("llama")
    pickled_model.save_pretrained(pickled)  # a .bin checkpoint by hand: transformers 5 writes safetensors only
    (pickled / "model.safetensors").unlink()
    torch.save(pickled_model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled checkpoints are refused"):
        compress.load_teacher(pickled)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        compress.load_teacher(tmp_path / "empty")
