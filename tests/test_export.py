"""Export: safetensors + ONNX with KV cache, parity with PyTorch, int8, model card, and refusals."""

import json

import numpy as np
import onnxruntime
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaModel

import compress
from compress.errors import ConfigError, OutputExistsError
from compress.exporters import ExportError

from conftest import FAMILIES, HAS_OPTIMUM, SAMPLE_TEXT, needs_optimum, tiny_model


# GPT-NeoX's head size is hidden_size // heads (16 = 64 / 4 there; hidden 96 before).
HIDDEN = {"gpt_neox": 64}


def _pruned(family, calib_ids):
    model = tiny_model(family)
    compress.prune(model, {"num_attention_heads": 4, "hidden_size": HIDDEN.get(family, 48), "intermediate_size": 64},
                   calib_ids, calibration_config=compress.CalibrationConfig(min_samples=4))
    return model


# Families optimum-onnx 0.1.0 has no text-generation exporter for (checked against its TasksManager in the test).
OPTIMUM_LACKS = ("apertus", "ernie4_5", "exaone4", "glm4", "hunyuan_v1_dense", "olmo3", "seed_oss")


@needs_optimum
@pytest.mark.parametrize("family", FAMILIES)
def test_export_onnx_matches_pytorch(family, calib_ids, tokenizer, tmp_path):
    model = _pruned(family, calib_ids)
    out = tmp_path / "export"
    if family in OPTIMUM_LACKS:  # families newer than optimum-onnx 0.1.0: refused before anything is written
        with pytest.raises(ExportError, match=f"no 'text-generation-with-past' support for model type '{family}'"):
            compress.export(model, tokenizer, out, formats=["safetensors", "onnx"])
        assert list(tmp_path.iterdir()) == []
        return
    report = compress.export(model, tokenizer, out, formats=["safetensors", "onnx"])
    assert report.parity["passed"] and report.parity["max_abs_diff"] <= 1e-4 * report.parity["max_abs_logit"]
    assert report.parity["relative_diff"] <= 1e-4
    files = set(report.files)
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md",
            "onnx/model.onnx", "onnx/config.json"} <= files
    assert not any(f.endswith((".gguf", ".bin", ".pt")) for f in files)
    config = json.loads((out / "config.json").read_text())
    config = config.get("text_config", config)  # multimodal Gemma-3: the decoder's sizes
    assert config["head_dim"] == 16 and config["hidden_size"] == HIDDEN.get(family, 48)
    assert config["intermediate_size"] == 64

    if family == "gemma3":  # the exported graph is the text decoder: no image input
        inputs = {i.name for i in onnxruntime.InferenceSession(str(out / "onnx" / "model.onnx")).get_inputs()}
        assert "input_ids" in inputs and "pixel_values" not in inputs
    from compress.exporters.onnx import load_ort
    ort = load_ort(out / "onnx")
    hf = AutoModelForCausalLM.from_pretrained(out)
    prompt = calib_ids[:1, :5]
    ort_out = ort.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    assert torch.equal(ort_out, hf.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0))


@needs_optimum
def test_plain_onnxruntime_runs_the_graph(calib_ids, tokenizer, tmp_path):
    model = _pruned("llama", calib_ids)
    compress.export(model, tokenizer, tmp_path / "e", formats=["onnx"])
    assert not (tmp_path / "e" / "model.safetensors").exists()
    session = onnxruntime.InferenceSession(str(tmp_path / "e" / "onnx" / "model.onnx"))
    ids = calib_ids[:1, :8].numpy()
    feeds = {}
    for inp in session.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = ids
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones_like(ids)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.arange(ids.shape[1])[None]
        else:  # empty past key values: [batch, kv_heads, 0, head_dim]
            feeds[inp.name] = np.zeros((1, 2, 0, 16), dtype=np.float32)
    logits = session.run(["logits"], feeds)[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(logits - ref).max() < 1e-4


@needs_optimum
@pytest.mark.parametrize("family", ["llama", "qwen2"])  # tied and untied embeddings
def test_int8_reports_perplexity_cost_and_card(family, calib_ids, tokenizer, tmp_path):
    import onnx

    model = _pruned(family, calib_ids)
    report = compress.export(model, tokenizer, tmp_path / "q", formats=["safetensors", "onnx"], quantize="int8",
                             eval_data=[SAMPLE_TEXT], eval_tokens=256, name="tiny-student")
    assert "onnx-int8/model.onnx" in report.files
    assert report.files["onnx-int8/model.onnx"] < report.files["onnx/model.onnx"]
    assert report.int8["ppl_int8"] > 0 and abs(report.int8["ppl_change"]) < 0.05
    assert report.int8["eval_tokens"] == 512  # what was scored: one whole 512-token window
    # Every linear layer and the LM head run as int8 MatMulNBits; no MatMul with a constant weight is left,
    # and a tied head no longer reads the embedding through a Transpose.
    graph = onnx.load(str(tmp_path / "q" / "onnx-int8" / "model.onnx")).graph
    quantized = [n.name for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(quantized) == 7 * model.config.num_hidden_layers + 1
    assert any("lm_head" in name for name in quantized)
    weights = {i.name for i in graph.initializer}
    transposed_weights = {o for n in graph.node if n.op_type == "Transpose" and n.input[0] in weights
                          for o in n.output}
    assert [n.name for n in graph.node if n.op_type == "MatMul" and (weights | transposed_weights) & set(n.input)] == []
    card = (tmp_path / "q" / "README.md").read_text()
    assert "# tiny-student" in card and "ORTModelForCausalLM.from_pretrained" in card and "onnx-int8" in card
    assert f"{report.int8['ppl_fp32']:.2f} (fp32 ONNX) -> {report.int8['ppl_int8']:.2f}" in card


def test_untie_transposed_weights_keeps_other_consumers():
    """A Transpose of a weight that also feeds a graph output stays; the MatMul gets its own transposed copy."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from compress.exporters.onnx import _untie_transposed_weights

    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["w"], ["wt"], name="t"), helper.make_node("MatMul", ["x", "wt"], ["y"], name="m")],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("wt", onnx.TensorProto.FLOAT, [4, 3])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph)
    assert _untie_transposed_weights(model) == 1
    matmul = next(n for n in model.graph.node if n.op_type == "MatMul")
    copy = next(i for i in model.graph.initializer if i.name == matmul.input[1])
    np.testing.assert_array_equal(numpy_helper.to_array(copy), w.T)
    assert any(n.op_type == "Transpose" for n in model.graph.node)  # still feeds the graph output "wt"
    onnx.checker.check_model(model)


def test_failed_parity_leaves_nothing(calib_ids, tokenizer, tmp_path):
    model = _pruned("llama", calib_ids)
    with pytest.raises(ExportError, match="differ from PyTorch"):
        compress.export(model, tokenizer, tmp_path / "bad", formats=["onnx-genai"], parity_tolerance=1e-12)
    assert list(tmp_path.iterdir()) == []
    # formats="auto": every deployment format that fails its gates is skipped, saying why; safetensors stay.
    report = compress.export(model, tokenizer, tmp_path / "auto", parity_tolerance=1e-12)
    assert report.formats == ["safetensors"] and "differ from PyTorch" in report.skipped["onnx-genai"]
    assert sorted(p.name for p in (tmp_path / "auto").iterdir() if p.is_dir()) == []


def test_refusals(calib_ids, tokenizer, tmp_path):
    with pytest.raises(ExportError, match="not a Hugging Face causal language model"):
        compress.export(LlamaModel(LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64,
                                               num_attention_heads=2, num_hidden_layers=1)), tokenizer, tmp_path / "a")
    uneven = tiny_model("llama")
    compress.pruning.surgery.slice_linear(uneven.model.layers[1].mlp.up_proj, out_idx=torch.arange(48))
    with pytest.raises(ExportError, match="per-layer shapes cannot be exported"):
        compress.export(uneven, tokenizer, tmp_path / "b")
    with pytest.raises(ConfigError, match="unknown export format"):
        compress.export(tiny_model("llama"), tokenizer, tmp_path / "c", formats=["tflite"])
    with pytest.raises(ConfigError, match="unknown quantization"):
        compress.export(tiny_model("llama"), tokenizer, tmp_path / "c", quantize="int4")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(OutputExistsError):
        compress.export(tiny_model("llama"), tokenizer, tmp_path / "full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


@pytest.mark.skipif(HAS_OPTIMUM, reason="without optimum-onnx only (the transformers 5 line)")
def test_onnx_without_optimum_is_refused_naming_the_install(tokenizer, tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ExportError, match=r'optimum-onnx is not installed.*pip install "compress-llm\[optimum\]"'):
        compress.export(model, tokenizer, tmp_path / "o", formats=["safetensors", "onnx"])
    assert list(tmp_path.iterdir()) == []


def test_format_registry_is_the_one_table_of_formats():
    """Every format is one registry entry; a handler module provides what the export loop calls; the name checks
    live in a module that loads no exporter implementation (a config check can import it cheaply)."""
    import importlib
    import subprocess
    import sys

    from compress.exporters import formats

    assert formats.FORMATS == ("safetensors", "onnx", "onnx-genai", "onnx-genai-int8", "onnx-genai-int4", "gguf")
    assert formats.REPORT_KEYS == ("parity", "int8", "genai", "gguf")
    assert compress.exporters.check_export_args is formats.check_export_args
    onnx = importlib.import_module("compress.exporters.onnx")
    assert compress.exporters.ExportError is formats.ExportError is onnx.ExportError
    for name, spec in formats.REGISTRY.items():
        if spec.module is None:
            continue
        module = importlib.import_module(spec.module)
        assert isinstance(module.CHECKS, str), name
        assert all(callable(getattr(module, f)) for f in ("check_support", "write_formats", "card_section")), name
        if spec.module != "compress.exporters.onnx":  # nothing measured: no card text (Optimum's folder has usage text alone)
            assert module.card_section({}) == ([], []), name
    code = ("import sys; from compress.exporters.formats import check_export_args; check_export_args('auto', None); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('optimum', 'onnxruntime_genai', 'conversion', "
            "'gguf', 'onnx') or m in ('compress.exporters.onnx', 'compress.exporters.genai', "
            "'compress.exporters.gguf')))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_quantize_and_auto_resolution_follow_the_registry(tokenizer):
    from compress.exporters import formats, resolve_formats

    assert formats.with_int8(["onnx-genai", "onnx"], "int8") == ["onnx-genai", "onnx", "onnx-genai-int8"]
    assert formats.with_int8(["onnx-genai", "onnx-genai-int8"], "int8") == ["onnx-genai", "onnx-genai-int8"]
    assert formats.with_int8(["onnx-genai"], None) == ["onnx-genai"]
    with pytest.raises(ConfigError, match="add 'onnx' or 'onnx-genai' to formats"):
        formats.check_export_args(["safetensors", "gguf"], "int8")
    chosen, fallbacks, skipped = resolve_formats(tiny_model("qwen2"), ["auto"], "int8", tokenizer)
    assert chosen == ["safetensors", "onnx-genai", "onnx-genai-int8"]
    # "auto" never picks a format whose package is missing: Optimum's only where optimum-onnx is installed
    assert (fallbacks, list(skipped)) == ((["onnx"], []) if HAS_OPTIMUM else ([], ["onnx"]))
    chosen, fallbacks, skipped = resolve_formats(tiny_model("gpt_neox"), ["auto"], None, tokenizer)
    assert (chosen, fallbacks) == ((["safetensors", "onnx"], []) if HAS_OPTIMUM else (["safetensors"], []))
    assert list(skipped) == (["onnx-genai"] if HAS_OPTIMUM else ["onnx-genai", "onnx"])
    assert resolve_formats(tiny_model("llama"), ["onnx-genai"], "int8", tokenizer)[0] == ["onnx-genai",
                                                                                           "onnx-genai-int8"]


def test_export_report_is_keyed_by_format_with_the_old_json_shape():
    from compress.exporters import ExportReport

    report = ExportReport(out_dir="o", formats=["safetensors", "onnx"], results={"parity": {"passed": True}})
    assert report.parity == {"passed": True} and report.int8 == {} and report.genai == {} and report.gguf == {}
    report.gguf = {"f16": {}}
    data = report.to_dict()
    assert list(data) == ["out_dir", "formats", "files", "parity", "int8", "genai", "gguf", "skipped", "params",
                          "shape", "seconds"]
    assert data["parity"] == {"passed": True} and data["gguf"] == {"f16": {}}
    data["parity"]["passed"] = False  # a copy: the report is not changed through it
    assert report.parity == {"passed": True}


def test_model_card_places_each_formats_section():
    from compress.exporters.card import CardSection, model_card

    card = model_card("s", 1000, {"hidden_size": 8}, history={"perplexity": {"teacher": 2.0}},
                      sections={"a": CardSection(["", "measured A"], ["", "run A"]),
                                "b": CardSection([], ["", "run B"])})
    order = [card.index(s) for s in ("| teacher | 2.00 |", "measured A", "## Use", "run A", "run B")]
    assert order == sorted(order) and card.endswith("run B\n")
