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


def test_cli_search_reconstruct_and_objective_flags(tmp_path, tokenizer, capsys):
    args = cli_run_args(tmp_path, tokenizer, "llama")
    (tmp_path / "train.txt").write_text((tmp_path / "train.txt").read_text() * 3)
    assert main(args + ["--formats", "safetensors", "--search", "2", "--search-tokens", "128", "--reconstruct",
                        "--distill-tokens", "128", "--logit-loss", "skew_forward_kl", "--on-policy", "0.5",
                        "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["stages"]["search"]["candidates"]) == 2
    assert result["stages"]["reconstruct"]["plugin"] == "least_squares"
    assert result["stages"]["distill"]["config"]["logit_loss"] == "skew_forward_kl"
    assert result["stages"]["distill"]["config"]["on_policy_fraction"] == 0.5
    assert set(result["perplexity"]) == {"teacher", "pruned", "reconstructed", "distilled"}
    assert main(args + ["--out", str(tmp_path / "e"), "--reconstruct", "activation"]) == 2
    assert "reconstruct" in capsys.readouterr().err and not (tmp_path / "e").exists()


def test_cli_refuses_flags_that_need_another(tmp_path, tokenizer, capsys):
    args = cli_run_args(tmp_path, tokenizer, "llama")
    for extra, needed in ((["--on-policy", "0.5"], "--distill-tokens"), (["--logit-loss", "jsd"], "--distill-tokens"),
                          (["--search-tokens", "100"], "--search")):
        assert main(args + extra) == 2
        assert needed in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_help_is_plain_text_and_its_usage_names_every_subcommand(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    usage = text.split("\n\n")[0]
    assert "compress run RECIPE.yaml" in usage and "compress report OUT" in usage
    for markup in ("``", ":func:", ":class:", ":mod:"):
        assert markup not in text, markup
