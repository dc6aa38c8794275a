"""Candidate shapes (the planner's K best) and the shape search (a short distillation each, best held-out score).

References are computed independently: the planner's k-th candidate is what plan_shape picks once the first
k-1 are forbidden; each candidate's score is recomputed by pruning that shape, distilling with the same config
on windows cut from the token stream here, and a naive full-softmax KL."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

import compress
from compress.pruning import search
from compress.distillation import DistillConfig
from compress.errors import ConfigError, DataError, PluginError, TargetError
from compress.models import adapter_for
from compress.pruning.plan import PlanConfig, Target, candidate_shapes, plan_shape
from compress.pruning.plan import damage_cost as _cost
from compress.pruning.search import SearchConfig, search_shapes
from compress.pruning.shape import SHAPE_FIELDS, ModelShape, ParamFormula, count_params

from conftest import SAMPLE_TEXT, tiny_model

WORDS = sorted(set(SAMPLE_TEXT.split()))
# Words in a random order: no window of this text repeats another, so windows can be told apart by content.
_RNG = random.Random(0)
TEXT = " ".join(_RNG.choice(WORDS) for _ in range(1500))
SEQ = 32
CAL = compress.CalibrationConfig(num_samples=8, seq_len=SEQ, batch_size=4, min_samples=8)
CAL_TOKENS = 8 * SEQ


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models train ~15x faster on one thread than on two busy cores; the count is put back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _search_config(**overrides) -> SearchConfig:
    d = DistillConfig(max_tokens=256, seq_len=SEQ, batch_size=2, lr=5e-3, warmup_steps=1, progress=False, log_every=1)
    return SearchConfig(**{"candidates": 3, "tokens_per_candidate": 256, "eval_windows": 2, "distill": d,
                           "progress": False, **overrides})


def _planner_inputs(model):
    adapter = adapter_for(model)
    cfg = adapter.shape_config(model.config)
    return (ModelShape.from_config(cfg), ParamFormula.from_model(model, adapter), count_params(model),
            adapter.shape_constraint(cfg))


# -- candidate_shapes ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["width", "width+depth", "depth"])
@pytest.mark.parametrize("fraction", [0.5, 0.6, 0.75])
def test_candidates_are_the_planners_next_choices(strategy, fraction):
    teacher, formula, total, constraint = _planner_inputs(tiny_model("llama"))
    target = Target.parse({"params": fraction}, total)
    config = PlanConfig()
    try:
        chosen = plan_shape(teacher, formula, target, strategy, config, constraint)
    except TargetError:
        with pytest.raises(TargetError):
            candidate_shapes(teacher, formula, target, strategy, config, constraint, k=4)
        return
    plans = candidate_shapes(teacher, formula, target, strategy, config, constraint, k=4)
    assert plans[0] == chosen
    assert candidate_shapes(teacher, formula, target, strategy, config, constraint, k=1) == [chosen]
    shapes = [p.shape for p in plans]
    assert len(set(shapes)) == len(shapes)
    for p in plans:
        assert p.params == formula.total(p.shape)
    if chosen.candidates:  # within tolerance: by the planner's cost, then more parameters first
        assert len(plans) == min(4, chosen.candidates)
        low = target.params * (1 - config.tolerance)
        assert all(low <= p.params <= target.params for p in plans)
        keys = [(_cost(teacher, p.shape, config.weights), -p.params) for p in plans]
        assert keys == sorted(keys)
    else:  # nothing within tolerance: the largest below the budget
        assert [p.params for p in plans] == sorted((p.params for p in plans), reverse=True)
    # Independent reference: the k-th candidate is what plan_shape picks once the first k-1 are forbidden.
    for k in range(1, len(plans)):
        taken = set(shapes[:k])
        def forbid(s, taken=taken):
            return "taken" if s in taken else (constraint(s) if constraint else None)
        reference = plan_shape(teacher, formula, target, strategy, config, forbid)
        assert reference.shape == shapes[k]
        assert reference.params == plans[k].params


def test_candidates_when_nothing_lands_within_tolerance():
    teacher, formula, total, constraint = _planner_inputs(tiny_model("llama"))
    target = Target.parse({"params": 0.6}, total)
    config = PlanConfig(tolerance=1e-6)
    chosen = plan_shape(teacher, formula, target, "width", config, constraint)
    plans = candidate_shapes(teacher, formula, target, "width", config, constraint, k=3)
    assert chosen.candidates == 0 and plans[0] == chosen and len(plans) == 3
    assert [p.params for p in plans] == sorted((p.params for p in plans), reverse=True)
    assert all(p.params < target.params * (1 - config.tolerance) for p in plans)
    assert len({p.shape for p in plans}) == 3


def test_explicit_shape_gives_one_candidate_and_k_is_checked():
    teacher, formula, total, constraint = _planner_inputs(tiny_model("llama"))
    target = Target.parse({"hidden_size": 48, "intermediate_size": 64}, total)
    plans = candidate_shapes(teacher, formula, target, "width", None, constraint, k=4)
    assert plans == [plan_shape(teacher, formula, target, "width", None, constraint)]
    for k in (0, -1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="k should be"):
            candidate_shapes(teacher, formula, target, "width", k=k)


# -- search_shapes ---------------------------------------------------------------------------------------------

def _stream(tokenizer) -> torch.Tensor:
    """The token stream pack_tokens cuts windows from: the text's ids, then EOS."""
    return torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])


def _naive_kl(student, teacher, windows) -> float:
    """Mean over every position of sum_v p_t(v) * log(p_t(v) / p_s(v)), in float64 from full softmaxes."""
    student.eval()
    teacher.eval()
    with torch.no_grad():
        p = torch.softmax(teacher(input_ids=windows).logits.double(), -1)
        q = torch.softmax(student(input_ids=windows).logits.double(), -1)
    return float((p * (p.log() - q.log())).sum(-1).mean())


@pytest.fixture(scope="module")
def searched(tokenizer):
    teacher = tiny_model("llama")
    teacher.train()  # the search must give the modes back, mixed ones included
    teacher.model.layers[1].eval()
    modes = [m.training for m in teacher.modules()]
    weights = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    calls = {"score_importance": 0, "plugin": 0}
    trained_on, scored_on = [], []
    with pytest.MonkeyPatch.context() as mp:
        real_score_importance, plugin = search.score_importance, compress.get_plugin("activation")
        real_plugin_score, real_distill, real_score = plugin.score, search.distill, search._score_windows

        def count_score_importance(*args, **kwargs):
            calls["score_importance"] += 1
            return real_score_importance(*args, **kwargs)

        def count_plugin(self, *args, **kwargs):
            calls["plugin"] += 1
            return real_plugin_score(self, *args, **kwargs)

        def record_distill(student, teacher_, data, cfg, **kwargs):
            trained_on.append(data.clone())
            return real_distill(student, teacher_, data, cfg, **kwargs)

        def record_score(student, teacher_, windows, kind, *args, **kwargs):
            if student is not teacher_:
                scored_on.append(windows.clone())
            return real_score(student, teacher_, windows, kind, *args, **kwargs)

        mp.setattr(search, "score_importance", count_score_importance)
        mp.setattr(plugin, "score", count_plugin)
        mp.setattr(search, "distill", record_distill)
        mp.setattr(search, "_score_windows", record_score)
        result = search_shapes(teacher, {"params": 0.6}, TEXT, tokenizer=tokenizer, train_data=TEXT,
                               config=_search_config(), skip_tokens=CAL_TOKENS, calibration_config=CAL,
                               device="cpu")
    return {"teacher": teacher, "weights": weights, "modes": modes, "result": result, "calls": calls,
            "trained_on": trained_on, "scored_on": scored_on}


def test_search_tries_the_planners_candidates(searched):
    result, teacher = searched["result"], searched["teacher"]
    shape, formula, total, constraint = _planner_inputs(teacher)
    plans = candidate_shapes(shape, formula, Target.parse({"params": 0.6}, total), "width", None, constraint, k=3)
    assert [c.shape for c in result.candidates] == [{f: getattr(p.shape, f) for f in SHAPE_FIELDS} for p in plans]
    assert [c.params for c in result.candidates] == [p.params for p in plans]
    assert [c.rank for c in result.candidates] == [0, 1, 2]
    assert result.best_shape == result.candidates[result.best].shape
    assert all(c.distill_tokens == 256 and c.distill_steps == 4 and c.error is None for c in result.candidates)
    assert result.tokens == {"calibration": CAL_TOKENS, "training": 3 * 256, "held_out": 2 * SEQ,
                             "total": CAL_TOKENS + 3 * 256}
    d = result.to_dict()
    assert d["best_shape"] == result.best_shape and len(d["candidates"]) == 3
    assert d["config"]["distill"]["max_tokens"] == 256


def test_importance_is_scored_once(searched):
    assert searched["calls"] == {"score_importance": 1, "plugin": 1}


def test_teacher_is_unchanged(searched):
    teacher = searched["teacher"]
    after = teacher.state_dict()
    assert after.keys() == searched["weights"].keys()
    for name, value in searched["weights"].items():
        assert torch.equal(after[name], value), name
    assert [m.training for m in teacher.modules()] == searched["modes"]
    assert teacher.training and not teacher.model.layers[1].training
    assert all(p.requires_grad and p.grad is None and p.device.type == "cpu" for p in teacher.parameters())


def test_held_out_windows_follow_the_training_windows(searched, tokenizer):
    stream, result = _stream(tokenizer), searched["result"]
    n_train = 256 // (2 * SEQ) * 2
    train_end = CAL_TOKENS + n_train * SEQ
    expected_train = stream[CAL_TOKENS:train_end].view(n_train, SEQ)
    expected_held = stream[train_end:train_end + 2 * SEQ].view(2, SEQ)
    # Every candidate trained on the same windows, those right after the calibration tokens ...
    assert len(searched["trained_on"]) == 3
    for data in searched["trained_on"]:
        assert torch.equal(data, expected_train)
    # ... and was scored (before and after training) on the windows right after those.
    assert len(searched["scored_on"]) == 6
    for windows in searched["scored_on"]:
        assert torch.equal(windows, expected_held)
    assert result.data["train_tokens"] == [CAL_TOKENS, train_end]
    assert result.data["held_out_tokens"] == [train_end, train_end + 2 * SEQ]
    # By content too: no held-out window occurs anywhere in the training or calibration tokens.
    seen = stream[:train_end].tolist()
    for window in expected_held.tolist():
        assert not any(seen[i:i + SEQ] == window for i in range(len(seen) - SEQ + 1))


def test_scores_match_an_independent_recomputation(searched, tokenizer):
    result, teacher = searched["result"], searched["teacher"]
    stream = _stream(tokenizer)
    n_train = 256 // (2 * SEQ) * 2
    train_end = CAL_TOKENS + n_train * SEQ
    train = stream[CAL_TOKENS:train_end].view(n_train, SEQ)
    held = stream[train_end:train_end + 2 * SEQ].view(2, SEQ)
    scores = compress.score_importance(teacher, TEXT, tokenizer=tokenizer, calibration_config=CAL)
    cfg = _search_config().distill
    before, after = [], []
    for cand in result.candidates:
        student = copy.deepcopy(teacher)
        report = compress.prune(student, cand.shape, TEXT, tokenizer=tokenizer, calibration_config=CAL,
                                importance=scores)
        before.append(_naive_kl(student, teacher, held))
        compress.distill(student, teacher, train, cfg, kept_layers=report.kept.get("layers"),
                         kept_hidden=report.kept.get("hidden"), device="cpu")
        after.append(_naive_kl(student, teacher, held))
    for module, training in zip(teacher.modules(), searched["modes"]):
        module.training = training
    assert [c.score_before for c in result.candidates] == pytest.approx(before, rel=1e-4, abs=1e-6)
    assert [c.score for c in result.candidates] == pytest.approx(after, rel=1e-4, abs=1e-6)
    assert all(a < b for a, b in zip(after, before))  # the short runs did train
    assert result.best == min(range(len(after)), key=after.__getitem__)
    # The best shape is a target prune accepts as it is.
    student = copy.deepcopy(teacher)
    report = compress.prune(student, result.best_shape, TEXT, tokenizer=tokenizer, calibration_config=CAL,
                            importance=scores)
    assert {f: report.shape_after[f] for f in SHAPE_FIELDS} == result.best_shape


def test_perplexity_score_on_an_explicit_shape(tokenizer):
    teacher = tiny_model("llama", seed=1)
    shape = {"hidden_size": 48, "intermediate_size": 64}
    result = search_shapes(teacher, shape, TEXT, tokenizer=tokenizer, train_data=TEXT,
                           config=_search_config(score="perplexity"), skip_tokens=CAL_TOKENS,
                           calibration_config=CAL, device="cpu")
    assert len(result.candidates) == 1 and result.best == 0
    assert {k: result.best_shape[k] for k in shape} == shape
    stream = _stream(tokenizer)
    n_train = 256 // (2 * SEQ) * 2
    train_end = CAL_TOKENS + n_train * SEQ
    held = stream[train_end:train_end + 2 * SEQ].view(2, SEQ)
    student = copy.deepcopy(teacher)
    report = compress.prune(student, shape, TEXT, tokenizer=tokenizer, calibration_config=CAL)
    nll = []
    with torch.no_grad():
        logits = student(input_ids=held).logits.double()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), held[:, 1:].reshape(-1))
    assert result.candidates[0].score_before == pytest.approx(math.exp(float(nll)), rel=1e-4)
    compress.distill(student, teacher, stream[CAL_TOKENS:train_end].view(n_train, SEQ), _search_config().distill,
                     kept_hidden=report.kept.get("hidden"), device="cpu")
    assert result.candidates[0].score == pytest.approx(
        compress.evaluate.windows_perplexity(student, held), rel=1e-4)
    assert result.teacher_perplexity == pytest.approx(compress.evaluate.windows_perplexity(teacher, held), rel=1e-4)


# -- refused before any work -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, named", [
    ({"candidates": 0}, "candidates"), ({"candidates": True}, "candidates"),
    ({"tokens_per_candidate": -5}, "tokens_per_candidate"), ({"eval_windows": 1.5}, "eval_windows"),
    ({"score": "bleu"}, "score"), ({"progress": "yes"}, "progress"), ({"distill": {"lr": 1e-3}}, "distill"),
    ({"tokens_per_candidate": 100}, "tokens_per_candidate"),
    ({"distill": DistillConfig(max_tokens=64, output_dir="runs/x")}, "output_dir"),
    ({"distill": DistillConfig(max_tokens=64, teacher_correction_steps=2)}, "teacher_correction_steps"),
])
def test_search_config_is_validated(fields, named):
    with pytest.raises(ConfigError, match=named):
        SearchConfig(**fields)


def test_search_config_template_budget_follows_tokens_per_candidate():
    template = DistillConfig(max_steps=3, seq_len=64, batch_size=2, warmup_steps=0)
    cfg = SearchConfig(tokens_per_candidate=1024, distill=template)
    assert cfg.distill.max_tokens == 1024 and cfg.distill.max_steps is None and cfg.distill.warmup_steps == 0
    assert template.max_steps == 3  # the caller's template is not changed
    default = SearchConfig()
    assert default.distill.max_tokens == default.tokens_per_candidate and default.distill.seq_len == 256


@pytest.mark.parametrize("case", ["short_data", "short_text", "small_target", "strategy", "no_tokenizer",
                                  "importance_shape", "plugin", "skip", "config", "no_calibration",
                                  "block_search_without_calibration"])
def test_bad_input_is_refused_before_any_work(case, tokenizer, monkeypatch):
    teacher = tiny_model("llama")
    weights = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    calls = []
    monkeypatch.setattr(search, "score_importance", lambda *a, **k: calls.append("score"))
    monkeypatch.setattr(search, "distill", lambda *a, **k: calls.append("distill"))
    kwargs = dict(tokenizer=tokenizer, train_data=TEXT, config=_search_config(), skip_tokens=CAL_TOKENS,
                  calibration_config=CAL, device="cpu")
    target, calibration, error, named = {"params": 0.6}, TEXT, ConfigError, None
    if case == "short_data":  # 3 windows after the skipped ones: fewer than one batch (2) + 2 held-out
        kwargs["train_data"], error, named = _stream(tokenizer)[:CAL_TOKENS + 3 * SEQ].view(-1, SEQ), DataError, \
            "held-out"
    elif case == "short_text":
        kwargs["train_data"], error = " ".join(TEXT.split()[:50]), DataError
    elif case == "small_target":
        target, error = {"params": 0.01}, TargetError
    elif case == "strategy":
        kwargs["strategy"], named = "sideways", "strategy"
    elif case == "no_tokenizer":
        kwargs["tokenizer"], error = None, DataError
    elif case == "importance_shape":
        kwargs["importance"], named = compress.Importance("activation", mlp=torch.ones(3, 3)), "'mlp'"
    elif case == "plugin":
        kwargs["plugins"], error = ["no-such-plugin"], PluginError
    elif case == "skip":
        kwargs["skip_tokens"], named = -1, "skip_tokens"
    elif case == "config":
        kwargs["config"], named = {"candidates": 2}, "SearchConfig"
    elif case == "no_calibration":
        calibration, named = None, "calibration"
    elif case == "block_search_without_calibration":  # importance given, but the depth search needs the data
        calibration, named = None, "contiguous-block"
        kwargs.update(strategy="width+depth", plugins={"depth": {"method": "contiguous_block"}},
                      importance=compress.score_importance(teacher, TEXT, tokenizer=tokenizer, calibration_config=CAL))
    with pytest.raises(error, match=named):
        search_shapes(teacher, target, calibration, **kwargs)
    assert calls == []
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, weights[name])


# -- renamed keywords: calibration= and plan=, as in compress.compress ---------------------------------------------

def test_search_keywords_new_old_and_both(tokenizer, monkeypatch):
    import warnings

    from compress.pruning.plan import plan_for

    teacher = tiny_model("llama", seed=1)
    plan = PlanConfig(multiple_of=16)
    kwargs = dict(tokenizer=tokenizer, train_data=TEXT, config=_search_config(candidates=1), skip_tokens=CAL_TOKENS,
                  device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = search_shapes(teacher, {"params": 0.6}, TEXT, calibration=CAL, plan=plan, **kwargs)
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert new.best_shape == search.shape_target(plan_for(teacher, {"params": 0.6}, "width", plan).plan.shape)
    with pytest.warns(DeprecationWarning, match=r"search_shapes\(plan_config=\.\.\.\).*use plan=") as caught:
        old = search_shapes(teacher, {"params": 0.6}, TEXT, calibration_config=CAL, plan_config=plan, **kwargs)
    assert all(w.filename == __file__ for w in caught) and len(caught) == 2
    assert old.best_shape == new.best_shape and old.tokens == new.tokens
    assert old.candidates[0].score_before == pytest.approx(new.candidates[0].score_before, rel=1e-6)

    calls = []
    monkeypatch.setattr(search, "score_importance", lambda *a, **k: calls.append("score"))
    for both, match in [(dict(calibration=CAL, calibration_config=CAL), "got both calibration= and calibration_config="),
                        (dict(plan=plan, plan_config=plan), "got both plan= and plan_config=")]:
        with pytest.raises(ConfigError, match=rf"search_shapes\(\) {match}"):
            search_shapes(teacher, {"params": 0.6}, TEXT, **both, **kwargs)
    with pytest.raises(ConfigError, match=r"plan_config should be a compress.PlanConfig.*got dict"):
        with pytest.warns(DeprecationWarning):
            search_shapes(teacher, {"params": 0.6}, TEXT, plan_config={"multiple_of": 16}, **kwargs)
    assert calls == []
