"""Bad inputs around output folders, export, loading and the command line: each is refused with a clear
CompressError that names it, and nothing on disk or in the caller's objects is lost or changed."""

import errno
import hashlib
import importlib
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import compress
import compress.api
import compress.pipeline
import compress.io
from compress.cli import main
from compress.errors import CheckpointError, ConfigError, DataError, OutputExistsError
from compress.exporters import ExportError

from conftest import SAMPLE_TEXT, cli_run_args, tiny_config, tiny_model

CAL = compress.CalibrationConfig(seq_len=32, num_samples=8, min_samples=4)


# ---------------------------------------------------------------------------------------------- helpers
def tree(root) -> dict:
    """Everything under ``root`` (recursively): links with their targets, folders, files with size, mtime and
    a hash of their contents."""
    root = Path(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):  # does not follow links to folders
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                st = p.stat()
                out[rel] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def no_strays(folder) -> bool:
    """No temporary, old or probe folder of the atomic writer left anywhere under ``folder``."""
    return not [p for p in Path(folder).rglob(".*") if any(k in p.name for k in (".tmp-", ".old-", "-probe-"))]


def model_state(model) -> dict:
    return {
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "dtype": {k: v.dtype for k, v in model.state_dict().items()},
        "device": {k: v.device for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "param_ids": [id(p) for p in model.parameters()],
    }


def assert_model_unchanged(model, before) -> None:
    after = model_state(model)
    for key in ("dtype", "device", "requires_grad", "training", "param_ids"):
        assert after[key] == before[key], key
    assert after["weights"].keys() == before["weights"].keys()
    assert all(torch.equal(after["weights"][k], before["weights"][k]) for k in before["weights"])


def bf16_training_model():
    """A bf16 model as from_pretrained(dtype=bfloat16) gives it (fp32 rotary buffers), in train mode, with some
    parameters frozen."""
    model = tiny_model("llama")
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    model.train()
    model.model.embed_tokens.weight.requires_grad_(False)
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(False)
    return model


def save_teacher(folder, tokenizer=None):
    tiny_model("llama").save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def existing_output(tmp_path, name="run"):
    out = tmp_path / name
    out.mkdir()
    (out / "notes.txt").write_text("my notes, not written by compress")
    return out


# ---------------------------------------------------------------------- output folders that hold the inputs
@pytest.mark.parametrize("which", ["data", "eval_data", "distill_data"])
def test_output_folder_holding_an_input_is_refused_even_with_overwrite(which, tmp_path, tokenizer):
    out = existing_output(tmp_path)
    inside = out / f"{which}.txt"
    inside.write_text(SAMPLE_TEXT)
    outside = tmp_path / "other.txt"
    outside.write_text(SAMPLE_TEXT[:3000])
    kwargs = {"data": outside, "eval_data": tmp_path / "valid.txt", which: inside}
    (tmp_path / "valid.txt").write_text(SAMPLE_TEXT[:2000])
    model = tiny_model("llama")
    before, disk = model_state(model), tree(tmp_path)
    what = {"data": "calibration data", "eval_data": "evaluation data", "distill_data": "distillation data"}[which]
    with pytest.raises(OutputExistsError, match=rf"holds this run's {what} \('{inside}'\).*even with overwrite=True"):
        compress.compress((model, tokenizer), {"params": 0.5}, kwargs.pop("data"), out, overwrite=True,
                          calibration=CAL, **kwargs)
    assert tree(tmp_path) == disk
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("where", ["inside", "same"])
def test_output_folder_holding_the_teacher_is_refused(where, tmp_path, tokenizer):
    out = tmp_path / "run"
    teacher = save_teacher(out / "teacher" if where == "inside" else out, tokenizer)
    disk = tree(tmp_path)
    with pytest.raises(OutputExistsError, match=rf"holds this run's teacher \('{teacher}'\)"):
        compress.compress(teacher, {"params": 0.5}, [SAMPLE_TEXT], out, eval_data=[SAMPLE_TEXT[:2000]],
                          overwrite=True, calibration=CAL)
    assert tree(tmp_path) == disk


def test_export_into_the_folder_of_its_eval_data_is_refused(tmp_path, tokenizer):
    out = existing_output(tmp_path)
    (out / "valid.txt").write_text(SAMPLE_TEXT)
    model = tiny_model("llama")
    before, disk = model_state(model), tree(tmp_path)
    with pytest.raises(OutputExistsError, match=rf"evaluation data \('{out / 'valid.txt'}'\)"):
        compress.export(model, tokenizer, out, formats=["safetensors"], eval_data=out / "valid.txt", overwrite=True)
    assert tree(tmp_path) == disk
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("where", ["inside", "same"])
def test_distill_checkpoints_inside_output_folder_refused_before_any_work(where, tmp_path, tokenizer, monkeypatch):
    out = tmp_path / "student"
    ckpt = out / "kd" if where == "inside" else out
    cfg = compress.DistillConfig(max_steps=2, seq_len=32, output_dir=str(ckpt), checkpoint_every=1, progress=False)
    monkeypatch.setattr(compress.pipeline, "perplexity", lambda *a, **k: pytest.fail("work started"))
    model = tiny_model("llama")
    before = model_state(model)
    with pytest.raises(ConfigError, match=rf"DistillConfig.output_dir '{ckpt}' lies inside the output folder"):
        compress.compress((model, tokenizer), {"params": 0.5}, [SAMPLE_TEXT], out, eval_data=[SAMPLE_TEXT[:2000]],
                          distill=cfg, calibration=CAL)
    assert list(tmp_path.iterdir()) == []
    assert_model_unchanged(model, before)


# ---------------------------------------------------------------------------------- odd output folders
def test_non_empty_folder_message_states_the_overwrite_rule(tmp_path, tokenizer):
    out = existing_output(tmp_path)
    disk = tree(tmp_path)
    with pytest.raises(OutputExistsError, match=rf"'{out}' exists and is not empty.*overwrite=True replaces the "
                                                "whole folder, including files compress did not write"):
        compress.save_student(tiny_model("llama"), tokenizer, out)
    assert tree(tmp_path) == disk


def test_symlinked_output_folder_stays_a_link(tmp_path, tokenizer):
    target = existing_output(tmp_path, "real")
    link = tmp_path / "latest"
    link.symlink_to(target, target_is_directory=True)
    disk = tree(tmp_path)
    with pytest.raises(OutputExistsError, match=rf"'{link}' \(a link to '{target}'\) exists and is not empty"):
        compress.save_student(tiny_model("llama"), tokenizer, link)
    assert tree(tmp_path) == disk

    compress.save_student(tiny_model("llama"), tokenizer, link, overwrite=True)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert (target / "config.json").is_file() and not (target / "notes.txt").exists()
    AutoModelForCausalLM.from_pretrained(link)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "real"] and no_strays(tmp_path)


def test_dangling_symlink_output_is_refused(tmp_path, tokenizer):
    link = tmp_path / "latest"
    link.symlink_to(tmp_path / "gone", target_is_directory=True)
    disk = tree(tmp_path)
    gone = tmp_path / "gone"
    with pytest.raises(ConfigError, match=rf"'{link}' is a symbolic link to '{gone}', which does not exist"):
        compress.save_student(tiny_model("llama"), tokenizer, link)
    assert tree(tmp_path) == disk


def test_current_folder_as_output_is_written_in_place(tmp_path, tokenizer, monkeypatch):
    work = existing_output(tmp_path, "work")
    monkeypatch.chdir(work)
    disk = tree(tmp_path)
    with pytest.raises(OutputExistsError, match=r"'\.' exists and is not empty.*including files compress did not"):
        compress.save_student(tiny_model("llama"), tokenizer, ".")
    assert tree(tmp_path) == disk

    inode = work.stat().st_ino
    compress.save_student(tiny_model("llama"), tokenizer, ".", overwrite=True)
    assert Path.cwd() == work and work.stat().st_ino == inode  # the same folder, not a renamed one
    assert (work / "config.json").is_file() and not (work / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"] and no_strays(tmp_path)


def test_failure_while_writing_in_place_restores_the_folder(tmp_path, tokenizer, monkeypatch):
    work = existing_output(tmp_path, "work")
    monkeypatch.chdir(work)
    disk = tree(tmp_path)
    monkeypatch.setattr(compress.io.shutil, "move", _fail_after(1, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        compress.save_student(tiny_model("llama"), tokenizer, ".", overwrite=True)
    assert tree(tmp_path) == disk and no_strays(tmp_path)


@pytest.mark.parametrize("phase", ["moving aside", "moving in"])
def test_failure_in_place_with_many_entries_loses_none_of_them(tmp_path, tokenizer, monkeypatch, phase):
    """An entry that cannot be moved aside (a mount point inside, a busy file) or a failure while the new files
    come in: only what the call moved is undone; every user entry, moved or not, is there as before."""
    work = existing_output(tmp_path, "work")
    for name in "abcdefgh":
        (work / f"{name}.txt").write_text(name * 100)
    (work / "sub").mkdir()
    (work / "sub" / "inner.txt").write_text("inside")
    monkeypatch.chdir(work)
    disk = tree(tmp_path)
    if phase == "moving aside":
        real_rename = os.rename

        def rename(src, dst, *a, **k):
            if Path(src).name == "e.txt" and ".compress.old-" in str(dst):
                raise OSError(errno.EBUSY, "Device or resource busy", str(src))
            return real_rename(src, dst, *a, **k)
        monkeypatch.setattr(compress.io.os, "rename", rename)
        expected = OSError
    else:
        monkeypatch.setattr(compress.io.shutil, "move", _fail_after(2, OSError(errno.ENOSPC, "No space left")))
        expected = OSError
    with pytest.raises(expected):
        compress.save_student(tiny_model("llama"), tokenizer, ".", overwrite=True)
    monkeypatch.undo()
    assert tree(tmp_path) == disk and no_strays(tmp_path)


def test_failed_write_removes_the_parent_folders_it_created(tmp_path, tokenizer, monkeypatch):
    model = tiny_model("llama")
    before = model_state(model)

    def broken(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(model, "save_pretrained", broken)
    with pytest.raises(OSError, match="No space left"):
        compress.save_student(model, tokenizer, tmp_path / "runs" / "new" / "student")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert_model_unchanged(model, before)


def test_compress_into_a_symlinked_current_folder_end_to_end(tmp_path, tokenizer, monkeypatch):
    """The whole pipeline (export and the report written after it) into '.' reached through a link."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    monkeypatch.chdir(tmp_path / "link")
    result = compress.compress((tiny_model("llama"), tokenizer), {"intermediate_size": 48}, [SAMPLE_TEXT], ".",
                               eval_data=[SAMPLE_TEXT[:2000]], eval_seq_len=32, calibration=CAL)
    assert result.out_dir == Path(".") and (real / compress.api.REPORT_FILE).is_file()
    assert (tmp_path / "link").is_symlink() and (real / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"] and no_strays(tmp_path)


def _fail_after(n, exc):
    import shutil
    real, calls = shutil.move, []

    def move(*args, **kwargs):
        calls.append(args)
        if len(calls) > n:
            raise exc
        return real(*args, **kwargs)
    return move


def test_mount_point_output_is_written_in_place(tmp_path, tokenizer, monkeypatch):
    out = existing_output(tmp_path, "mnt")
    real_ismount = os.path.ismount
    monkeypatch.setattr(compress.io.os.path, "ismount", lambda p: Path(p) == out or real_ismount(p))
    inode = out.stat().st_ino
    compress.save_student(tiny_model("llama"), tokenizer, out, overwrite=True)
    assert out.stat().st_ino == inode and (out / "model.safetensors").is_file() and not (out / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnt"] and no_strays(tmp_path)


def test_folder_that_cannot_be_renamed_falls_back_to_moving_files(tmp_path, tokenizer, monkeypatch):
    out = existing_output(tmp_path, "busy")
    real_rename = Path.rename

    def rename(self, target):
        if self == out:
            raise OSError(errno.EBUSY, "Device or resource busy", str(self))
        return real_rename(self, target)
    monkeypatch.setattr(Path, "rename", rename)
    compress.save_student(tiny_model("llama"), tokenizer, out, overwrite=True)
    assert (out / "config.json").is_file() and not (out / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"] and no_strays(tmp_path)


@pytest.mark.parametrize("out_dir, error, match", [
    ("", ConfigError, r"out_dir should be a folder path, got ''"),
    ("   ", ConfigError, r"out_dir should be a folder path, got '   '"),
    ("/", ConfigError, r"'/' is the root of the file system"),
])
def test_empty_or_root_output_path(out_dir, error, match, tmp_path, tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=match):
        compress.save_student(tiny_model("llama"), tokenizer, out_dir, overwrite=True)
    assert list(tmp_path.iterdir()) == []


def test_output_under_a_file_is_refused(tmp_path, tokenizer):
    (tmp_path / "train.txt").write_text(SAMPLE_TEXT)
    out = tmp_path / "train.txt" / "student"
    disk = tree(tmp_path)
    file = tmp_path / "train.txt"
    with pytest.raises(ConfigError, match=rf"cannot create output folder '{out}': '{file}' is a file"):
        compress.compress((tiny_model("llama"), tokenizer), {"params": 0.5}, [SAMPLE_TEXT], out,
                          eval_data=[SAMPLE_TEXT[:2000]], calibration=CAL)
    assert tree(tmp_path) == disk


def test_output_in_unwritable_place_is_refused_before_any_work(tmp_path, tokenizer, monkeypatch):
    if os.geteuid() == 0:  # root writes through permission bits: use a file system that refuses everyone
        parent = Path("/sys")
        try:
            os.rmdir(__import__("tempfile").mkdtemp(dir=parent))
            pytest.skip("no unwritable folder available to root here")
        except OSError:
            pass
    else:
        parent = tmp_path / "locked"
        parent.mkdir()
        parent.chmod(0o500)
    out = parent / "compress-test-student"
    monkeypatch.setattr(compress.pipeline, "perplexity", lambda *a, **k: pytest.fail("work started"))
    model = tiny_model("llama")
    before = model_state(model)
    try:
        with pytest.raises(ConfigError, match=rf"cannot create output folder '{out}': '{parent}' is not writable"):
            compress.compress((model, tokenizer), {"params": 0.5}, [SAMPLE_TEXT], out,
                              eval_data=[SAMPLE_TEXT[:2000]], calibration=CAL)
    finally:
        if parent != Path("/sys"):
            parent.chmod(0o700)
    assert not out.exists()
    assert_model_unchanged(model, before)


# --------------------------------------------------------------------------- export and caller state
def test_export_leaves_callers_bf16_training_model_unchanged(tmp_path, tokenizer):
    model = bf16_training_model()
    before = model_state(model)
    report = compress.export(model, tokenizer, tmp_path / "e", formats="safetensors")  # one name as a string
    assert report.formats == ["safetensors"] and (tmp_path / "e" / "model.safetensors").is_file()
    assert_model_unchanged(model, before)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "e")
    assert reloaded.dtype == torch.float32
    assert torch.equal(reloaded.model.norm.weight, model.model.norm.weight.float())


def test_failed_parity_leaves_callers_model_and_disk_unchanged(tmp_path, tokenizer):
    model = bf16_training_model()
    before = model_state(model)
    with pytest.raises(ExportError, match=r"differ from PyTorch.*tolerance 1e-12"):
        compress.export(model, tokenizer, tmp_path / "e", formats=["onnx-genai"], parity_tolerance=1e-12)
    assert list(tmp_path.iterdir()) == []
    assert_model_unchanged(model, before)


def test_onnx_refusal_leaves_callers_model_unchanged(tmp_path, tokenizer, monkeypatch):
    ox = importlib.import_module("compress.exporters.onnx")

    def refuse(model):
        raise ExportError(f"no ONNX support for {model.config.model_type!r}")
    monkeypatch.setattr(ox, "check_onnx_support", refuse)
    model = bf16_training_model()
    before = model_state(model)
    with pytest.raises(ExportError, match="no ONNX support for 'llama'"):
        compress.export(model, tokenizer, tmp_path / "e", formats=["safetensors", "onnx"])
    assert list(tmp_path.iterdir()) == []
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("formats, match", [
    ("onnx,safetensors", r"unknown export format 'onnx,safetensors'; for several formats pass a list: "
                         r"formats=\['onnx', 'safetensors'\]"),
    (["safetensors", "safetensors"], r"\['safetensors'\] given more than once"),
    (None, r"formats should be a list of format names .* got None"),
    (5, r"got 5"),
    ([], r"unknown export format\(s\) \[\]"),
])
def test_bad_formats_are_refused(formats, match, tmp_path, tokenizer):
    model = bf16_training_model()
    before = model_state(model)
    with pytest.raises(ConfigError, match=match):
        compress.export(model, tokenizer, tmp_path / "e", formats=formats)
    if formats is not None:  # compress(formats=None) takes the recipe's default, "auto"
        with pytest.raises(ConfigError, match=match):
            compress.compress((model, tokenizer), {"params": 0.5}, [SAMPLE_TEXT], tmp_path / "c", formats=formats)
    assert list(tmp_path.iterdir()) == []
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"parity_tolerance": -1}, ConfigError, r"parity_tolerance should be a finite number >= 0 .* got -1"),
    ({"parity_tolerance": float("nan")}, ConfigError, r"parity_tolerance .* got nan"),
    ({"eval_tokens": 0}, ConfigError, r"eval_tokens should be a positive integer, got 0"),
    ({"tokenizer": None}, DataError, r"tokenizer .* got NoneType"),
])
def test_bad_export_arguments(kwargs, error, match, tmp_path, tokenizer):
    model = bf16_training_model()
    before = model_state(model)
    args = {"tokenizer": tokenizer, **kwargs}
    with pytest.raises(error, match=match):
        compress.export(model, args.pop("tokenizer"), tmp_path / "e", formats=["safetensors"], **args)
    assert list(tmp_path.iterdir()) == []
    assert_model_unchanged(model, before)


def test_meta_device_model_is_refused(tmp_path, tokenizer):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    with pytest.raises(ConfigError, match=r"LlamaForCausalLM has \d+ parameter\(s\)/buffer\(s\) on the meta device"):
        compress.export(model, tokenizer, tmp_path / "e", formats=["safetensors"])
    with pytest.raises(ConfigError, match=r"on the meta device"):
        compress.compress((model, tokenizer), {"params": 0.5}, [SAMPLE_TEXT], tmp_path / "c")
    with pytest.raises(ConfigError, match=r"on the meta device"):
        compress.save_student(model, tokenizer, tmp_path / "s")
    assert list(tmp_path.iterdir()) == []
    assert all(p.is_meta for p in model.parameters())


# ------------------------------------------------------------------------------- loading and devices
@pytest.mark.parametrize("source, match", [
    ("", r"the teacher source is empty \(''\)"),
    ("   ", r"the teacher source is empty \('   '\)"),
    (None, r"got NoneType None"),
    (3, r"got int 3"),
])
def test_empty_or_wrong_type_teacher_source(source, match, tmp_path, tokenizer, monkeypatch):
    save_teacher(tmp_path, tokenizer)  # the current folder holds a model: "" must not load it
    monkeypatch.chdir(tmp_path)
    disk = tree(tmp_path)
    with pytest.raises(ConfigError, match=match):
        compress.load_teacher(source)
    with pytest.raises(ConfigError, match=match):
        compress.compress(source, {"params": 0.5}, [SAMPLE_TEXT], tmp_path / "out")
    assert tree(tmp_path) == disk


def test_model_folder_without_tokenizer_is_refused_before_loading_weights(tmp_path, monkeypatch):
    folder = save_teacher(tmp_path / "teacher")
    disk = tree(tmp_path)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(CheckpointError, match=rf"model folder '{folder}' has no tokenizer.*tokenizer.save_pretrained"):
        compress.load_teacher(folder)
    assert tree(tmp_path) == disk


@pytest.mark.parametrize("dtype", ["float17", 3, torch.int8, "int8"])
def test_bad_dtype_is_refused(dtype, tmp_path, tokenizer, monkeypatch):
    folder = save_teacher(tmp_path / "teacher", tokenizer)
    disk = tree(tmp_path)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ConfigError, match=rf"dtype {dtype!r} is not a floating-point dtype.*torch.bfloat16"):
        compress.load_teacher(folder, dtype=dtype)
    assert tree(tmp_path) == disk


def test_dtype_names_are_accepted(tmp_path, tokenizer):
    folder = save_teacher(tmp_path / "teacher", tokenizer)
    model, _ = compress.load_teacher(folder, dtype="bf16")
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("device, match", [
    ("gpu", r"device 'gpu' is not a device torch knows"),
    ("cuda:9", r"device 'cuda:9': this machine has (no cuda device|\d+ cuda device)"),
    ("meta", r"device 'meta' holds no weights"),
    (1.5, r"device should be a string .* got 1.5"),
])
def test_bad_device_is_refused_before_any_work(device, match, tmp_path, tokenizer, monkeypatch):
    folder = save_teacher(tmp_path / "teacher", tokenizer)
    disk = tree(tmp_path)
    monkeypatch.setattr(compress.pipeline, "perplexity", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ConfigError, match=match):
        compress.load_teacher(folder, device=device)
    model = tiny_model("llama")
    before = model_state(model)
    with pytest.raises(ConfigError, match=match):
        compress.compress((model, tokenizer), {"params": 0.5}, [SAMPLE_TEXT], tmp_path / "out", device=device)
    assert tree(tmp_path) == disk
    assert_model_unchanged(model, before)


def test_teacher_tuple_of_wrong_shape(tmp_path, tokenizer):
    model = tiny_model("llama")
    before = model_state(model)
    with pytest.raises(ConfigError, match=r"should be \(model, tokenizer\), got a tuple of 3: "
                                          r"\(LlamaForCausalLM, \w+, int\)"):
        compress.compress((model, tokenizer, 1), {"params": 0.5}, [SAMPLE_TEXT], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    assert_model_unchanged(model, before)


# ------------------------------------------------------------------------------------ command line
@pytest.fixture
def cli_setup(tmp_path, tokenizer):
    args = cli_run_args(tmp_path, tokenizer) + ["--formats", "safetensors"]
    return tmp_path, args


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("compress: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("extra, code, match", [
    (["--params", "abc"], 2, "argument --params: invalid float value: 'abc'"),
    (["--bogus"], 2, "unrecognized arguments: --bogus"),
    (["--strategy", "sideways"], 2, "invalid choice: 'sideways'"),
    (["--shape", "hidden_size=big"], 2, "'hidden_size=big'"),
    (["--params", "1.0"], 2, "not smaller than the teacher"),
    (["--samples", "0"], 2, "num_samples"),
    (["--formats", "safetensors,tflite"], 2, "unknown export format(s) ['tflite']"),
    (["--data", "/no/such/train.txt"], 1, "'/no/such/train.txt' does not exist"),
])
def test_cli_errors_are_one_line_without_traceback(extra, code, match, cli_setup, capsys):
    tmp_path, args = cli_setup
    disk = tree(tmp_path)
    assert main(args + extra) == code
    assert match in _one_error_line(capsys.readouterr().err)
    assert tree(tmp_path) == disk


def test_cli_refused_teacher_exits_1_and_bad_teacher_string_exits_2(cli_setup, capsys):
    tmp_path, args = cli_setup
    disk = tree(tmp_path)
    (tmp_path / "teacher" / "tokenizer.json").rename(tmp_path / "tokenizer.json.bak")
    (tmp_path / "teacher" / "tokenizer_config.json").rename(tmp_path / "tokenizer_config.json.bak")
    assert main(args) == 1
    assert f"model folder '{tmp_path / 'teacher'}' has no tokenizer" in _one_error_line(capsys.readouterr().err)
    (tmp_path / "tokenizer.json.bak").rename(tmp_path / "teacher" / "tokenizer.json")
    (tmp_path / "tokenizer_config.json.bak").rename(tmp_path / "teacher" / "tokenizer_config.json")
    assert main([""] + args[1:]) == 2
    assert "the teacher source is empty ('')" in _one_error_line(capsys.readouterr().err)
    assert {k: v[:2] for k, v in tree(tmp_path).items()} == {k: v[:2] for k, v in disk.items()}


def test_cli_ctrl_c_exits_130_and_leaves_no_output(cli_setup, capsys, monkeypatch):
    tmp_path, args = cli_setup

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(compress.pipeline, "run_prune", interrupted)
    disk = tree(tmp_path)
    assert main(args) == 130
    err = capsys.readouterr().err
    assert err.strip() == (f"compress: interrupted (Ctrl-C); the output folder {str(tmp_path / 's')!r} was left "
                           "as it was (nothing half-written)")
    assert tree(tmp_path) == disk and no_strays(tmp_path)

    # Interrupted while the student is being written over an existing folder: that folder is kept as it was.
    out = existing_output(tmp_path, "s")
    disk = tree(tmp_path)
    monkeypatch.undo()

    def card(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(importlib.import_module("compress.exporters"), "model_card", card)
    assert main(args + ["--overwrite"]) == 130
    assert "nothing half-written" in capsys.readouterr().err
    assert tree(tmp_path) == disk and no_strays(tmp_path) and (out / "notes.txt").exists()


def test_compress_moves_a_passed_in_model_back_when_a_later_stage_fails(tmp_path, tokenizer, monkeypatch):
    """compress() puts the model on the run's device; a failure afterwards (here in pruning) sends it back to its
    own device. (On this CPU-only machine both are the CPU: the test checks that the move back is made, by
    recording the model's .to() calls.) A target the checks can refuse up front is refused before any move."""
    model = tiny_model("llama")
    before = model_state(model)
    moves = []
    real_to = model.to

    def to(*args, **kwargs):
        moves.append(torch.device(args[0]) if args else kwargs.get("device"))
        return real_to(*args, **kwargs)
    monkeypatch.setattr(model, "to", to)
    monkeypatch.setattr(compress.pipeline, "perplexity", lambda *a, **k: 1.0)
    with pytest.raises(compress.TargetError, match=r"num_attention_heads=5|num_attention_heads \(5\)"):  # refused by the checks: no move
        compress.compress((model, tokenizer), {"num_attention_heads": 5}, [SAMPLE_TEXT], tmp_path / "out",
                          eval_data=[SAMPLE_TEXT[:500]])
    assert moves == []

    def fails(*args, **kwargs):
        raise compress.TargetError("pruning failed late")
    monkeypatch.setattr(compress.pipeline, "run_prune", fails)
    with pytest.raises(compress.TargetError, match="pruning failed late"):
        compress.compress((model, tokenizer), {"params": 0.5}, [SAMPLE_TEXT], tmp_path / "out",
                          eval_data=[SAMPLE_TEXT[:500]])
    assert moves == [torch.device("cpu"), torch.device("cpu")]  # to the run's device, then back home
    monkeypatch.undo()
    assert_model_unchanged(model, before)
    assert not (tmp_path / "out").exists()


def test_an_unreachable_target_is_refused_from_the_teachers_config_before_any_weight_is_read(
        tmp_path, tokenizer, monkeypatch, capsys):
    args = cli_run_args(tmp_path, tokenizer)
    monkeypatch.setattr(compress.pipeline, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights were read"))
    for target in ({"params": 2}, {"hidden_size": 10**6}, {"num_attention_heads": 5}):
        with pytest.raises(compress.TargetError):
            compress.compress(args[0], target, tmp_path / "train.txt", tmp_path / "out", eval_data=tmp_path / "valid.txt")
    # The command line: exit code 2, one line that says so, and the output folder never created.
    assert main(args[:1] + ["--params", "2"] + args[3:]) == 2
    err = capsys.readouterr().err
    assert err.startswith("compress: error: ") and "2" in err and len(err.strip().splitlines()) == 1
    assert "--strategy width+depth" in err and "strategy=" not in err  # the flag, in the command line's spelling
    assert not (tmp_path / "out").exists() and not (tmp_path / "s").exists()


def test_the_command_line_names_its_own_flags_in_errors(tmp_path, tokenizer, capsys):
    args = cli_run_args(tmp_path, tokenizer)
    out = Path(args[args.index("--out") + 1])
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(args + ["--formats", "safetensors"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" not in err
    with pytest.raises(compress.OutputExistsError, match=r"overwrite=True"):  # Python callers get the keyword
        compress.compress(args[0], {"params": 0.5}, tmp_path / "train.txt", out, eval_data=tmp_path / "valid.txt")
    assert (out / "keep.txt").read_text() == "mine"
