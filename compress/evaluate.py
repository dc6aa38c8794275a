"""Evaluation: standard perplexity over non-overlapping windows."""

from __future__ import annotations

import math

import torch
from torch import nn

from .calibrate import check_tokenizer_matches
from .data import TextSource, pack_tokens


def eval_windows(tokenizer, text_or_path: TextSource, seq_len: int, max_tokens: int | None) -> torch.Tensor:
    """The first ``max_tokens`` tokens (all with None) of held-out text as non-overlapping windows."""
    windows = None if max_tokens is None else max(1, max_tokens // seq_len)
    return pack_tokens(tokenizer, text_or_path, seq_len, max_windows=windows)


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
    so numbers are comparable across runs); ``None`` evaluates everything.
    """
    check_tokenizer_matches(model, tokenizer)
    ids = eval_windows(tokenizer, text_or_path, seq_len, max_tokens)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    with torch.inference_mode():
        for batch in ids.split(batch_size):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits.float()
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            nll += float(loss)
            count += batch[:, 1:].numel()
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
    from .distill.losses import divergence

    check_tokenizer_matches(student, tokenizer)
    ids = eval_windows(tokenizer, text_or_path, seq_len, max_tokens)
    device = next(student.parameters()).device
    total, count = 0.0, 0
    modes = student.training, teacher.training
    student.eval()
    teacher.eval()
    with torch.inference_mode():
        for batch in ids.split(batch_size):
            batch = batch.to(device)
            s = student(input_ids=batch, use_cache=False).logits.float().flatten(0, 1)
            t = teacher(input_ids=batch.to(next(teacher.parameters()).device), use_cache=False).logits.float()
            total += float(divergence(s, t.flatten(0, 1).to(device)))
            count += s.shape[0]
    student.train(modes[0])
    teacher.train(modes[1])
    return total / count
