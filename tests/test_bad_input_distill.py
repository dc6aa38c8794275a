"""Bad input to distillation, as a new user would give it: every refusal names the input and loses nothing.

Each case checks three things: the error type, that the message names the bad input (field and value, path,
ids), and that nothing was lost or changed — the output folder's files (names, sizes, hashes) and both models
(state dicts, dtypes, devices, train/eval modes, ``requires_grad`` flags, gradients, hooks) before and after.
The models come in with a non-default state (student in train mode with a frozen embedding and a gradient,
teacher in train mode with a frozen norm) so that "put back as it was" is not "put back as the defaults".
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from compress.distillation import DistillConfig, DistillError, distill
from compress.errors import CheckpointError, CompressError, ConfigError, DataError, OutputExistsError

from conftest import VOCAB, tiny_model

BASE = dict(max_steps=2, batch_size=2, seq_len=16, progress=False, log_every=1)


def _ids(n: int = 8, width: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB, (n, width), generator=torch.Generator().manual_seed(seed))


def _pair(**overrides):
    """Teacher and student (same family, another seed), in a state the run must give back exactly."""
    teacher = tiny_model("llama", **overrides)
    student = tiny_model("llama", seed=1, **overrides)
    student.train()
    student.model.embed_tokens.weight.requires_grad_(False)
    student.model.norm.weight.grad = torch.full_like(student.model.norm.weight, 0.5)
    teacher.train()
    teacher.model.norm.weight.requires_grad_(False)
    return teacher, student


def _model_state(model: torch.nn.Module) -> dict:
    return {
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "dtypes": {n: p.dtype for n, p in model.named_parameters()},
        "devices": {n: p.device for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "checkpointing": getattr(model, "is_gradient_checkpointing", False),
    }


def _assert_model_unchanged(model: torch.nn.Module, before: dict, what: str) -> None:
    after = _model_state(model)
    for key in ("dtypes", "devices", "modes", "flags", "hooks", "checkpointing"):
        assert after[key] == before[key], f"the {what}'s {key} changed"
    assert after["weights"].keys() == before["weights"].keys()
    for k, v in before["weights"].items():
        torch.testing.assert_close(after["weights"][k], v, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"the {what}'s {k} changed: {m}")
    for k, g in before["grads"].items():
        if g is None:
            assert after["grads"][k] is None, f"the {what}'s {k} gained a gradient"
        else:
            torch.testing.assert_close(after["grads"][k], g, rtol=0, atol=0)


def _folder(path: Path) -> dict | None:
    """Every file under ``path``: size and content hash (None when the folder does not exist)."""
    if not path.exists():
        return None
    if path.is_file():
        return {"": (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())}
    return {str(p.relative_to(path)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(path.rglob("*")) if p.is_file()}


class Snapshot:
    """Both models and a folder, before a call; :meth:`check` asserts that nothing changed."""

    def __init__(self, teacher, student, folder: Path | None = None):
        self.teacher, self.student, self.folder = teacher, student, folder
        self.t, self.s = _model_state(teacher), _model_state(student)
        self.files = _folder(folder) if folder is not None else None

    def check(self) -> None:
        _assert_model_unchanged(self.student, self.s, "student")
        _assert_model_unchanged(self.teacher, self.t, "teacher")
        if self.folder is not None:
            assert _folder(self.folder) == self.files, f"files under {self.folder} changed"


def _refused(error: type, pattern: str, teacher, student, data, config, folder: Path | None = None, **kwargs):
    """Run distill, expecting ``error`` with a message matching ``pattern``, and nothing changed."""
    snap = Snapshot(teacher, student, folder)
    with pytest.raises(error, match=pattern) as info:
        distill(student, teacher, data, config, **kwargs)
    assert isinstance(info.value, CompressError)
    snap.check()
    return info.value


def _finished_run(folder: Path, **cfg) -> dict:
    """A run with a checkpoint at step 2 in ``folder`` (complete at the default 2 steps; 3 leaves one to go)."""
    teacher, student = _pair()
    config = dict(BASE, output_dir=str(folder), checkpoint_every=2, **cfg)
    distill(student, teacher, _ids(), DistillConfig(**config))
    assert (folder / "checkpoint-00000002" / "state.json").is_file()
    return config


# --- 1. every DistillConfig field, at construction and again when distill() starts ----------------------------

BAD_FIELDS = [
    ("lr", 0.0, "positive finite"), ("lr", float("nan"), "positive finite"), ("lr", True, "positive finite"),
    ("lr", "1e-4", "positive finite"), ("max_grad_norm", 0, "None or a positive"),
    ("max_grad_norm", float("inf"), "None or a positive"), ("top_k", 0, "positive integer"),
    ("top_k", True, "positive integer"), ("top_k", 2.5, "positive integer"), ("seq_len", 1, ">= 2"),
    ("seq_len", True, ">= 2"), ("batch_size", 0, "positive integer"), ("grad_accum", -1, "positive integer"),
    ("max_steps", 0, "positive integer"), ("max_steps", 1.5, "positive integer"),
    ("temperature", 0, "positive finite"), ("temperature", float("inf"), "positive finite"),
    ("jsd_beta", 2, r"\[0, 1\]"), ("alpha_ce", -1, ">= 0"), ("logit_weight", float("nan"), ">= 0"),
    ("weight_decay", -0.1, ">= 0"), ("min_lr_ratio", 1.5, r"\[0, 1\]"), ("warmup_steps", -1, "non-negative"),
    ("chunk_tokens", 0, "positive integer"), ("log_every", 0, "positive integer"),
    ("checkpoint_every", -1, "non-negative"), ("seed", -1, "non-negative"),
    ("teacher_correction_steps", -2, "non-negative"), ("dtype", "fp16", "one of"),
    ("parallel", "deepspeed", "one of"), ("logit_loss", "kl", "one of"), ("hidden_loss", "l1", "one of"),
    ("shard_teacher", "yes", "None, True or False"), ("memory_budget_gib", 0, "positive"),
    ("compile", "yes", "True or False"), ("gradient_checkpointing", 1, "True or False"),
    ("resume", 1, "True or False"), ("tensorboard", None, "True or False"), ("progress", None, "True or False"),
    ("hidden_layers", [], "non-empty list"), ("hidden_layers", [1, 1], "distinct"),
    ("layer_map", {0: -1}, "non-empty dict"), ("output_dir", "", "folder path"), ("extra", [1], "a dict"),
]


@pytest.mark.parametrize("name, value, says", BAD_FIELDS, ids=[f"{n}={v!r}" for n, v, _ in BAD_FIELDS])
def test_every_config_field_is_checked_at_construction_and_when_training_starts(name, value, says, tmp_path):
    extra = {"hidden_loss": "cosine"} if name in ("hidden_layers", "layer_map") else {}
    named = re.escape(f"DistillConfig.{name} should be") + f".*{says}.*got {re.escape(repr(value))}"
    with pytest.raises(ConfigError, match=named):
        DistillConfig(**{**BASE, **extra, name: value})
    # A field changed after construction is caught when training starts, before any work.
    config = DistillConfig(**BASE, **extra, output_dir=str(tmp_path / "run"))
    object.__setattr__(config, name, value)
    teacher, student = _pair()
    _refused(ConfigError, named, teacher, student, _ids(), config, folder=tmp_path)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kwargs, says", [
    (dict(max_steps=2, max_tokens=64), r"two budgets, max_steps=2 and max_tokens=64"),
    (dict(max_steps=None), "needs a budget"),
    (dict(layer_map={0: 1}), r"layer_map=\{0: 1\} only applies to the hidden-state loss.*hidden_loss=None"),
    (dict(hidden_loss="cosine", hidden_layers=[0, 2], layer_map={0: 0, 1: 1}), r"hidden_layers=\[0, 2\].*\[2\]"),
    (dict(logit_weight=0.0), "no objective: logit_weight=0.0, alpha_ce=0.0"),
    (dict(extra={"callback": print}), "extra should hold JSON values"),
    (dict(checkpoint_every=5), "checkpoint_every=5 needs output_dir"),
    (dict(learning_rate=1e-3), "no field 'learning_rate'; did you mean 'lr'"),
])
def test_config_combinations_and_unknown_fields_are_refused(kwargs, says):
    with pytest.raises(ConfigError, match=says):
        DistillConfig(**{**BASE, **kwargs})


def test_max_grad_norm_none_means_no_clipping_and_trains():
    teacher, student = _pair()
    report = distill(student, teacher, _ids(), DistillConfig(**BASE, max_grad_norm=None))
    assert report.steps == 2 and report.final_loss == pytest.approx(report.losses[-1]["loss"], abs=1e-6)


# --- checked against the models when training starts ----------------------------------------------------------

def test_top_k_larger_than_the_vocabulary(tmp_path):
    teacher, student = _pair()
    _refused(ConfigError, rf"top_k=1000 is larger than the vocabulary \({VOCAB} tokens\)", teacher, student,
             _ids(), DistillConfig(**BASE, top_k=1000, output_dir=str(tmp_path / "run")), folder=tmp_path)


def test_layer_map_outside_the_teacher(tmp_path):
    teacher, student = _pair()
    _refused(ConfigError, r"DistillConfig.layer_map=\{0: 9\} maps \{0: 9\} outside the models.*teacher 0 to 3",
             teacher, student, _ids(), DistillConfig(**BASE, hidden_loss="cosine", layer_map={0: 9},
                                                     output_dir=str(tmp_path / "run")), folder=tmp_path)


def test_hidden_layers_beyond_the_student():
    teacher, student = _pair()
    _refused(ConfigError, r"hidden_layers=\[7\] names layers \[7\] the student does not have", teacher, student,
             _ids(), DistillConfig(**BASE, hidden_loss="mse", hidden_layers=[7]))


def test_kept_layers_and_kept_hidden_that_do_not_fit_the_models():
    teacher, student = _pair()
    _refused(ConfigError, r"kept_layers=\[0, 9\].*4 layers", teacher, student, _ids(),
             DistillConfig(**BASE, hidden_loss="cosine"), kept_layers=[0, 9])
    _refused(ConfigError, r"kept_hidden.*96 hidden channels.*got \[0, 1\]", teacher, student, _ids(),
             DistillConfig(**BASE, hidden_loss="cosine"), kept_hidden=[0, 1])


def test_negative_skip_tokens_and_a_config_that_is_not_a_distill_config():
    teacher, student = _pair()
    _refused(ConfigError, r"skip_tokens should be a non-negative integer, got -3", teacher, student, _ids(),
             DistillConfig(**BASE), skip_tokens=-3)
    _refused(ConfigError, r"config should be a compress.DistillConfig, got dict", teacher, student, _ids(),
             dict(BASE))


# --- 2. checkpoints and resume ---------------------------------------------------------------------------------

def test_a_new_run_refuses_a_folder_with_an_earlier_runs_checkpoint(tmp_path):
    config = _finished_run(tmp_path / "run")
    teacher, student = _pair()
    err = _refused(CheckpointError, r"output_dir=.*run'.*checkpoint-00000002.*resume=True.*another output_dir",
                   teacher, student, _ids(), DistillConfig(**config), folder=tmp_path)
    assert "metrics.jsonl" in str(err)


def test_a_new_run_refuses_a_folder_with_an_earlier_runs_metrics(tmp_path):
    teacher, student = _pair()
    distill(student, teacher, _ids(), DistillConfig(**BASE, output_dir=str(tmp_path / "run")))
    assert (tmp_path / "run" / "metrics.jsonl").stat().st_size > 0
    teacher, student = _pair()
    _refused(OutputExistsError, r"holds an earlier run's metrics.jsonl.*resume=True", teacher, student, _ids(),
             DistillConfig(**BASE, output_dir=str(tmp_path / "run")), folder=tmp_path)


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    teacher, student = _pair()
    _refused(ConfigError, r"output_dir=.*notes.txt' is a file", teacher, student, _ids(),
             DistillConfig(**BASE, output_dir=str(tmp_path / "notes.txt")), folder=tmp_path)


def test_resume_with_a_student_of_another_depth_copies_nothing(tmp_path):
    config = _finished_run(tmp_path / "run", max_steps=3, hidden_loss="cosine")
    teacher, _ = _pair()
    student = tiny_model("llama", seed=1, num_hidden_layers=3)
    _refused(CheckpointError, r"checkpoint-00000002: student.safetensors has model.layers.3.* another student",
             teacher, student, _ids(), DistillConfig(**{**config, "resume": True}), folder=tmp_path)


def test_resume_with_another_vocabulary_copies_nothing(tmp_path):
    config = _finished_run(tmp_path / "run", max_steps=3)
    teacher, student = _pair(vocab_size=400)
    _refused(CheckpointError, r"(model.embed_tokens|lm_head).weight of shape \(320, 96\).*needs \(400, 96\)", teacher,
             student, _ids(), DistillConfig(**{**config, "resume": True}), folder=tmp_path)


def test_resume_with_a_bad_optimizer_state_copies_no_student_weight(tmp_path):
    """The student file matches; the optimizer's does not. The student must not have been loaded first."""
    config = _finished_run(tmp_path / "run", max_steps=3)
    opt = tmp_path / "run" / "checkpoint-00000002" / "optimizer.safetensors"
    tensors = load_file(str(opt))
    key = next(k for k in tensors if k.endswith("exp_avg"))
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, str(opt))
    teacher, student = _pair()
    _refused(CheckpointError, rf"optimizer.safetensors has exp_avg of parameter {key.split('.')[0]} with shape "
             r"\(3, 3\)", teacher, student, _ids(), DistillConfig(**{**config, "resume": True}), folder=tmp_path)


def test_resume_with_a_truncated_student_file(tmp_path):
    config = _finished_run(tmp_path / "run", max_steps=3)
    path = tmp_path / "run" / "checkpoint-00000002" / "student.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    teacher, student = _pair()
    _refused(CheckpointError, r"checkpoint-00000002: student.safetensors is unreadable", teacher, student, _ids(),
             DistillConfig(**{**config, "resume": True}), folder=tmp_path)


def test_a_run_with_a_layer_map_resumes(tmp_path):
    """state.json turns the layer map's keys into strings: that is not "another run"."""
    config = _finished_run(tmp_path / "run", max_steps=3, hidden_loss="cosine", layer_map={0: 0, 1: 2, 3: 3})
    teacher, student = _pair()
    report = distill(student, teacher, _ids(), DistillConfig(**{**config, "resume": True}))
    assert (report.resumed_from_step, report.steps, report.layer_map) == (2, 1, {"0": 0, "1": 2, "3": 3})


def test_resume_with_a_smaller_budget_says_where_the_checkpoint_is(tmp_path):
    config = _finished_run(tmp_path / "run")
    teacher, student = _pair()
    _refused(CheckpointError, r"max_steps 2 -> 1; the checkpoint is at step 2, the budget of this run ends at step 1",
             teacher, student, _ids(), DistillConfig(**{**config, "resume": True, "max_steps": 1}), folder=tmp_path)


def test_resuming_a_finished_run_trains_nothing_and_says_so(tmp_path):
    config = _finished_run(tmp_path / "run")
    files = _folder(tmp_path / "run")
    teacher, student = _pair()
    report = distill(student, teacher, _ids(), DistillConfig(**{**config, "resume": True}))
    assert (report.steps, report.tokens, report.tokens_per_second) == (0, 0, 0.0)
    assert (report.total_steps, report.total_tokens, report.resumed_from_step) == (2, 2 * 2 * 16, 2)
    assert report.final_loss == report.losses[-1]["loss"] and report.final_loss == report.final_loss  # not NaN
    saved = load_file(str(tmp_path / "run" / "checkpoint-00000002" / "student.safetensors"))
    for k, v in saved.items():
        assert torch.equal(student.state_dict()[k], v)  # the finished run's student, handed back
    assert _folder(tmp_path / "run") == files


def test_nan_stop_restores_the_models_and_a_resume_reports_only_its_own_tokens(tmp_path):
    """Steps 1-2 fine (checkpoint at 2), NaN at step 3: DistillError, models as they came in, checkpoint kept.
    The resume then trains steps 3-4 and reports those 2 steps' tokens, the run's total separately."""
    teacher, student = _pair()
    calls = {"n": 0}

    def poison(_module, _args, out):
        calls["n"] += 1
        return out * float("nan") if calls["n"] > 2 else None

    student.model.layers[0].register_forward_hook(poison)
    config = dict(BASE, max_steps=4, checkpoint_every=2, output_dir=str(tmp_path / "run"), hidden_loss="cosine")
    snap = Snapshot(teacher, student)
    with pytest.raises(DistillError, match=r"nan/inf at step 3.*checkpoint-00000002.*put back"):
        distill(student, teacher, _ids(), DistillConfig(**config))
    snap.check()
    assert [p.name for p in (tmp_path / "run").glob("checkpoint-*")] == ["checkpoint-00000002"]
    teacher, student = _pair()
    report = distill(student, teacher, _ids(), DistillConfig(**{**config, "resume": True}))
    assert report.resumed_from_step == 2 and report.steps == 2 and report.tokens == 2 * 2 * 16
    assert report.total_steps == 4 and report.total_tokens == 4 * 2 * 16 and report.tokens_per_second > 0
    assert [r["step"] for r in report.losses] == [1, 2, 3, 4]


def test_a_failed_checkpoint_write_is_a_checkpoint_error_and_restores_the_models(tmp_path, monkeypatch):
    from compress.distillation import checkpoint as ckpt

    teacher, student = _pair()
    real = ckpt.save_file

    def full_disk(tensors, filename, *a, **k):
        if "checkpoint-00000004" in filename:
            raise OSError(28, "No space left on device")
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    config = DistillConfig(**{**BASE, "max_steps": 4}, checkpoint_every=2, output_dir=str(tmp_path / "run"))
    snap = Snapshot(teacher, student)
    with pytest.raises(CheckpointError, match=r"step 4 to .*checkpoint-00000004.*No space left.*checkpoint-00000002"):
        distill(student, teacher, _ids(), config)
    snap.check()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-00000002", "metrics.jsonl"]


# --- 3. the caller's models come back as they were on late errors -----------------------------------------------

def test_a_failed_teacher_correction_run_gives_back_the_uncorrected_teacher():
    """Teacher correction trains the teacher in place; a NaN stop afterwards must put its weights back."""
    teacher, student = _pair()
    student.model.layers[0].register_forward_hook(lambda _m, _a, out: out * float("nan"))
    _refused(DistillError, r"nan/inf at step 1.*no checkpoint was written", teacher, student, _ids(),
             DistillConfig(**BASE, teacher_correction_steps=2))


def test_a_bf16_student_with_gradient_checkpointing_comes_back_in_bf16_unchanged():
    teacher, student = _pair()
    student.to(torch.bfloat16)
    student.model.layers[1].register_forward_hook(lambda _m, _a, out: out * float("inf"))
    _refused(DistillError, r"nan/inf at step 1", teacher, student, _ids(),
             DistillConfig(**BASE, gradient_checkpointing=True, hidden_loss="cosine"))


def test_keyboard_interrupt_mid_run_restores_the_models():
    teacher, student = _pair()
    calls = {"n": 0}

    def interrupt(*_):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    student.model.embed_tokens.register_forward_pre_hook(interrupt)
    snap = Snapshot(teacher, student)
    with pytest.raises(KeyboardInterrupt):
        distill(student, teacher, _ids(), DistillConfig(**{**BASE, "max_steps": 4}, hidden_loss="mse"))
    snap.check()


def test_success_keeps_the_callers_flags_dtype_and_gradients():
    teacher, student = _pair()
    before_t, before_s = _model_state(teacher), _model_state(student)
    distill(student, teacher, _ids(), DistillConfig(**BASE, hidden_loss="cosine"))
    _assert_model_unchanged(teacher, before_t, "teacher")
    after = _model_state(student)
    assert after["flags"] == before_s["flags"] and after["dtypes"] == before_s["dtypes"]
    assert after["hooks"] == before_s["hooks"] and not student.training
    assert torch.equal(student.model.norm.weight.grad, before_s["grads"]["model.norm.weight"])
    assert not torch.equal(after["weights"]["model.layers.0.mlp.up_proj.weight"],
                           before_s["weights"]["model.layers.0.mlp.up_proj.weight"])  # it did train


# --- 4. models and data that cannot be trained on --------------------------------------------------------------

def test_a_student_with_nan_weights_is_refused_before_training(tmp_path):
    teacher, student = _pair()
    with torch.no_grad():
        student.model.layers[2].mlp.down_proj.weight[0, 0] = float("nan")
    _refused(DataError, r"the student has NaN or infinite weights in model.layers.2.mlp.down_proj.weight", teacher,
             student, _ids(), DistillConfig(**BASE, output_dir=str(tmp_path / "run")), folder=tmp_path)
    assert not (tmp_path / "run").exists()


def test_a_teacher_with_inf_weights_is_refused_before_training():
    teacher, student = _pair()
    with torch.no_grad():
        teacher.model.norm.weight[3] = float("inf")
    _refused(DataError, r"the teacher has NaN or infinite weights in model.norm.weight", teacher, student, _ids(),
             DistillConfig(**BASE))


def test_the_teacher_as_its_own_student_and_shared_weights_are_refused():
    teacher, student = _pair()
    _refused(DataError, r"student and the teacher are the same model object.*deepcopy", teacher, teacher, _ids(),
             DistillConfig(**BASE))
    student.lm_head.weight = teacher.lm_head.weight  # a shallow copy: training the student would train the teacher
    _refused(DataError, r"student shares weights with the teacher \(.*lm_head.weight", teacher, student, _ids(),
             DistillConfig(**BASE))


@pytest.mark.parametrize("value, says", [(VOCAB, rf"distillation data.*the id {VOCAB}, outside the model's vocabulary of {VOCAB}"),
                                         (-1, rf"distillation data.*negative id -1.*vocabulary of {VOCAB}")])
def test_token_ids_outside_the_vocabulary_are_refused(value, says):
    teacher, student = _pair()
    ids = _ids()
    ids[3, 5] = value
    _refused(DataError, says, teacher, student, ids, DistillConfig(**BASE))


@pytest.mark.parametrize("data, says", [
    (_ids().float(), r"integer tensor of token ids, got dtype torch.float32"),
    (_ids(width=32), r"32 tokens long \(shape \(8, 32\)\) but DistillConfig.seq_len=16"),
    (_ids()[0], r"\[N, seq_len\] tensor, got shape \(16,\)"),
    (["some text"], "needs a tokenizer"),
    (_ids(n=1), r"1 training windows are fewer than one global batch of 2"),
])
def test_data_that_is_not_token_windows_of_seq_len(data, says):
    teacher, student = _pair()
    _refused(DataError, says, teacher, student, data, DistillConfig(**BASE))


def test_a_tokenizer_of_another_model(tokenizer):
    teacher, student = _pair(vocab_size=64)
    _refused(DataError, rf"the tokenizer has {len(tokenizer)} tokens but the model's embedding has 64 rows", teacher,
             student, ["some text " * 50], DistillConfig(**BASE), tokenizer=tokenizer)


@pytest.mark.parametrize("keep", [True, False])
def test_host_copies_for_errors_can_be_skipped(keep, monkeypatch):
    """keep_weights_for_errors=False (what compress() passes) takes no host copy of the student or of a teacher
    trained by teacher correction; the default takes both."""
    from compress.distillation import parallel

    saved = []
    real = parallel.ModelBackup.save_weights

    def spy(self, *args, **kwargs):
        saved.append((self.model, kwargs.get("for_cast", False)))
        return real(self, *args, **kwargs)
    monkeypatch.setattr(parallel.ModelBackup, "save_weights", spy)
    teacher, student = _pair()
    distill(student, teacher, _ids(), DistillConfig(**{**BASE, "teacher_correction_steps": 1}),
            keep_weights_for_errors=keep)
    copies = [model for model, for_cast in saved if not for_cast]
    assert copies == ([student, teacher] if keep else [])


# --- 5. the stage check: what distill() refuses before it looks at a model ----------------------------------------

def test_check_refuses_what_needs_no_model(tmp_path, monkeypatch):
    """compress.distillation.check: config type and values, device, a text source, the output folder; a token
    tensor and None pass (they are checked against the models by distill())."""
    from compress.distillation import check

    config = DistillConfig(**BASE)
    check(config)
    check(config, data=_ids(), device="cpu")
    check(config, data=["some text"], device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="config should be a compress.DistillConfig, got dict"):
        check(dict(BASE))
    with pytest.raises(ConfigError, match="'gpu' is not a device torch knows"):
        check(config, device="gpu")
    with pytest.raises(DataError, match="missing.txt"):
        check(config, data=str(tmp_path / "missing.txt"))
    config.max_steps = 0  # changed since construction: validated again
    with pytest.raises(ConfigError, match="max_steps should be None or a positive integer, got 0"):
        check(config)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is a file"):
        check(DistillConfig(**BASE, output_dir=str(tmp_path / "notes.txt")))
    folder = tmp_path / "run"
    config = _finished_run(folder)
    with pytest.raises(CheckpointError, match="checkpoint-00000002"):
        check(DistillConfig(**config))
    check(DistillConfig(**{**config, "resume": True}))  # continuing that run is allowed
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match="pip install"):
        check(DistillConfig(**BASE, output_dir=str(tmp_path / "tb"), tensorboard=True))


def test_distill_refuses_a_bad_device_and_a_missing_file_before_touching_the_models(tmp_path):
    teacher, student = _pair()
    _refused(ConfigError, r"device 'gpu'", teacher, student, _ids(), DistillConfig(**BASE), device="gpu")
    _refused(DataError, r"nothing\.txt", teacher, student, str(tmp_path / "nothing.txt"), DistillConfig(**BASE))


def test_check_checkpoint_dir_is_public_in_checkpoint(tmp_path):
    from compress.distillation.checkpoint import check_checkpoint_dir

    check_checkpoint_dir(tmp_path / "new", DistillConfig(**BASE))  # a folder that does not exist yet
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(OutputExistsError, match="metrics.jsonl"):
        check_checkpoint_dir(tmp_path, DistillConfig(**BASE))
    check_checkpoint_dir(tmp_path, DistillConfig(**BASE, output_dir=str(tmp_path), resume=True))


def test_a_cut_warmup_warns_at_the_callers_line():
    teacher, student = _pair()
    with pytest.warns(UserWarning, match="warmup_steps=10 is not shorter than the run") as record:
        distill(student, teacher, _ids(), DistillConfig(**{**BASE, "warmup_steps": 10}))
    assert [w.filename for w in record if "warmup_steps" in str(w.message)] == [__file__]
