"""One input, one answer: every public entry point that takes a device, a dtype or a file refuses the same bad
value with the same error (the check lives in one module, compress.validate, and each entry point calls it)."""

from __future__ import annotations

import pytest
import torch

import compress
from compress.cli import main

from conftest import cli_run_args, tiny_model


def _message(call) -> str:
    with pytest.raises(compress.ConfigError) as caught:
        call()
    return str(caught.value)


@pytest.mark.parametrize("device", ["gpu", "cuda:9", "meta"])
def test_the_same_bad_device_is_refused_the_same_way_everywhere(tmp_path, tokenizer, device, capsys):
    args = cli_run_args(tmp_path, tokenizer)
    teacher, train = args[0], tmp_path / "train.txt"
    ids = torch.randint(4, 300, (4, 16))
    calls = {
        "compress": lambda: compress.compress(teacher, {"params": 0.5}, train, tmp_path / "o", device=device),
        "load_teacher": lambda: compress.load_teacher(teacher, device=device),
        "distill": lambda: compress.distill(tiny_model("llama"), tiny_model("llama", seed=1), ids,
                                            compress.DistillConfig(max_steps=1), device=device),
        "search_shapes": lambda: compress.search_shapes(tiny_model("llama"), {"params": 0.5}, ids, train_data=ids,
                                                        device=device),
        "build_teacher_cache": lambda: compress.build_teacher_cache(tiny_model("llama"), ids, tmp_path / "c",
                                                                    device=device),
    }
    messages = {name: _message(call) for name, call in calls.items()}
    assert len(set(messages.values())) == 1, messages
    assert repr(device) in next(iter(messages.values()))
    # The command line says the same, as one line with exit code 2.
    assert main(args + ["--device", device]) == 2
    assert next(iter(messages.values())) in capsys.readouterr().err


def test_the_same_bad_dtype_is_refused_the_same_way_everywhere(tmp_path, tokenizer):
    args = cli_run_args(tmp_path, tokenizer)
    messages = {
        _message(lambda: compress.load_teacher(args[0], dtype="float17")),
        _message(lambda: compress.validate.check_dtype("float17")),
    }
    assert len(messages) == 1 and "'float17'" in messages.pop()


def test_the_same_missing_text_file_is_refused_the_same_way_everywhere(tmp_path, tokenizer):
    args = cli_run_args(tmp_path, tokenizer)
    model, missing = tiny_model("llama"), tmp_path / "nowhere" / "train.txt"
    calls = [
        lambda: compress.compress(args[0], {"params": 0.5}, missing, tmp_path / "o"),
        lambda: compress.prune(model, {"params": 0.5}, missing, tokenizer=tokenizer),
        lambda: compress.evaluate.perplexity(model, tokenizer, missing),
        lambda: compress.export(model, tokenizer, tmp_path / "e", ["onnx-genai-int8"], eval_data=missing),
        lambda: compress.distill(tiny_model("llama"), model, missing, compress.DistillConfig(max_steps=1),
                                 tokenizer=tokenizer),
    ]
    messages = set()
    for call in calls:
        with pytest.raises(compress.DataError) as caught:
            call()
        messages.add(str(caught.value))
    assert len(messages) == 1 and "nowhere" in messages.pop()
