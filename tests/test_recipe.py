"""Recipes: one schema for a whole run, one set of defaults, saved with every student and replayable."""

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import compress
from compress import api, pipeline
from compress.cli import build_parser, main, recipe_from_args
from compress.errors import CompressError, ConfigError, interface
from compress.recipe import RECIPE_FILE, DataSettings, ExportSettings, Recipe

from conftest import SAMPLE_TEXT, tiny_model

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "recipes"


def test_yaml_round_trip_writes_every_field_and_builds_nested_configs():
    recipe = Recipe(teacher="some/folder", target={"hidden_size": 448}, strategy="width+depth",
                    plugins={"magnitude": None, "depth": {"method": "block_influence"}},
                    calibration={"num_samples": 64, "seq_len": 128},
                    distill={"max_tokens": 40_000, "lr": 1e-3, "hidden_loss": "cosine"},
                    search={"candidates": 2, "tokens_per_candidate": 4096},
                    reconstruct="least_squares", export={"formats": ["safetensors", "onnx"], "quantize": "int8"})
    assert isinstance(recipe.distill, compress.DistillConfig) and isinstance(recipe.search, compress.SearchConfig)
    text = recipe.to_yaml()
    plain = yaml.safe_load(text)  # what any YAML reader sees, checked by hand
    assert plain["target"] == {"hidden_size": 448} and plain["strategy"] == "width+depth"
    assert plain["plugins"] == {"magnitude": None, "depth": {"method": "block_influence"}}
    assert plain["calibration"] == {"num_samples": 64, "seq_len": 128, "batch_size": 8, "min_samples": 8}
    assert plain["distill"]["lr"] == 1e-3 and plain["distill"]["max_tokens"] == 40_000
    assert plain["distill"]["warmup_ratio"] == 0.1  # defaults are written out too: replays do not drift
    assert plain["export"] == {"formats": ["safetensors", "onnx"], "quantize": "int8"}
    again = Recipe.from_yaml(text)
    assert again == recipe and again.to_yaml() == text


@pytest.mark.parametrize("text, named", [
    ("teacher: x\nfoo: 1\n", "unknown field foo"),
    ("distill: {max_tokens: 1000, lrr: 0.1}\n", "recipe.distill: unknown field lrr"),
    ("calibration: {num_samples: 0}\n", "recipe.calibration: CalibrationConfig.num_samples"),
    ("distill: {max_tokens: 1000, lr: -1}\n", "recipe.distill"),
    ("strategy: deep\n", "strategy should be one of"),
    ("target: half\n", "target should be a dict like"),
    ("target: {params: 0.5, hidden_size: 448}\n", "not both"),
    ("plugins: {nonexistent: null}\n", "unknown plugin 'nonexistent'"),
    ("plugins: {depth: {method: fastest}}\n", "DepthAxis.method should be one of"),
    ("export: {formats: [safetensors, tflite]}\n", "recipe export: unknown export format"),
    ("data: {evaluation: [a, b]}\n", "data.evaluation should be a file path"),
    ("- teacher\n", "should be a YAML mapping"),
    ("teacher: [unclosed\n", "not valid YAML"),
])
def test_bad_recipes_are_refused_naming_the_key(text, named):
    with pytest.raises(CompressError, match=named.replace("[", r"\[").replace(".", r"\.")):
        Recipe.from_yaml(text)


def test_one_set_of_defaults_for_the_api_the_cli_and_the_recipe(monkeypatch):
    # The values the issue found disagreeing, written down here by hand as the reference.
    defaults = Recipe()
    assert defaults.calibration.num_samples == 1024 and defaults.export.formats == "auto"
    assert defaults.data.eval_tokens == 4096 and defaults.out_dir == "compressed" and defaults.distill is None
    # The command line with no flags makes exactly the default recipe.
    assert recipe_from_args(build_parser().parse_args([])) == defaults
    # So does the keyword API (captured before any work).
    seen = []
    monkeypatch.setattr(api, "run_recipe", lambda recipe, objects=None, overwrite=False: seen.append(recipe))
    compress.compress("smollm2", {"params": 0.5})
    assert seen[0] == defaults
    # And a distillation from the CLI takes DistillConfig's own learning rate and schedule.
    cfg = recipe_from_args(build_parser().parse_args(["--distill-tokens", "32768"])).distill
    assert (cfg.lr, cfg.batch_size, cfg.seq_len, cfg.warmup_ratio, cfg.output_dir) == (5e-4, 4, 256, 0.1, None)
    args = build_parser().parse_args(["--distill-tokens", "32768", "--lr", "1e-3", "--checkpoint-dir", "ck"])
    cfg = recipe_from_args(args).distill
    assert cfg.lr == 1e-3 and cfg.output_dir == "ck"


def test_compress_recipe_refuses_settings_beside_it_and_unreplayable_recipes(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="set strategy on it"):
        compress.compress(Recipe(), strategy="depth")
    recipe = Recipe(teacher=None, inputs_in_memory=["teacher", "data.calibration"])
    with pytest.raises(ConfigError, match="teacher, data.calibration were Python objects"):
        compress.compress(recipe, out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def _tiny_run(tmp_path: Path, tokenizer, **extra) -> tuple[Path, compress.Result]:
    teacher = tmp_path / "teacher"
    tiny_model("llama").save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    (tmp_path / "train.txt").write_text(SAMPLE_TEXT * 3)
    (tmp_path / "valid.txt").write_text(SAMPLE_TEXT[:3000])
    out = tmp_path / "first"
    result = compress.compress(teacher, {"params": 0.5}, tmp_path / "train.txt", out, eval_data=tmp_path / "valid.txt",
                               eval_seq_len=32, eval_tokens=256, formats=["safetensors"], prompt="The quick",
                               calibration=compress.CalibrationConfig(seq_len=32, num_samples=8), **extra)
    return out, result


def test_every_output_holds_its_recipe_and_compress_run_replays_it(tmp_path, tokenizer, capsys):
    distill = compress.DistillConfig(max_steps=2, batch_size=2, seq_len=32, progress=False, log_every=1)
    out, first = _tiny_run(tmp_path, tokenizer, distill=distill)
    saved = Recipe.load(out / RECIPE_FILE)
    assert saved.compress_version == compress.__version__ and saved.inputs_in_memory == []
    assert saved.distill == distill and saved.teacher == str(tmp_path / "teacher")
    assert main(["run", str(out / RECIPE_FILE), "--out", str(tmp_path / "again"), "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["prune"]["shape_after"] == first.prune.shape_after
    for stage, value in first.perplexity.items():  # the same run again: the same numbers
        assert second["perplexity"][stage] == pytest.approx(value, rel=1e-5)
    assert second["samples"] == first.samples
    assert Recipe.load(tmp_path / "again" / RECIPE_FILE) == saved.replace(out_dir=str(tmp_path / "again"))
    # An existing, non-empty folder is refused as with flags.
    assert main(["run", str(out / RECIPE_FILE), "--out", str(tmp_path / "again")]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read recipe" in capsys.readouterr().err


def test_samples_importance_file_and_report_rebuild(tmp_path, tokenizer, capsys):
    out, result = _tiny_run(tmp_path, tokenizer)
    # The teacher's sample, against transformers' own greedy generation on a fresh load of the teacher folder.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "teacher")
    ids = tok("The quick", return_tensors="pt").input_ids
    reference = model.generate(ids, max_new_tokens=Recipe.sample_tokens, do_sample=False,
                               pad_token_id=tok.eos_token_id)
    assert result.samples["prompt"] == "The quick"
    assert result.samples["teacher"] == tok.decode(reference[0, ids.shape[1]:], skip_special_tokens=True)
    assert set(result.samples) == {"prompt", "teacher", "pruned"}
    # The keep masks agree with the saved student's own config, layer by layer.
    tensors = load_file(out / "report" / "importance.safetensors")
    student = AutoConfig.from_pretrained(out)
    teacher = AutoConfig.from_pretrained(tmp_path / "teacher")
    assert tensors["mlp"].shape == (teacher.num_hidden_layers, teacher.intermediate_size)
    assert torch.equal(tensors["kept.mlp"].sum(1), torch.full((teacher.num_hidden_layers,), student.intermediate_size))
    if "kept.heads" in tensors:
        assert (tensors["kept.heads"].sum(1) == student.num_attention_heads).all()
    # `compress report` rebuilds the page from the folder alone.
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").is_file() and "report.html" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nowhere")]) == 1


def test_slow_calibration_is_announced_up_front_with_an_estimate(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(pipeline, "SLOW_CALIBRATION_S", 0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _tiny_run(tmp_path, tokenizer)
    said = [w for w in caught if "calibration reads 8 windows x 32 tokens" in str(w.message)]
    assert said and "minutes" in str(said[0].message)
    # The run already reads the fewest windows allowed (8 = min_samples): no suggestion of more windows ...
    assert "fewest windows allowed" in str(said[0].message) and "num_samples=" not in str(said[0].message)
    # ... and points at the caller's line (here: _tiny_run's call of compress.compress), not at library code.
    assert said[0].filename == __file__


def test_slow_calibration_suggests_fewer_windows_than_the_run_reads_in_the_interfaces_spelling():
    config = compress.CalibrationConfig(num_samples=128)  # 128 windows, as the README's example; min_samples 8
    spellings = {"python": "CalibrationConfig(num_samples=32)", "cli": "--samples 32",
                 "recipe": "calibration: {num_samples: 32}"}
    for name, spelling in spellings.items():
        with warnings.catch_warnings(record=True) as caught, interface(name):
            warnings.simplefilter("always")
            pipeline._warn_if_slow(config, eval_seconds=10.0, eval_tokens=100, device="cpu")
        (said,) = [str(w.message) for w in caught]
        assert spelling in said and "128)" not in said, (name, said)


def test_flags_print_the_recipe_they_make(capsys):
    assert main(["some/teacher", "--params", "0.4", "--samples", "64", "--distill-tokens", "10000",
                 "--print-recipe"]) == 0
    recipe = Recipe.from_yaml(capsys.readouterr().out)
    assert recipe.teacher == "some/teacher" and recipe.target == {"params": 0.4}
    assert recipe.calibration.num_samples == 64 and recipe.distill.max_tokens == 10000


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_recipes_load(path):
    recipe = Recipe.load(path)
    assert recipe.teacher and not recipe.inputs_in_memory
    assert isinstance(recipe.data, DataSettings) and isinstance(recipe.export, ExportSettings)


def test_there_are_example_recipes():
    assert {"width-50.yaml", "depth-50.yaml", "width-distill-int8.yaml", "demo.yaml"} <= \
        {p.name for p in EXAMPLES.glob("*.yaml")}


def test_a_run_from_objects_saves_a_recipe_that_names_them_and_is_not_replayed(tmp_path, tokenizer, capsys):
    out = tmp_path / "o"
    compress.compress((tiny_model("llama"), tokenizer), {"params": 0.5}, [SAMPLE_TEXT * 2], out,
                      eval_data=[SAMPLE_TEXT[:3000]], eval_seq_len=32, eval_tokens=256, formats=["safetensors"],
                      calibration=compress.CalibrationConfig(seq_len=32, num_samples=8), prompt=None)
    saved = yaml.safe_load((out / RECIPE_FILE).read_text())
    assert saved["teacher"] is None and saved["inputs_in_memory"] == ["teacher", "data.calibration", "data.evaluation"]
    assert main(["run", str(out / RECIPE_FILE), "--out", str(tmp_path / "again")]) == 2
    assert "teacher, data.calibration, data.evaluation were Python objects" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


def test_importance_file_masks_follow_the_kept_layers():
    from compress.report import PruneReport

    shape = {"hidden_size": 4, "intermediate_size": 3, "num_attention_heads": 2, "num_hidden_layers": 3}
    scores = compress.Importance(mlp=torch.rand(3, 3), heads=torch.rand(3, 2), layers=torch.rand(3), method="x")
    report = PruneReport(strategy="width+depth", importance="x", target={}, plan_reason="", shape_before=shape,
                         shape_after=shape, params_before=1, params_after=1, scores=scores,
                         kept={"mlp": [[0, 2], [1, 2], [0, 1]], "heads": [[1], [0], [0]], "layers": [0, 2]})
    tensors = load_file_bytes(api.importance_file(report))
    assert tensors["kept.mlp"].tolist() == [[1, 0, 1], [0, 0, 0], [1, 1, 0]]  # layer 1 was removed whole
    assert tensors["kept.heads"].tolist() == [[0, 1], [0, 0], [1, 0]]
    assert tensors["kept.layers"].tolist() == [1, 0, 1]
    assert torch.equal(tensors["mlp"], scores.mlp) and "hidden" not in tensors


def load_file_bytes(data: bytes) -> dict:
    from safetensors.torch import load

    return load(data)


def test_the_command_line_shows_the_estimate_as_one_line(tmp_path, tokenizer, capsys, monkeypatch):
    from conftest import cli_run_args

    monkeypatch.setattr(pipeline, "SLOW_CALIBRATION_S", 0.0)
    assert main(cli_run_args(tmp_path, tokenizer) + ["--formats", "safetensors"]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if "calibration reads" in x]
    assert len(lines) == 1 and lines[0].startswith("compress: warning: calibration reads 8 windows x 32 tokens")


def test_targets_as_numbers_and_target_objects_still_work(monkeypatch):
    seen = []
    monkeypatch.setattr(api, "run_recipe", lambda recipe, objects=None, overwrite=False: seen.append((recipe, objects)))
    compress.compress("smollm2", 0.5)
    compress.compress("smollm2", compress.Target(params=70_000_000))
    compress.compress("smollm2", compress.Target.parse({"hidden_size": 448}, 10**9))
    assert [r.target for r, _ in seen] == [{"params": 0.5}, {"params": 70_000_000}, {"hidden_size": 448}]
    assert seen[1][1].target == compress.Target(params=70_000_000)  # the object itself is what prunes


def test_numpy_values_are_written_as_plain_numbers():
    import numpy as np

    weights = {"mlp": np.float64(1.0), "hidden": 32.0, "heads": 2.0, "depth": 8.0}
    recipe = Recipe(target={"params": np.float64(0.5)}, plan={"weights": weights})
    plain = yaml.safe_load(recipe.to_yaml())
    assert plain["target"] == {"params": 0.5} and plain["plan"]["weights"]["mlp"] == 1.0


def test_saved_recipe_spells_out_paths_and_plugin_configs_and_checkpoints_are_checked_first(
    tmp_path, tokenizer, monkeypatch, capsys
):
    teacher = tmp_path / "teacher"
    tiny_model("llama").save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    (tmp_path / "train.txt").write_text(SAMPLE_TEXT * 3)
    (tmp_path / "valid.txt").write_text(SAMPLE_TEXT[:3000])
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    compress.compress("teacher", {"params": 0.5}, "train.txt", "out", eval_data="valid.txt", eval_seq_len=32,
                      eval_tokens=256, formats=["safetensors"], plugins={"magnitude": None}, prompt=None,
                      calibration=compress.CalibrationConfig(seq_len=32, num_samples=8))
    saved = yaml.safe_load((tmp_path / "out" / RECIPE_FILE).read_text())
    assert saved["teacher"] == str(teacher.resolve())
    assert saved["data"]["calibration"] == str((tmp_path / "train.txt").resolve())
    assert saved["data"]["evaluation"] == str((tmp_path / "valid.txt").resolve())
    assert saved["plugins"] == {"magnitude": {"p": 2.0}}  # MagnitudeImportance.Config's default, written out
    assert saved["device"] == "cpu"
    # Replayed from another folder, it finds the same files.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["run", str(tmp_path / "out" / RECIPE_FILE), "--out", "again", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["evaluation"] == str((tmp_path / "valid.txt").resolve())
    # A distillation folder an earlier run filled is refused before the teacher is even loaded.
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "metrics.jsonl").write_text('{"step": 1}\n')
    loads = []
    monkeypatch.setattr(api, "load_teacher", lambda *a, **k: loads.append(1))
    recipe = Recipe.load(tmp_path / "out" / RECIPE_FILE).replace(
        out_dir=str(tmp_path / "third"), distill=compress.DistillConfig(max_steps=1, output_dir=str(ckpt)))
    with pytest.raises(compress.OutputExistsError, match="metrics.jsonl"):
        compress.compress(recipe)
    assert not loads and not (tmp_path / "third").exists()
