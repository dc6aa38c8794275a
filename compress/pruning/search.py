"""Candidate-shape search: Minitron's "top candidates, a short distillation each, keep the best".

The planner ranks the shapes near a parameter budget by a damage cost that is a guess about which axes hurt
least (:func:`compress.pruning.plan.candidate_shapes`). The search tests its ``K`` best guesses instead: importance is
scored once on the teacher; each candidate is pruned from a copy of the teacher with those scores, distilled
briefly on the training text, and scored on held-out windows of that same training text taken *after* every
token the short runs train on (never on the evaluation set, which stays the user's own test); the candidate with
the lowest score wins. The search returns shapes and scores only: prune the winning shape afresh
(``target=result.best_shape``) and run the full distillation on it.

    result = compress.pruning.search.search_shapes(teacher, {"params": 0.5}, "train.txt", tokenizer=tok,
                                           train_data="train.txt", skip_tokens=calibration_tokens)
    compress.prune(student, result.best_shape, "train.txt", tokenizer=tok)
"""

from __future__ import annotations

import copy
import gc
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .. import distributed, registry
from ..data import TextSource, check_source, describe_source, pack_tokens
from ..distillation import DistillError, distill
from ..errors import ConfigError, DataError, UnsupportedModelError
from ..models import check_plain_logits, find_adapter, layout_for
from ..progress import bar as progress_bar
from ..validate import check_device, check_finite_weights, check_token_ids, check_tokenizer_matches, embedding_rows
from .arguments import REQUIRED, Keywords, PluginsArg, check_prune_args, normalize_plugins, resolve_keywords
from .calibrate import Calibration, Importance, prepare_calibration
from .config import SCORES as SCORES  # re-exported: the search's configs live in .config
from .config import SHAPE_FIELDS, CalibrationConfig, PlanConfig, SearchConfig
from .config import default_short_distill as default_short_distill  # re-exported
from .plan import ModelPlan, Plan, damage_cost, plan_for
from .prune import prune, resolve_plugins, score_importance
from .selection import check_importance
from .shape import ModelShape, changed_axes


@dataclass
class Candidate:
    """One tested shape. ``rank`` is the planner's (0 = what :func:`compress.pruning.plan.plan_shape` picks);
    ``shape`` can be passed as a pruning target; ``score_before`` is the score right after pruning, ``score``
    after the short distillation (None, with ``error``, when that run failed)."""

    rank: int
    shape: dict
    params: int
    damage_cost: float
    score_before: float
    score: float | None
    distill_tokens: int
    distill_steps: int
    final_loss: float | None
    seconds: float
    error: str | None = None


@dataclass
class SearchResult:
    """What :func:`search_shapes` found. ``best_shape`` is a target for :func:`compress.prune` (an explicit
    shape). ``tokens``: ``calibration`` (importance scoring, 0 when scores were given), ``training`` (all short
    runs together), ``held_out`` (the scored windows), ``total`` (calibration + training). ``data``: where the
    training and held-out windows lie in ``train_data``'s token stream (``[start, end)`` token positions, the
    skipped tokens included), so a later stage can keep clear of them."""

    best_shape: dict
    best: int
    score: str
    candidates: list[Candidate]
    target: Any
    strategy: str
    params_before: int
    teacher_perplexity: float
    importance: str
    tokens: dict
    data: dict
    seconds: float
    seconds_importance: float
    config: dict = field(default_factory=dict)
    #: The importance scores every candidate was pruned with (not in :meth:`to_dict`): pruning the winner again
    #: with them gives exactly the searched student, without scoring twice.
    scores: Importance | None = field(default=None, repr=False, compare=False)

    @property
    def best_candidate(self) -> Candidate:
        """The winning candidate."""
        return self.candidates[self.best]

    def to_dict(self) -> dict:
        """Plain values for reports (without the scores)."""
        d = asdict(replace(self, scores=None))
        d.pop("scores")
        return d

    def __str__(self) -> str:
        lines = [
            f"shape search ({self.strategy}, score {self.score}, {len(self.candidates)} candidates, "
            f"{self.tokens['training']:,} training tokens, {self.seconds:.0f}s):"
        ]
        for i, c in enumerate(self.candidates):
            after = "failed" if c.score is None else f"{c.score:.4f}"
            lines.append(
                f"{'*' if i == self.best else ' '} rank {c.rank}: {c.shape} {c.params:,} params, "
                f"{self.score} {c.score_before:.4f} -> {after}"
            )
        return "\n".join(lines)


def shape_target(shape: ModelShape) -> dict:
    """An explicit pruning target for ``shape`` (every field :class:`compress.pruning.plan.Target` accepts)."""
    return {name: int(getattr(shape, name)) for name in SHAPE_FIELDS}


def _importance_plugin(plugins: PluginsArg) -> tuple[str, Any]:
    """The importance plugin named in ``plugins`` (name, config), or the default."""
    for name, config in normalize_plugins(plugins).items():
        if registry.get_plugin(name).kind == "importance":
            return name, config
    return "activation", None


def _split_data(
    train_data: TextSource | torch.Tensor, tokenizer: Any, config: SearchConfig, skip_tokens: int, rows: int
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The training windows of the short runs and the held-out windows right after them, from the token stream
    of ``train_data`` after its first ``skip_tokens`` tokens. Fewer training windows than the budget asks for
    (short text) are trained on repeatedly; fewer than one global batch plus the held-out windows are refused."""
    d = config.distill
    assert d is not None and d.seq_len is not None and d.batch_size is not None  # set by the configs' validate()
    seq, world = d.seq_len, distributed.rank_world()[1]
    global_batch = d.batch_size * d.grad_accum * world
    n_train = d.steps_for(world) * global_batch
    n_eval = config.eval_windows
    if isinstance(train_data, torch.Tensor):
        check_token_ids(train_data, rows, "train_data token ids")
        stream = train_data.detach().long().cpu().reshape(-1)[skip_tokens:]
        where = "<tensor>"
    else:
        check_source(train_data)
        if tokenizer is None:
            raise DataError("train_data given as text needs the model's tokenizer (pass tokenizer=...)")
        where = describe_source(train_data)
        windows = pack_tokens(tokenizer, train_data, seq, max_windows=n_train + n_eval, skip_tokens=skip_tokens)
        check_token_ids(windows, rows, f"the token ids of {where}")
        stream = windows.reshape(-1)
    available = stream.numel() // seq
    if available < global_batch + n_eval:
        raise DataError(
            f"train_data {where} gives {available} windows of {seq} tokens after skipping {skip_tokens}; the search "
            f"needs {n_train} for its short runs ({config.tokens_per_candidate:,} tokens per candidate) and "
            f"{n_eval} held-out windows after them (at least {global_batch} + {n_eval}). Give more text, or lower "
            "SearchConfig.tokens_per_candidate, eval_windows or distill.seq_len"
        )
    used = min(n_train, available - n_eval)
    train = stream[: used * seq].view(used, seq).clone()
    held = stream[used * seq : (used + n_eval) * seq].view(n_eval, seq).clone()
    start = skip_tokens
    info = {
        "source": where,
        "seq_len": seq,
        "skipped_tokens": skip_tokens,
        "train_windows": used,
        "train_tokens": [start, start + used * seq],
        "held_out_windows": n_eval,
        "held_out_tokens": [start + used * seq, start + (used + n_eval) * seq],
        "epochs_per_candidate": round(n_train / used, 3),
    }
    return train, held, info


def _modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Every module's train/eval mode, to put back with :func:`_restore`."""
    return [(m, m.training) for m in model.modules()]


def _restore(modes: list[tuple[nn.Module, bool]]) -> None:
    """Put back the modes :func:`_modes` recorded."""
    for module, training in modes:
        module.training = training


def _score_windows(
    student: nn.Module, teacher: nn.Module, windows: torch.Tensor, kind: str, batch_size: int = 2
) -> float:
    """``kind="kl"``: mean over every position of the held-out windows of KL(teacher || student) of the
    next-token distributions; ``"perplexity"``: the student's perplexity on them. Both models run where they
    are; their train/eval modes are restored."""
    s_dev = next(student.parameters()).device
    t_dev = next(teacher.parameters()).device
    modes = _modes(student) + _modes(teacher)
    student.eval()
    teacher.eval()
    total, count = 0.0, 0
    try:
        with torch.inference_mode():
            for batch in windows.split(batch_size):
                s_logits = student(input_ids=batch.to(s_dev), use_cache=False).logits.float()
                if kind == "perplexity":
                    labels = batch[:, 1:].reshape(-1).to(s_dev)
                    loss = nn.functional.cross_entropy(s_logits[:, :-1].flatten(0, 1), labels, reduction="sum")
                    total += float(loss)
                    count += batch[:, 1:].numel()
                    continue
                t_logits = teacher(input_ids=batch.to(t_dev), use_cache=False).logits.float().to(s_dev)
                t_logp = torch.log_softmax(t_logits.flatten(0, 1), dim=-1)
                s_logp = torch.log_softmax(s_logits.flatten(0, 1), dim=-1)
                total += float((t_logp.exp() * (t_logp - s_logp)).sum(dtype=torch.float64))
                count += t_logp.shape[0]
    finally:
        _restore(modes)
    return math.exp(total / count) if kind == "perplexity" else total / count


def search_shapes(
    teacher: nn.Module,
    target: Any,
    data: TextSource | torch.Tensor | Calibration | None = REQUIRED,
    *,
    tokenizer: Any = None,
    train_data: TextSource | torch.Tensor,
    strategy: str = "width",
    plugins: PluginsArg = None,
    importance: Importance | None = None,
    config: SearchConfig | None = None,
    skip_tokens: int = 0,
    device: str | torch.device | None = None,
    calibration: CalibrationConfig | None = None,
    plan: PlanConfig | None = None,
    **renamed: Any,
) -> SearchResult:
    """Try the planner's ``config.candidates`` best shapes for ``target`` with a short distillation each, and
    return the one that scores best on held-out windows (a :class:`SearchResult`).

    ``target``: a parameter budget (``{"params": 0.5}``); an explicit shape gives one candidate. ``data``: what
    importance is scored on (text, token ids or a :class:`Calibration`, packed by ``calibration``, a
    :class:`CalibrationConfig`; may be None when ``importance`` is given), once, with the importance plugin of
    ``plugins``; ``importance``: scores computed earlier on this teacher instead. ``train_data``: text or token
    windows for the short runs; its first ``skip_tokens`` tokens are skipped (pass the calibration's token count
    when it is the calibration text), every candidate trains on the same following windows, and the score is
    computed on the ``config.eval_windows`` windows right after those. ``plan`` (a :class:`PlanConfig`) and
    ``strategy`` are the planner's; ``plugins`` are passed to every prune (a depth axis's contiguous-block search
    runs on the calibration data). ``device``: where the short runs train (default: CUDA when available; the
    teacher is moved there for the search and back afterwards). The old keywords ``calibration_config=``,
    ``plan_config=`` and ``calibration=<data>`` still work for one release, with a :class:`DeprecationWarning`.

    The teacher comes back as it came in (weights, train/eval mode, device, ``requires_grad``); each candidate
    is a pruned copy, freed once scored. Bad input (arguments, config, target, plugins, data too short for the
    short runs plus the held-out windows, a tokenizer of another model, scores of the wrong shape) raises a
    :class:`~compress.errors.CompressError` subclass before any model runs.
    """
    t_start = time.perf_counter()
    args = resolve_keywords("search_shapes", data, calibration, plan, renamed)
    config = _check_search_args(teacher, strategy, plugins, importance, config, skip_tokens, device, args)
    planned = plan_for(teacher, target, strategy, args.plan, candidates=config.candidates)
    search = _prepare(
        teacher, planned, strategy, plugins, importance, config, tokenizer, args, train_data, skip_tokens, device
    )
    return _result(search, _run_search(search, importance), t_start)


@dataclass
class _Search:
    """What every candidate of one search shares: the teacher and its plan, the arguments passed on to each
    prune, and the data (calibration windows, training windows, held-out windows)."""

    teacher: nn.Module
    planned: ModelPlan
    strategy: str
    plugins: PluginsArg
    config: SearchConfig
    tokenizer: Any
    args: Keywords
    calib: Calibration | None
    train: torch.Tensor
    held: torch.Tensor
    data_info: dict
    importance_plugin: tuple[str, Any]
    device: torch.device


@dataclass
class _Outcome:
    """What the candidates' runs gave: the candidates, the scores they were pruned with, the teacher's held-out
    perplexity, and the seconds and tokens importance scoring took (0 when the scores were given)."""

    candidates: list[Candidate]
    importance: Importance
    teacher_perplexity: float
    seconds_importance: float
    calibration_tokens: int


def _check_search_args(
    teacher: Any,
    strategy: Any,
    plugins: Any,
    importance: Any,
    config: Any,
    skip_tokens: Any,
    device: Any,
    args: Keywords,
) -> SearchConfig:
    """Refuse bad arguments and a teacher the search cannot use, before any work; returns the checked config."""
    config = SearchConfig() if config is None else config
    if not isinstance(config, SearchConfig):
        raise ConfigError(
            f"config should be a compress.pruning.search.SearchConfig, got {type(config).__name__}"
            + ("; build one: SearchConfig(**your_dict)" if isinstance(config, dict) else "")
        )
    config.validate()
    check_prune_args(
        teacher,
        strategy=strategy,
        plugins=plugins,
        calibration=args.calibration,
        plan=args.plan,
        importance=importance,
        spelled=args.spelled,
    )
    if isinstance(skip_tokens, bool) or not isinstance(skip_tokens, int) or skip_tokens < 0:
        raise ConfigError(f"skip_tokens should be a non-negative integer, got {skip_tokens!r}")
    check_device(device)
    if find_adapter(teacher) is None:
        raise UnsupportedModelError(
            f"the shape search needs an adapter for {getattr(teacher.config, 'model_type', type(teacher).__name__)!r} "
            "(its candidates are planned over heads, hidden channels and layers); prune families without one with "
            "compress.prune(..., strategy='width') directly"
        )
    check_plain_logits(teacher, layout_for(teacher))
    check_finite_weights(teacher, "teacher")
    return config


def _prepare(
    teacher: nn.Module,
    planned: ModelPlan,
    strategy: str,
    plugins: PluginsArg,
    importance: Importance | None,
    config: SearchConfig,
    tokenizer: Any,
    args: Keywords,
    train_data: TextSource | torch.Tensor,
    skip_tokens: int,
    device: str | torch.device | None,
) -> _Search:
    """Resolve the plugins every candidate needs, check the tokenizer and precomputed scores, prepare the
    calibration, training and held-out windows, and pick the device of the short runs — all before any model
    runs."""
    needed_axes = sorted({axis for plan in planned.plans for axis in changed_axes(planned.shape, plan.shape)})
    _, axes = resolve_plugins(plugins, needed_axes)  # unknown plugins and bad plugin configs, now
    block_search = "depth" in axes and getattr(axes["depth"].config, "method", None) == "contiguous_block"
    importance_plugin = _importance_plugin(plugins)
    rows = embedding_rows(teacher)
    if tokenizer is not None:
        check_tokenizer_matches(teacher, tokenizer)
    if importance is not None:
        check_importance(importance, planned.shape)
    calib = None
    if args.data is not None:
        calib = prepare_calibration(teacher, tokenizer, args.data, args.calibration or CalibrationConfig())
    elif importance is None or block_search:
        raise ConfigError(
            "calibration is None, but "
            + (
                "the depth axis's contiguous-block search runs on it"
                if importance is not None
                else "no importance= scores were given: the search scores importance on calibration data"
            )
            + "; pass calibration text or token windows"
        )
    train, held, data_info = _split_data(train_data, tokenizer, config, skip_tokens, rows)
    run_device = distributed.resolve_device(device)
    return _Search(
        teacher,
        planned,
        strategy,
        plugins,
        config,
        tokenizer,
        args,
        calib,
        train,
        held,
        data_info,
        importance_plugin,
        run_device,
    )


def _run_search(search: _Search, importance: Importance | None) -> _Outcome:
    """Score importance (unless given), then try every planned shape, with the teacher moved to the search's
    device and given back where and as it was (train/eval modes included), whatever happens."""
    teacher, config = search.teacher, search.config
    homes = {p.device for p in teacher.parameters()} | {b.device for b in teacher.buffers()}
    moved = len(homes) == 1 and next(iter(homes)) != search.device
    modes = _modes(teacher)
    candidates: list[Candidate] = []
    seconds_importance = 0.0
    try:
        if moved:
            teacher.to(search.device)
        if importance is None:
            assert search.calib is not None  # refused before without calibration when importance is None
            t = time.perf_counter()
            name, plugin_config = search.importance_plugin
            importance = score_importance(
                teacher,
                search.calib,
                tokenizer=search.tokenizer,
                plugin=name,
                config=plugin_config,
                calibration=search.args.calibration,
            )
            seconds_importance = time.perf_counter() - t
            calibration_tokens = search.calib.num_tokens
        else:
            calibration_tokens = 0
        teacher_ppl = _score_windows(teacher, teacher, search.held, "perplexity")
        bar = progress_bar(total=len(search.planned.plans), desc="shape search", unit="candidate", show=config.progress)
        try:
            for i, plan in enumerate(search.planned.plans):
                candidates.append(_try(search, plan, i, importance))
                done = [c.score for c in candidates if c.score is not None]
                if done:
                    last = candidates[-1].score
                    bar.set_postfix(best=f"{min(done):.4f}", last="failed" if last is None else f"{last:.4f}")
                bar.update(1)
        finally:
            bar.close()
    finally:
        if moved:
            teacher.to(next(iter(homes)))
        _restore(modes)
    return _Outcome(candidates, importance, teacher_ppl, seconds_importance, calibration_tokens)


def _result(search: _Search, outcome: _Outcome, t_start: float) -> SearchResult:
    """The :class:`SearchResult`: the best candidate by score (the planner's rank breaks ties), refused with a
    :class:`DistillError` when every candidate's short distillation failed."""
    candidates, calibration_tokens = outcome.candidates, outcome.calibration_tokens
    ok = [i for i, c in enumerate(candidates) if c.score is not None and math.isfinite(c.score)]
    if not ok:
        raise DistillError(
            "every candidate's short distillation failed: " + "; ".join(f"{c.shape}: {c.error}" for c in candidates)
        )
    best = min(ok, key=lambda i: (candidates[i].score, i))
    training = sum(c.distill_tokens for c in candidates)
    return SearchResult(
        best_shape=dict(candidates[best].shape),
        best=best,
        score=search.config.score,
        candidates=candidates,
        target=search.planned.target.requested,
        strategy=search.strategy,
        params_before=search.planned.params,
        teacher_perplexity=outcome.teacher_perplexity,
        importance=outcome.importance.method,
        tokens={
            "calibration": calibration_tokens,
            "training": training,
            "held_out": search.held.numel(),
            "total": calibration_tokens + training,
        },
        data=search.data_info,
        seconds=round(time.perf_counter() - t_start, 2),
        seconds_importance=round(outcome.seconds_importance, 2),
        config=search.config.to_dict(),
        scores=outcome.importance,
    )


def _try(search: _Search, plan: Plan, rank: int, importance: Importance) -> Candidate:
    """Prune a copy of the teacher to ``plan``'s shape, score it, distill it briefly, score it again."""
    config, teacher, held = search.config, search.teacher, search.held
    assert config.distill is not None  # set by SearchConfig.validate()
    t = time.perf_counter()
    student = copy.deepcopy(teacher)
    try:
        report = prune(
            student,
            shape_target(plan.shape),
            search.calib,
            strategy=search.strategy,
            plugins=search.plugins,
            importance=importance,
            plan=search.args.plan,
        )
        score_before = _score_windows(student, teacher, held, config.score)
        error, score, d = None, None, None
        try:
            d = distill(
                student,
                teacher,
                search.train,
                config.distill,
                tokenizer=search.tokenizer,
                kept_layers=report.kept.get("layers"),
                kept_hidden=report.kept.get("hidden"),
                device=search.device,
                keep_weights_for_errors=False,
            )
        except DistillError as exc:  # a diverged candidate loses; the others still count
            error = str(exc)
        if d is not None:
            score = _score_windows(student, teacher, held, config.score)
        weights = (search.args.plan or PlanConfig()).weights
        return Candidate(
            rank=rank,
            shape=shape_target(plan.shape),
            params=plan.params,
            damage_cost=round(damage_cost(search.planned.shape, plan.shape, weights), 6),
            score_before=score_before,
            score=score,
            distill_tokens=d.tokens if d else 0,
            distill_steps=d.steps if d else 0,
            final_loss=d.final_loss if d else None,
            seconds=round(time.perf_counter() - t, 2),
            error=error,
        )
    finally:
        del student
        gc.collect()
        if search.device.type == "cuda":
            torch.cuda.empty_cache()
