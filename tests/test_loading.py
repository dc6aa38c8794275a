"""Loading teachers the same way on both transformers lines: the dtype compress picks, whatever the line's own
default (transformers 5 loads a checkpoint in its saved dtype, 4.57 in float32)."""

import torch
from transformers import AutoModelForCausalLM

import compress

from conftest import tiny_model


def test_a_bf16_checkpoint_loads_in_float32_unless_asked(tmp_path, tokenizer):
    tiny_model("llama").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tokenizer.save_pretrained(tmp_path / "bf16")
    model, _ = compress.load_teacher(tmp_path / "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    auto, _ = compress.load_teacher(tmp_path / "bf16", dtype="auto")  # the checkpoint's own dtype
    assert {p.dtype for p in auto.parameters()} == {torch.bfloat16}
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name
