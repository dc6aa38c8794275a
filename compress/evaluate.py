"""Evaluation: standard perplexity over non-overlapping windows."""

from __future__ import annotations

import math

import torch
from torch import nn

from .data import TextSource, pack_tokens
from .errors import ConfigError
from .progress import bar
from .validate import check_token_ids, check_tokenizer_matches, embedding_rows


def _check_args(seq_len, max_tokens, batch_size) -> None:
    """Refuse bad numeric arguments before any work, naming the value."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ConfigError(
            f"seq_len should be an integer of at least 2 (a window needs a token to predict from "
            f"and one to predict), got seq_len={seq_len!r}"
        )
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ConfigError(
            f"max_tokens should be a positive integer, or None to evaluate everything, got max_tokens={max_tokens!r}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size should be a positive integer, got batch_size={batch_size!r}")


def eval_windows(tokenizer, text_or_path: TextSource, seq_len: int, max_tokens: int | None) -> torch.Tensor:
    """The first ``max_tokens`` tokens (all with None) of held-out text as non-overlapping windows."""
    _check_args(seq_len, max_tokens, 1)
    windows = None if max_tokens is None else max(1, max_tokens // seq_len)
    return pack_tokens(tokenizer, text_or_path, seq_len, max_windows=windows)


def _model_rows(model: nn.Module) -> int:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model should be a torch.nn.Module (a causal LM), got {type(model).__name__}")
    return embedding_rows(model)


def perplexity(
    model: nn.Module,
    tokenizer,
    text_or_path: TextSource,
    seq_len: int = 512,
    max_tokens: int | None = 4096,
    batch_size: int = 4,
) -> float:
    """Perplexity of ``model`` on ``text_or_path`` split into non-overlapping windows of ``seq_len`` tokens.

    Each window is scored independently (no context carried across windows); the result is
    ``exp(total next-token NLL / predicted tokens)``. ``max_tokens`` caps the text read (the first tokens are used,
    so numbers are comparable across runs); ``None`` evaluates everything. Bad arguments (``seq_len`` below 2,
    ``max_tokens`` or ``batch_size`` below 1), a tokenizer that does not fit the model and unreadable data are
    refused before the model runs; the model's train/eval mode is restored whatever happens.
    """
    _check_args(seq_len, max_tokens, batch_size)
    rows = _model_rows(model)
    check_tokenizer_matches(model, tokenizer)
    ids = eval_windows(tokenizer, text_or_path, seq_len, max_tokens)
    check_token_ids(ids, rows, "the evaluation text's token ids")
    return windows_perplexity(model, ids, batch_size)


def windows_perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Perplexity of ``model`` on token windows ``[n, seq_len]`` (e.g. from :func:`eval_windows`), each scored
    independently: ``exp(total next-token NLL / predicted tokens)``. The model runs where it is, in its dtype;
    its train/eval mode is restored whatever happens."""
    windows = torch.as_tensor(windows, dtype=torch.long)
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ConfigError(f"windows should be token ids of shape [n, seq_len >= 2], got {tuple(windows.shape)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        with torch.inference_mode():
            for batch in bar(windows.split(batch_size), desc="perplexity", unit="batch"):
                batch = batch.to(device)
                logits = model(input_ids=batch, use_cache=False).logits.float()
                loss = nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
                )
                nll += float(loss)
                count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(nll / count)


def kl_to_teacher(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer,
    text_or_path: TextSource,
    seq_len: int = 512,
    max_tokens: int | None = 4096,
    batch_size: int = 4,
) -> float:
    """Mean per-token KL(teacher || student) over non-overlapping windows of held-out text: how faithfully the
    student reproduces the teacher's next-token distributions (0 = identical)."""
    from .distillation.losses import divergence

    _check_args(seq_len, max_tokens, batch_size)
    rows = _model_rows(student)
    _model_rows(teacher)
    check_tokenizer_matches(student, tokenizer)
    check_tokenizer_matches(teacher, tokenizer)
    ids = eval_windows(tokenizer, text_or_path, seq_len, max_tokens)
    check_token_ids(ids, rows, "the evaluation text's token ids")
    device = next(student.parameters()).device
    total, count = 0.0, 0
    modes = student.training, teacher.training
    student.eval()
    teacher.eval()
    try:
        with torch.inference_mode():
            for batch in bar(ids.split(batch_size), desc="KL to teacher", unit="batch"):
                batch = batch.to(device)
                s = student(input_ids=batch, use_cache=False).logits.float().flatten(0, 1)
                t = teacher(input_ids=batch.to(next(teacher.parameters()).device), use_cache=False).logits.float()
                total += float(divergence(s, t.flatten(0, 1).to(device)))
                count += s.shape[0]
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    return total / count
