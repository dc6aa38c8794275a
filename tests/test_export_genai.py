"""onnxruntime-genai export: folders the stock generator runs, checked against transformers' own generate."""

import json
import shutil
from importlib import metadata

import numpy as np
import onnxruntime_genai as og
import pytest
import torch
from packaging import version
from transformers import AutoModelForCausalLM

import compress
from compress.errors import ConfigError
from compress.exporters import ExportError, genai

from conftest import HAS_OPTIMUM, SAMPLE_TEXT, VOCAB, needs_optimum, tiny_model

GENAI = version.parse(metadata.version("onnxruntime-genai"))
FROM_0_16 = GENAI >= version.parse("0.16")
# Every architecture the export accepts, as the tiny family that has it.
GENAI_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "granite", "phi3", "ernie4_5", "hunyuan_v1_dense", "gemma2"]
# Phi-3 with its partial rotary kept, at a rotary size the runtime runs (head 32 x 0.5 = 16; conftest's head of 16
# gives 8, which is refused: test_unsupported_family_is_refused_before_any_work).
OVERRIDES = {"phi3": dict(hidden_size=128, num_attention_heads=4, head_dim=32)}
# The families the installed builder release is checked for (Gemma-2 from 0.16 on).
ON_THIS_LINE = [f for f in GENAI_FAMILIES if FROM_0_16 or f != "gemma2"]
# Accepted since the five of issue 4, measured on both lines (Gemma-2 on 0.16+ only): quantized folders too.
ADDED = [f for f in ("phi3", "ernie4_5", "hunyuan_v1_dense", "gemma2") if f in ON_THIS_LINE]


def _model(family, **overrides):
    return tiny_model(family, **{**OVERRIDES.get(family, {}), **overrides})


def _pruned(family, calib_ids):
    model = _model(family)
    compress.prune(model, {"num_attention_heads": 4, "hidden_size": 48, "intermediate_size": 64}, calib_ids,
                   calibration=compress.CalibrationConfig(min_samples=4))
    return model


def _og_greedy(folder, ids: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens from onnxruntime-genai's own generator loop, as a deployment would run it."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def test_architectures_under_test_are_the_accepted_ones():
    assert {type(_model(f)).__name__ for f in GENAI_FAMILIES} == genai.BUILDER_ARCHITECTURES
    assert set(genai.FROM_GENAI_0_16) == {"Gemma2ForCausalLM"}


def test_sliding_window_models_match_past_the_window_or_are_refused(calib_ids, tokenizer, tmp_path):
    """Mistral with a window of 8 tokens: the 32-token parity check runs well past it. onnxruntime-genai 0.15.2
    (the 4.57 line) gets it right; 0.16 and later (the transformers 5 line) compute wrong logits past the window,
    so the export refuses it before any work."""
    model = tiny_model("mistral", sliding_window=8)
    if version.parse(metadata.version("onnxruntime-genai")) >= version.parse("0.16"):
        with pytest.raises(ExportError, match="sliding window of 8 tokens.*wrong logits past the window"):
            compress.export(model, tokenizer, tmp_path / "w", formats=["onnx-genai"])
        assert list(tmp_path.iterdir()) == []
        return
    report = compress.export(model, tokenizer, tmp_path / "w", formats=["onnx-genai"])
    assert report.genai["onnx-genai"]["parity"]["passed"]


@pytest.mark.parametrize("family", ON_THIS_LINE)
def test_genai_generates_what_transformers_generates(family, calib_ids, tokenizer, tmp_path):
    """A pruned student of each accepted family: fp32 parity within 1e-4, then 8 greedy tokens after a prompt of 6
    from onnxruntime-genai's own loop equal transformers' generate (Gemma-2's window of 8 is passed by then)."""
    model = _pruned(family, calib_ids)
    out = tmp_path / "e"
    report = compress.export(model, tokenizer, out, formats=["safetensors", "onnx-genai"])
    assert report.formats == ["safetensors", "onnx-genai"] and not (out / "onnx").exists()
    entry = report.genai["onnx-genai"]
    assert entry["parity"]["passed"] and entry["parity"]["relative_diff"] <= 1e-4
    assert entry["tokenizer"]["identical"]
    assert {"onnx-genai/genai_config.json", "onnx-genai/model.onnx", "onnx-genai/tokenizer.json"} <= set(report.files)
    prompt = calib_ids[0, :6].tolist()
    hf = AutoModelForCausalLM.from_pretrained(out)  # the reference: transformers' generate on the saved student
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                           pad_token_id=0)[0, len(prompt):].tolist()
    eos = hf.generation_config.eos_token_id
    if eos in expected:  # both loops stop at the end-of-sequence token (transformers pads after it)
        expected = expected[:expected.index(eos) + 1]
    assert _og_greedy(out / "onnx-genai", prompt, 8) == expected


def test_quantized_folders_report_their_perplexity(calib_ids, tokenizer, tmp_path):
    model = _pruned("llama", calib_ids)
    out = tmp_path / "q"
    report = compress.export(model, tokenizer, out, formats=["onnx-genai"], quantize="int8", eval_data=[SAMPLE_TEXT],
                             eval_tokens=512)
    assert report.formats == ["onnx-genai", "onnx-genai-int8"]
    q = report.genai["onnx-genai-int8"]["perplexity"]
    # Independent reference: the int8 model's logits from a plain onnxruntime session scored here by hand.
    ids = compress.evaluate.eval_windows(tokenizer, [SAMPLE_TEXT], q["eval_seq_len"], 512)
    nll = 0.0
    og_model = og.Model(str(out / "onnx-genai-int8"))
    for row in ids.tolist():
        logits = torch.from_numpy(genai.prefill_logits(og_model, row))
        nll += float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(row[1:]), reduction="sum"))
    assert q["ppl_int8"] == pytest.approx(float(np.exp(nll / (ids.numel() - ids.shape[0]))), rel=1e-4)
    assert q["ppl_fp32"] == pytest.approx(compress.evaluate.perplexity(model, tokenizer, [SAMPLE_TEXT],
                                                                       q["eval_seq_len"], 512), rel=1e-6)
    assert abs(q["ppl_change"]) < 0.1
    card = (out / "README.md").read_text()
    assert "onnx-genai-int8/" in card and f"{q['ppl_change']:+.1%}" in card and "import onnxruntime_genai" in card


def test_int4_folder(calib_ids, tokenizer, tmp_path):
    model = _pruned("qwen3", calib_ids)
    report = compress.export(model, tokenizer, tmp_path / "q", formats=["onnx-genai-int4"], eval_data=[SAMPLE_TEXT],
                             eval_tokens=256)
    q = report.genai["onnx-genai-int4"]["perplexity"]
    assert q["ppl_int4"] > 0 and np.isfinite(q["ppl_change"])
    assert not (tmp_path / "q" / "model.safetensors").exists()  # the safetensors folder was scratch only


@pytest.mark.parametrize("family", ADDED)
def test_quantized_folders_of_the_added_families(family, calib_ids, tokenizer, tmp_path):
    """The gates of the families added after the first five, on their int8 and int4 folders: tokenizer agreement,
    genai_config repair run, perplexity measured against PyTorch fp32 and close to it (int4 loosely: on these
    random models, whose perplexity is in the thousands, it moved by up to 17%; a wrong graph moves it by far more)."""
    report = compress.export(_pruned(family, calib_ids), tokenizer, tmp_path / "q",
                             formats=["onnx-genai-int8", "onnx-genai-int4"], eval_data=[SAMPLE_TEXT], eval_tokens=256)
    for fmt, precision, limit in (("onnx-genai-int8", "int8", 0.05), ("onnx-genai-int4", "int4", 0.5)):
        entry = report.genai[fmt]
        assert entry["tokenizer"]["identical"] and entry["config_changes"] == []
        q = entry["perplexity"]
        assert q[f"ppl_{precision}"] > 0 and abs(q["ppl_change"]) < limit, (fmt, q)


@pytest.mark.skipif(not FROM_0_16, reason="Gemma-2 is exported with onnxruntime-genai 0.16 or later only")
def test_gemma2_embedding_scale_is_exact_and_a_window_longer_than_the_text_runs(tokenizer, tmp_path):
    """The builder writes Gemma's embedding scale sqrt(96) as 9.8; the export writes 9.79796 (transformers' value,
    parity 5e-6 instead of 2e-3 of the largest logit). A window of 128 is longer than the 33 tokens the parity
    check asks the generator for: with the builder's window-sized caches the runtime refuses that length."""
    report = compress.export(tiny_model("gemma2", sliding_window=128), tokenizer, tmp_path / "g", formats=["onnx-genai"])
    entry = report.genai["onnx-genai"]
    assert entry["graph_changes"] == ["embedding scale: 9.8 -> 9.79796 (sqrt of hidden_size 96)"]
    assert entry["parity"]["relative_diff"] <= 2e-5
    assert genai.builder_options(tiny_model("gemma2")) == ["windowed_kv_cache=false"]
    assert genai.builder_options(tiny_model("llama")) == []


@pytest.mark.skipif(FROM_0_16, reason="the compatibility line's builder (0.15.2)")
def test_gemma2_is_refused_by_0_15_2(tokenizer, tmp_path):
    with pytest.raises(ExportError, match="Gemma2ForCausalLM is exported to onnxruntime-genai with release 0.16"):
        compress.export(tiny_model("gemma2"), tokenizer, tmp_path / "g", formats=["onnx-genai"])
    assert list(tmp_path.iterdir()) == []


def _phi3_longrope():
    """Phi-3 with LongRoPE switching from the short to the long factors past 16 tokens (the parity check runs 32)."""
    factors = dict(short_factor=[1.0 + 0.1 * i for i in range(8)], long_factor=[1.5 + 0.3 * i for i in range(8)])
    if version.parse(metadata.version("transformers")) >= version.parse("5"):
        rope = dict(rope_parameters=dict(rope_type="longrope", partial_rotary_factor=0.5, rope_theta=1e4, **factors))
    else:
        rope = dict(rope_scaling=dict(type="longrope", **factors))
    return _model("phi3", original_max_position_embeddings=16, **rope)


def test_phi3_longrope_matches_on_0_15_2_and_is_refused_from_0_16(tokenizer, tmp_path):
    model = _phi3_longrope()
    if FROM_0_16:
        with pytest.raises(ExportError, match="LongRoPE.*builder fails on it"):
            compress.export(model, tokenizer, tmp_path / "l", formats=["onnx-genai"])
        assert list(tmp_path.iterdir()) == []
        return
    report = compress.export(model, tokenizer, tmp_path / "l", formats=["onnx-genai"])
    assert report.genai["onnx-genai"]["parity"]["relative_diff"] <= 1e-4


def test_a_vocabulary_wide_linear_layer_is_refused_before_any_work(tokenizer, tmp_path):
    """Both builders take any linear layer with vocab_size outputs for the LM head (logits off by 1.3 of the
    largest, measured): an MLP pruned to the vocabulary's width is refused up front."""
    with pytest.raises(ExportError, match="gate_proj has 320 outputs, as many as the vocabulary"):
        compress.export(tiny_model("llama", intermediate_size=VOCAB), tokenizer, tmp_path / "v",
                        formats=["onnx-genai"])
    assert list(tmp_path.iterdir()) == []


def test_repair_config_sets_the_models_own_tokens(tmp_path):
    from transformers import GenerationConfig, LlamaConfig

    path = tmp_path / "genai_config.json"
    path.write_text(json.dumps({"model": {"eos_token_id": [1, 2], "bos_token_id": 1, "pad_token_id": 2,
                                          "context_length": 4096}, "search": {"top_k": 50, "temperature": 1.0}}))
    config = LlamaConfig(max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    changes = genai.repair_config(tmp_path, config, GenerationConfig(eos_token_id=2, bos_token_id=1, pad_token_id=3,
                                                                      temperature=0.7, do_sample=True))
    written = json.loads(path.read_text())
    assert written["model"] == {"eos_token_id": 2, "bos_token_id": 1, "pad_token_id": 3, "context_length": 8192}
    assert written["search"]["temperature"] == 0.7 and written["search"]["do_sample"] is True
    assert written["search"]["top_k"] == 50
    assert any(c.startswith("model.eos_token_id") for c in changes) and len(changes) == 5
    assert genai.repair_config(tmp_path, config, GenerationConfig(eos_token_id=2, bos_token_id=1, pad_token_id=3,
                                                                  temperature=0.7, do_sample=True)) == []


def _unk_tokenizer():
    """A byte-level tokenizer without the full byte alphabet: HF maps unseen bytes to <unk>, onnxruntime-genai
    to -1, so the two disagree on text with such bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["abc def"] * 10, trainers.BpeTrainer(vocab_size=40, special_tokens=["<pad>", "<s>",
                                                                                                   "</s>", "<unk>"]))
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def test_tokenizer_disagreement_is_refused_and_leaves_nothing(calib_ids, tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ExportError, match="tokenizer encodes differently"):
        compress.export(model, _unk_tokenizer(), tmp_path / "t", formats=["onnx-genai"])
    assert list(tmp_path.iterdir()) == []


@needs_optimum
def test_auto_falls_back_to_optimum_when_genai_fails_its_gates(tmp_path):
    report = compress.export(tiny_model("llama"), _unk_tokenizer(), tmp_path / "t")
    assert report.formats == ["safetensors", "onnx"] and report.parity["passed"]
    assert "tokenizer encodes differently" in report.skipped["onnx-genai"]
    assert not (tmp_path / "t" / "onnx-genai").exists() and (tmp_path / "t" / "onnx" / "model.onnx").is_file()
    saved = json.loads((tmp_path / "t" / "export_report.json").read_text())
    assert saved["skipped"] == report.skipped and "onnx-genai" not in saved["genai"]


@pytest.mark.skipif(HAS_OPTIMUM, reason="without optimum-onnx only (the transformers 5 line)")
def test_auto_without_optimum_keeps_safetensors_alone_when_genai_fails_its_gates(tmp_path):
    report = compress.export(tiny_model("llama"), _unk_tokenizer(), tmp_path / "t")
    assert report.formats == ["safetensors"]
    assert "tokenizer encodes differently" in report.skipped["onnx-genai"]
    assert 'pip install "compress-llm[optimum]"' in report.skipped["onnx"]
    assert sorted(p.name for p in (tmp_path / "t").iterdir() if p.is_dir()) == []
    saved = json.loads((tmp_path / "t" / "export_report.json").read_text())
    assert saved["skipped"] == report.skipped and saved["formats"] == ["safetensors"]


def test_auto_picks_genai_when_it_passes_and_optimum_for_other_families(tokenizer, tmp_path):
    report = compress.export(tiny_model("qwen2"), tokenizer, tmp_path / "a")
    assert report.formats == ["safetensors", "onnx-genai"]
    assert report.skipped == {}  # Optimum's format, installed or not, was never needed
    report = compress.export(tiny_model("gpt_neox"), tokenizer, tmp_path / "b", quantize="int8",
                             eval_data=[SAMPLE_TEXT], eval_tokens=256)
    assert "GPTNeoXForCausalLM" in report.skipped["onnx-genai"]
    if HAS_OPTIMUM:
        assert report.formats == ["safetensors", "onnx"] and report.int8["ppl_int8"] > 0
    else:  # auto never picks a format whose package is missing
        assert report.formats == ["safetensors"] and "optimum-onnx is not installed" in report.skipped["onnx"]


# Phi-3 as conftest makes it has a rotary size of 8 (head 16 x 0.5), which onnxruntime's attention cannot run.
@pytest.mark.parametrize("family", ["olmo2", "gemma3_text", "smollm3", "phi3"])
def test_unsupported_family_is_refused_before_any_work(family, tokenizer, tmp_path):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ExportError, match=type(model).__name__):
        compress.export(model, tokenizer, tmp_path / "o", formats=["onnx-genai"])
    assert list(tmp_path.iterdir()) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_parity_failure_discards_the_export(calib_ids, tokenizer, tmp_path):
    with pytest.raises(ExportError, match="onnxruntime-genai logits"):
        compress.export(_pruned("llama", calib_ids), tokenizer, tmp_path / "p", formats=["onnx-genai"],
                        parity_tolerance=1e-12)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("formats", [["auto", "onnx"], "auto,onnx", ["onnx-genai", "onnx-genai"]])
def test_bad_format_lists_are_refused(formats, tokenizer, tmp_path):
    with pytest.raises(ConfigError):
        compress.export(tiny_model("llama"), tokenizer, tmp_path / "x", formats=formats)
    assert list(tmp_path.iterdir()) == []


def test_builder_failure_names_the_builder(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(ExportError, match="model builder .fp32. failed"):
        genai.build(tmp_path / "hf", tmp_path / "out", "fp32")
    shutil.rmtree(tmp_path / "hf")


@pytest.mark.parametrize("transformers_line, genai_release, need", [
    ((5, 25), (0, 15), "onnxruntime-genai>=0.18"), ((4, 57), (0, 18), "onnxruntime-genai==0.15.2")])
def test_a_builder_that_cannot_import_with_this_transformers_is_refused_before_any_work(
        transformers_line, genai_release, need, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(genai, "transformers_version", lambda: transformers_line)
    monkeypatch.setattr(genai, "_installed_genai", lambda: genai_release)
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ExportError, match=rf"model builder cannot run with transformers.*{need}"):
        compress.export(model, tokenizer, tmp_path / "o", formats=["onnx-genai"])
    assert list(tmp_path.iterdir()) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
