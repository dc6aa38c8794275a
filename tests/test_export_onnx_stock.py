"""An exported ``onnx/`` folder runs with the stock ``optimum.onnxruntime.ORTModelForCausalLM``, without compress.

optimum-onnx 0.1.0 feeds an empty KV cache on the first step whose head size is ``hidden_size // heads`` for
Llama-family types (wrong after pruning: the config keeps an explicit ``head_dim``) and whose head count is the
query head count for types outside its list (Gemma-2). The export rewrites the graph to accept it; these tests
load each folder in a fresh interpreter that never imports compress, generate greedily, and compare with
PyTorch's own ``generate`` on the same prompt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import compress
from compress.exporters.onnx import accept_any_empty_past, quantize_int8

from conftest import needs_optimum, randomized, tiny_config

pytestmark = needs_optimum  # Optimum's folders, checked with its own stock class

# Pruned shapes: 4 heads of 16 in a hidden size of 48 (16 != 48 // 4), 2 KV heads (grouped-query attention).
# Gemma-2's KV heads are outside Optimum's list; GPT-NeoX has neither (head size = hidden // heads, no GQA).
PRUNED = dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=64)
SHAPES = {"llama": PRUNED, "qwen3": PRUNED, "gemma2": PRUNED,
          "gpt_neox": dict(hidden_size=64, num_attention_heads=4, intermediate_size=64)}
PROMPTS = [[5, 17, 42, 99, 7, 61], [9, 33, 120, 8, 250, 14]]  # two prompts: the batch axis of the past too
NEW_TOKENS = 8

# Runs in a fresh interpreter: stock Optimum and transformers only, no compress, no patching.
STOCK_SCRIPT = r"""
import json, sys, traceback
import numpy as np, torch
from optimum.onnxruntime import ORTModelForCausalLM
folders, prompts, new_tokens = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2])), int(sys.argv[3])
results = {}
for name, folder in folders.items():
    try:
        model = ORTModelForCausalLM.from_pretrained(folder)
        mask = torch.ones_like(prompts)
        ids = model.generate(prompts, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             min_new_tokens=new_tokens, pad_token_id=0)
        with torch.no_grad():
            logits = model(input_ids=prompts, attention_mask=mask).logits
        np.save(f"{folder}/prefill_logits.npy", logits.float().numpy())
        results[name] = {"ids": ids.tolist()}
    except Exception:
        results[name] = {"error": traceback.format_exc()[-3000:]}
results["compress imported"] = any(m == "compress" or m.startswith("compress.") for m in sys.modules)
print("RESULTS " + json.dumps(results))
"""


def run_stock(folders: dict[str, Path], cwd: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", STOCK_SCRIPT, json.dumps({k: str(v) for k, v in folders.items()}),
         json.dumps(PROMPTS), str(NEW_TOKENS)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory):
    """Each family exported through compress, its PyTorch reference, and what the stock class made of it."""
    root = tmp_path_factory.mktemp("stock")
    prompts = torch.tensor(PROMPTS)
    folders, reference = {}, {}
    for family, shape in SHAPES.items():
        model = randomized(tiny_config(family, **shape))
        compress.export(model, tokenizer, root / family, formats=["safetensors", "onnx"])
        with torch.no_grad():
            ids = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            logits = model(prompts).logits.float().numpy()
        folders[family], reference[family] = root / family / "onnx", {"ids": ids.tolist(), "logits": logits}
    # The int8 graph is built from the rewritten fp32 graph: it must load with the stock class as well.
    folders["llama-int8"] = quantize_int8(root / "llama" / "onnx", root / "llama" / "onnx-int8")
    return folders, reference, run_stock(folders, cwd=root)


def test_stock_process_never_imported_compress(exported):
    assert exported[2]["compress imported"] is False


@pytest.mark.parametrize("family", list(SHAPES))
def test_stock_class_generates_like_pytorch(family, exported):
    folders, reference, results = exported
    got = results[family]
    assert "error" not in got, got.get("error")
    assert got["ids"] == reference[family]["ids"]  # greedy ids of both prompts, prompt included
    logits = np.load(folders[family] / "prefill_logits.npy")
    ref = reference[family]["logits"]
    assert np.abs(logits - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))


def test_stock_class_runs_int8_folder(exported):
    folders, reference, results = exported
    got = results["llama-int8"]
    assert "error" not in got, got.get("error")
    ids = np.array(got["ids"])
    assert ids.shape == (len(PROMPTS), len(PROMPTS[0]) + NEW_TOKENS) and (ids[:, :len(PROMPTS[0])] == PROMPTS).all()
    logits = np.load(folders["llama-int8"] / "prefill_logits.npy")
    assert np.isfinite(logits).all() and logits.shape == reference["llama"]["logits"].shape


def _feeds(session, ids: np.ndarray, past_shape: tuple) -> dict:
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}
    return {i.name: feeds.get(i.name, np.zeros(past_shape, dtype=np.float32)) for i in session.get_inputs()}


def test_rewritten_graph_accepts_any_empty_past_and_is_idempotent(exported):
    folders, reference, _ = exported
    path = folders["llama"] / "model.onnx"
    graph = onnx.load(str(path), load_external_data=False).graph
    past = [i for i in graph.input if i.name.startswith("past_key_values.")]
    assert len(past) == 2 * 4
    for inp in past:
        dims = inp.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims] == ["batch_size", "past_num_key_value_heads", "past_sequence_length",
                                               "past_head_dim"]
    assert sum(n.op_type == "Reshape" and n.input[0] in {i.name for i in past} for n in graph.node) == len(past)
    before = path.read_bytes()
    assert accept_any_empty_past(path) == 0 and path.read_bytes() == before  # already rewritten: untouched

    # Plain onnxruntime: the true empty past and Optimum's wrongly sized one give the same logits.
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.array(PROMPTS[:1])
    right = session.run(["logits"], _feeds(session, ids, (1, 2, 0, 16)))[0]
    wrong = session.run(["logits"], _feeds(session, ids, (1, 4, 0, 12)))[0]
    assert np.array_equal(right, wrong)
    assert np.abs(right - reference["llama"]["logits"][:1]).max() < 1e-4 * max(1.0, float(np.abs(right).max()))
