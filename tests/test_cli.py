import json

from transformers import AutoModelForCausalLM

from compress.cli import main

from conftest import cli_run_args


def test_cli_compresses_and_reports_errors(tmp_path, tokenizer, capsys):
    args = cli_run_args(tmp_path, tokenizer, "mistral")
    assert main(args + ["--json", "--formats", "safetensors"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prune"]["params_after"] <= result["prune"]["params_before"] / 2
    AutoModelForCausalLM.from_pretrained(tmp_path / "s")

    assert main(args + ["--out", str(tmp_path / "d"), "--distill-tokens", "128", "--seq-len", "32",
                        "--hidden-loss", "cosine", "--int8", "--prompt", "The quick"]) == 0
    printed = capsys.readouterr().out
    # The default formats: safetensors + the fastest ONNX that passes its checks (onnxruntime-genai here).
    assert "distill" in printed and "PASSED" in printed and "sample   (onnxruntime-genai" in printed
    assert "genai    " in printed and "int8, perplexity" in printed
    assert (tmp_path / "d" / "onnx-genai-int8" / "model.onnx").exists() and not (tmp_path / "d" / "onnx").exists()
    assert main(args) == 2  # folder now exists and is not empty
    assert "overwrite" in capsys.readouterr().err
    assert main(["--list-plugins"]) == 0
    assert "activation" in capsys.readouterr().out
