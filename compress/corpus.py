"""Teacher-made training text: a black-box corpus of the teacher's own generations, and MiniPLM-style
difference sampling that keeps the documents the teacher knows better than a reference model.

Both write JSON lines with a ``text`` field, which :func:`compress.data.iter_text` reads, so either output can be
passed straight to :func:`compress.distill` (or ``compress.compress``) as data.

* :func:`generate_corpus` samples the teacher's continuations (or chat answers) of prompts. It is resumable: lines
  are appended and fsynced per batch, each batch is sampled from a seed derived from ``(seed, batch)``, so a run
  killed and resumed writes the same file as one that was never interrupted.
* :func:`prompts_from_documents` cuts training text into prompts of a fixed number of tokens.
* :func:`select_by_difference` scores documents by ``mean log p_teacher - mean log p_reference`` (MiniPLM's
  difference sampling, Gu et al. 2024) and keeps the top fraction, in their original order.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import torch
from torch import nn

from .data import (
    TEXT_FIELD,
    TextSource,
    as_path,
    check_text_file,
    derived_seed,
    describe_source,
    iter_jsonl_rows,
    iter_text,
    pack_tokens,
)
from .errors import ConfigError, DataError, OutputExistsError
from .io import write_text_atomic
from .progress import bar as progress_bar
from .validate import check_tokenizer_matches

PromptSource = str | os.PathLike | Sequence[str]
META_SUFFIX = ".meta.json"
META_FORMAT = "compress-corpus/1"
PROMPT_FIELDS = ("prompt", TEXT_FIELD)


# --------------------------------------------------------------------------------------------------- reports


@dataclass
class CorpusReport:
    """What one :func:`generate_corpus` call did. ``generated`` counts lines written by this call, ``skipped``
    lines a previous run had written already; ``completion_tokens`` and ``tokens_per_second`` are this call's."""

    prompts: int
    generated: int
    skipped: int
    completion_tokens: int
    seconds: float
    tokens_per_second: float
    out_path: str
    meta_path: str
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"corpus {self.out_path}: {self.generated} completions generated, {self.skipped} already there "
            f"({self.prompts} prompts), {self.completion_tokens} tokens in {self.seconds:.1f}s "
            f"({self.tokens_per_second:.1f} tokens/s)"
        )


@dataclass
class SelectionReport:
    """What :func:`select_by_difference` scored and kept. ``scores`` (one per scored document, in source order)
    and ``kept_indices`` (positions in that order) are left out of :meth:`to_dict`, which stays small."""

    documents: int
    kept: int
    skipped_short: int
    keep_fraction: float
    threshold: float | None
    mean_kept: float | None
    mean_dropped: float | None
    seq_len: int
    seconds: float
    out_path: str | None
    source: str
    scores: list[float] = field(default_factory=list, repr=False)
    kept_indices: list[int] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        out = asdict(self)
        del out["scores"], out["kept_indices"]
        return out

    def __str__(self) -> str:
        def fmt(v: float | None) -> str:
            return "n/a" if v is None else f"{v:+.4f}"

        return (
            f"kept {self.kept} of {self.documents} documents (keep_fraction={self.keep_fraction}; "
            f"{self.skipped_short} shorter than 2 tokens skipped), threshold {fmt(self.threshold)}, mean score "
            f"kept {fmt(self.mean_kept)} vs dropped {fmt(self.mean_dropped)}, {self.seconds:.1f}s"
            + (f" -> {self.out_path}" if self.out_path else "")
        )


# ---------------------------------------------------------------------------------------------- small helpers


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} should be a positive integer, got {name}={value!r}")


def _model_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _check_model(model: object, name: str) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{name} should be a torch.nn.Module (a Hugging Face causal LM), got {type(model).__name__}")


def _model_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "")


def _batch_seed(seed: int, batch: int) -> int:
    """A 63-bit seed for batch ``batch`` of a run seeded ``seed``: independent of every other batch, so any batch
    can be regenerated alone (which is what makes a resumed run match an uninterrupted one)."""
    return derived_seed("compress-corpus", seed, batch)


# ---------------------------------------------------------------------------------------------------- prompts


def _prompts_from_rows(rows: Iterable[object], where: str) -> list[str]:
    prompts: list[str] = []
    for position, row in enumerate(rows):
        if isinstance(row, dict):
            text = next((row[k] for k in PROMPT_FIELDS if isinstance(row.get(k), str)), None)
            if text is None:
                raise DataError(
                    f"{where}[{position}] has no string field 'prompt' or 'text' (its keys: {list(row)[:5]})"
                )
            row = text
        if not isinstance(row, str):
            raise DataError(f"{where}[{position}] is a {type(row).__name__}, not a str: every prompt must be text")
        if not row.strip():
            raise DataError(
                f"{where}[{position}] is an empty prompt; remove it (the teacher needs something to continue)"
            )
        prompts.append(row)
    return prompts


def _read_prompt_file(path: Path, given: str | os.PathLike) -> list[str]:
    check_text_file(path, given)
    prompts: list[str] = []
    if path.suffix == ".jsonl":
        for number, row in iter_jsonl_rows(path):
            text = (
                next((row[k] for k in PROMPT_FIELDS if isinstance(row.get(k), str)), None)
                if isinstance(row, dict)
                else None
            )
            if text is None or not text.strip():
                raise DataError(
                    f"{path}:{number} has no non-empty string field 'prompt' (or 'text'); each line "
                    'must be {"prompt": "..."}'
                )
            prompts.append(text)
    else:
        with path.open(encoding="utf-8-sig") as fh:
            prompts = [line.rstrip("\r\n") for line in fh if line.strip()]
    return prompts


def load_prompts(prompts: PromptSource) -> list[str]:
    """Prompts as a list of strings: a list (or other iterable) of strings or ``{"prompt": ...}`` rows as they
    are, or a path to a text file (one prompt per non-empty line) or a ``.jsonl`` file (a ``prompt`` or ``text``
    field per line). A single string must name a file; to pass one prompt, give a one-item list."""
    if isinstance(prompts, (str, os.PathLike)):
        path = as_path(prompts)
        if path is None:
            path = Path(prompts)  # a string that does not look like a path is still refused as a missing file
        if not path.exists():
            raise DataError(
                f"prompts file {str(prompts)!r} does not exist; pass the path of a text file (one prompt "
                "per line) or a .jsonl file with a 'prompt' field, or a list of prompt strings"
            )
        result = _read_prompt_file(path, prompts)
        where = str(prompts)
    elif isinstance(prompts, (bytes, bytearray)) or not isinstance(prompts, Iterable) or isinstance(prompts, dict):
        raise DataError(
            f"prompts should be a list of strings or the path of a prompts file, got {type(prompts).__name__}"
        )
    else:
        result = _prompts_from_rows(prompts, "prompts")
        where = "prompts"
    if not result:
        raise DataError(f"{where} holds no prompts; give at least one non-empty prompt")
    return result


def prompts_from_documents(
    source: TextSource, tokenizer, *, prompt_tokens: int = 64, max_prompts: int | None = None, skip_tokens: int = 0
) -> list[str]:
    """Cut ``source`` (anything :func:`compress.data.iter_text` reads) into consecutive prompts of ``prompt_tokens``
    tokens, after skipping ``skip_tokens`` tokens, decoded back to text — prompts for :func:`generate_corpus` that
    come from the training distribution.

    Tokenization and packing are :func:`compress.data.pack_tokens`'s (documents joined by EOS, which is dropped on
    decoding), so ``skip_tokens`` means the same here as elsewhere in the library. A window may start or end inside
    a word; windows that decode to whitespace only are dropped."""
    if isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int) or prompt_tokens < 2:
        raise ConfigError(f"prompt_tokens should be an integer of at least 2, got prompt_tokens={prompt_tokens!r}")
    if max_prompts is not None:
        _positive_int("max_prompts", max_prompts)
    windows = pack_tokens(tokenizer, source, prompt_tokens, max_windows=max_prompts, skip_tokens=skip_tokens)
    texts = tokenizer.batch_decode(windows.tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return [t for t in texts if t.strip()]


# -------------------------------------------------------------------------------------------- generate_corpus


def _check_generation_args(max_new_tokens, batch_size, do_sample, temperature, top_p, seed) -> None:
    _positive_int("max_new_tokens", max_new_tokens)
    _positive_int("batch_size", batch_size)
    if not isinstance(do_sample, bool):
        raise ConfigError(f"do_sample should be True or False, got do_sample={do_sample!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed should be a non-negative integer, got seed={seed!r}")
    if do_sample:
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not temperature > 0
            or not math.isfinite(temperature)
        ):
            raise ConfigError(
                f"temperature should be a positive number when sampling, got temperature={temperature!r}"
                "; for greedy decoding pass do_sample=False"
            )
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ConfigError(f"top_p should lie in (0, 1] (1 turns nucleus sampling off), got top_p={top_p!r}")


def _chat_texts(tokenizer, prompts: list[str]) -> list[str]:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "chat=True needs a tokenizer with a chat_template (an instruct model's tokenizer); this one "
            "has none. Pass chat=False to generate plain continuations, or the instruct tokenizer"
        )
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def _tokenize_prompts(tokenizer, prompts: list[str], chat: bool) -> list[list[int]]:
    if chat:
        texts, special = _chat_texts(tokenizer, prompts), False  # the template writes its own special tokens
    else:
        texts, special = prompts, True  # as model.generate(**tokenizer(prompt)) would see it (BOS where due)
    ids = [list(tokenizer(t, add_special_tokens=special)["input_ids"]) for t in texts]
    for i, row in enumerate(ids):
        if not row:
            raise DataError(f"prompts[{i}] ({prompts[i][:40]!r}) gives no tokens; remove it")
    return ids


def _eos_ids(gen_config, tokenizer) -> set[int]:
    eos = getattr(gen_config, "eos_token_id", None)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None:
        eos.append(tokenizer.eos_token_id)
    return {int(e) for e in eos}


def _settings(
    teacher, tokenizer, prompts, max_new_tokens, batch_size, do_sample, temperature, top_p, seed, chat
) -> dict:
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(p.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return {
        "teacher": _model_name(teacher),
        "teacher_class": type(teacher).__name__,
        "tokenizer": f"{type(tokenizer).__name__} ({len(tokenizer)} tokens)",
        "prompts": len(prompts),
        "prompts_sha256": digest.hexdigest(),
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,  # the batch's padding and shared random stream shape each line
        "do_sample": do_sample,
        "temperature": float(temperature) if do_sample else None,
        "top_p": float(top_p) if do_sample else None,
        "top_k": 0 if do_sample else None,  # sampling is temperature + nucleus only
        "seed": seed,
        "chat": chat,
    }


def _meta_path(out: Path) -> Path:
    return out.with_name(out.name + META_SUFFIX)


def _read_done(out: Path, prompts: list[str]) -> tuple[int, int]:
    """(lines a previous run wrote completely, their length in bytes). A last line a kill cut short (no newline,
    or not JSON) is not counted; earlier bad lines, or lines that do not match the prompts, are refused."""
    raw = out.read_bytes()
    lines = raw.split(b"\n")
    done, good_bytes = 0, 0
    complete = lines[:-1]  # the part after the last newline is empty, or a line a kill cut short
    for number, line in enumerate(complete, 1):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            if number == len(complete) and not lines[-1]:
                break  # the last line is damaged: regenerate it
            raise DataError(
                f"{out}:{number} is not valid JSON ({exc}); the corpus file is damaged. Delete it (and "
                f"{_meta_path(out).name}) to start over"
            ) from None
        if not isinstance(row, dict) or row.get("id") != done:
            held = row.get("id") if isinstance(row, dict) else row
            raise DataError(
                f"{out}:{number} should hold id {done} but holds {held!r}: the file was not written by "
                "one generate_corpus run. Delete it to start over"
            )
        if done >= len(prompts) or row.get("prompt") != prompts[done]:
            raise ConfigError(
                f"{out}:{number} holds a different prompt than prompts[{done}]: these are not the "
                "prompts this corpus was generated from. Pass the same prompts, or another out_path"
            )
        done += 1
        good_bytes += len(line) + 1
    return done, good_bytes


def _prepare_output(out: Path, settings: dict, resume: bool, prompts: list[str]) -> int:
    """Check ``out`` against this call before any generation; returns how many lines are already done."""
    meta = _meta_path(out)
    if out.is_dir():
        raise OutputExistsError(
            f"out_path {str(out)!r} is a directory; give a file path such as {str(out / 'corpus.jsonl')!r}"
        )
    if not out.exists():
        return 0
    if not resume:
        raise OutputExistsError(
            f"{str(out)!r} exists; pass resume=True to continue it (with the same settings), or "
            "another out_path, or delete it to start over"
        )
    if not meta.is_file():
        if out.stat().st_size == 0:
            return 0
        raise OutputExistsError(
            f"{str(out)!r} exists but has no {meta.name}: it was not written by generate_corpus "
            "(or its meta file was deleted), so it cannot be resumed safely. Give another out_path "
            "or delete it"
        )
    try:
        saved = json.loads(meta.read_text(encoding="utf-8"))["settings"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{meta} is not a readable corpus meta file ({exc}); delete {out.name} and its meta file to start over"
        ) from None
    current = json.loads(json.dumps(settings))
    differ = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if differ:
        detail = "; ".join(f"{k}: {saved.get(k)!r} there, {current.get(k)!r} now" for k in differ)
        raise ConfigError(
            f"{str(out)!r} was generated with other settings ({detail}). Resume with the same "
            "settings, or give another out_path (or resume=False and a new file) to start a new corpus"
        )
    done, good_bytes = _read_done(out, prompts)
    if good_bytes != out.stat().st_size:
        os.truncate(out, good_bytes)  # drop a line a kill cut short; it is regenerated
    return done


def generate_corpus(
    teacher: nn.Module,
    prompts: PromptSource,
    out_path: str | os.PathLike,
    *,
    tokenizer,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    do_sample: bool = True,
    temperature: float = 0.7,
    top_p: float = 0.95,
    seed: int = 0,
    chat: bool = False,
    resume: bool = True,
    progress: bool = True,
) -> CorpusReport:
    """Write the teacher's completions of ``prompts`` to ``out_path`` as JSON lines
    ``{"id", "prompt", "completion", "text": prompt + completion}`` — a black-box distillation corpus that
    :func:`compress.distill` reads as data (its ``text`` field).

    ``chat=True`` wraps each prompt as a user turn with the tokenizer's chat template and records the answer.
    Sampling is temperature + nucleus (``top_k`` off); ``do_sample=False`` is greedy. Batch ``b`` is sampled from a
    seed derived from ``(seed, b)``, with the global RNG left as it was. Settings go to ``<out_path>.meta.json``;
    lines are appended and fsynced per batch, so a killed run loses at most one batch, and with ``resume=True``
    a rerun with the same settings continues where it stopped and writes the same file an uninterrupted run would.

    Refused before any generation: no prompts, a missing prompts file, non-positive ``max_new_tokens`` /
    ``batch_size``, ``temperature <= 0`` or ``top_p`` outside (0, 1] when sampling, ``chat=True`` without a chat
    template, an existing file with ``resume=False`` (:class:`OutputExistsError`) or with other settings
    (:class:`ConfigError`). The caller's tokenizer is not modified; the teacher's train/eval mode is restored.
    """
    _check_model(teacher, "teacher")
    if not callable(getattr(teacher, "generate", None)):
        raise ConfigError(f"teacher ({type(teacher).__name__}) has no generate(); pass a Hugging Face causal LM")
    _check_generation_args(max_new_tokens, batch_size, do_sample, temperature, top_p, seed)
    if not isinstance(out_path, (str, os.PathLike)) or not str(out_path):
        raise ConfigError(f"out_path should be a file path, got {out_path!r}")
    check_tokenizer_matches(teacher, tokenizer)
    prompt_list = load_prompts(prompts)
    prompt_ids = _tokenize_prompts(tokenizer, prompt_list, chat)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ConfigError(
            "the tokenizer has neither a pad token nor an EOS token to pad batches with; set tokenizer.pad_token first"
        )

    out = Path(out_path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = _settings(
        teacher, tokenizer, prompt_list, max_new_tokens, batch_size, do_sample, temperature, top_p, seed, chat
    )
    done = _prepare_output(out, settings, resume, prompt_list)
    meta = _meta_path(out)
    if done == 0:
        from .version import __version__

        write_text_atomic(
            meta,
            json.dumps({"format": META_FORMAT, "settings": settings, "library_version": __version__}, indent=2) + "\n",
        )

    gen_config = _generation_config(teacher, max_new_tokens, do_sample, temperature, top_p, pad_id)
    eos = _eos_ids(gen_config, tokenizer)
    device = _model_device(teacher)
    n = len(prompt_list)
    batches = math.ceil(n / batch_size)
    first = done // batch_size if done < n else batches
    tokens, written = 0, 0
    start = time.perf_counter()
    was_training = teacher.training
    teacher.eval()
    try:
        with (
            open(out, "a", encoding="utf-8") as fh,
            progress_bar(total=batches, initial=first, desc="generating corpus", unit="batch", show=progress) as bar,
        ):
            for b in range(first, batches):
                ids = list(range(b * batch_size, min(n, (b + 1) * batch_size)))
                rows = _generate_batch(
                    teacher, [prompt_ids[i] for i in ids], gen_config, pad_id, eos, device, _batch_seed(seed, b)
                )
                lines = []
                for i, new in zip(ids, rows):
                    if i < done:
                        continue  # written by the run that was interrupted inside this batch
                    completion = _completion_text(tokenizer, prompt_ids[i], new, eos)
                    tokens += len(new)
                    written += 1
                    lines.append(
                        json.dumps(
                            {
                                "id": i,
                                "prompt": prompt_list[i],
                                "completion": completion,
                                "text": prompt_list[i] + completion,
                            },
                            ensure_ascii=False,
                        )
                        + "\n"
                    )
                fh.write("".join(lines))
                fh.flush()
                os.fsync(fh.fileno())
                bar.update(1)
    finally:
        teacher.train(was_training)
    seconds = time.perf_counter() - start
    return CorpusReport(
        prompts=n,
        generated=written,
        skipped=done,
        completion_tokens=tokens,
        seconds=round(seconds, 3),
        tokens_per_second=round(tokens / seconds, 2) if seconds > 0 else 0.0,
        out_path=str(out),
        meta_path=str(meta),
        settings=settings,
    )


def _generation_config(teacher, max_new_tokens, do_sample, temperature, top_p, pad_id):
    """The teacher's own generation config (its EOS ids, e.g. an instruct model's end-of-turn token), with this
    call's settings on top."""
    from transformers import GenerationConfig

    base = getattr(teacher, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    config.max_new_tokens, config.max_length = max_new_tokens, None
    config.min_new_tokens, config.min_length = None, 0
    config.pad_token_id, config.do_sample, config.num_beams = pad_id, do_sample, 1
    config.num_return_sequences = 1
    if do_sample:
        config.temperature, config.top_p, config.top_k = float(temperature), float(top_p), 0
    else:
        config.temperature = config.top_p = config.top_k = None
    return config


def _generate_batch(
    teacher, rows: list[list[int]], gen_config, pad_id: int, eos: set[int], device, seed: int
) -> list[list[int]]:
    """Left-pad ``rows``, generate, and return each row's new tokens up to and including its first EOS."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        input_ids[j, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[j, width - len(r) :] = 1
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        out = teacher.generate(
            input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=gen_config
        )
    new_tokens = out[:, width:].tolist()
    result = []
    for row in new_tokens:
        end = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
        result.append(row[:end])
    return result


def _completion_text(tokenizer, prompt_ids: list[int], new: list[int], eos: set[int]) -> str:
    """The text the new tokens add to the prompt. Decoding prompt + completion and removing the decoded prompt
    keeps a leading space that decoding the completion alone would drop (SentencePiece tokenizers)."""
    body = [t for t in new if t not in eos]
    kw = dict(skip_special_tokens=True, clean_up_tokenization_spaces=False)
    head = tokenizer.decode(prompt_ids, **kw)
    full = tokenizer.decode(list(prompt_ids) + body, **kw)
    return full[len(head) :] if full.startswith(head) else tokenizer.decode(body, **kw)


# --------------------------------------------------------------------------------------- select_by_difference


def _documents(source: TextSource, tokenizer, seq_len: int) -> Iterator[tuple[str, list[int]]]:
    """(text, the token ids it is scored on) per document.

    Documents are :func:`compress.data.iter_text` items (list items, ``.jsonl`` rows, dataset rows), each scored
    on its first ``seq_len`` tokens. A plain text file has no document boundaries (``iter_text`` reads it in
    1 MiB pieces), so it is cut into consecutive windows of ``seq_len`` tokens instead, each a document; the file
    is read at line boundaries so no word is split between pieces."""
    path = as_path(source) if isinstance(source, (str, os.PathLike)) else None
    if path is None or path.suffix in (".jsonl", ".json"):
        for text in iter_text(source):
            yield text, list(tokenizer(text, add_special_tokens=False)["input_ids"][:seq_len])
        return
    kw = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    pending: list[int] = []
    carry = ""
    for piece in iter_text(source):
        text = carry + piece
        cut = text.rfind("\n") + 1
        head, carry = (text[:cut], text[cut:]) if cut else ("", text)
        if head:
            pending.extend(tokenizer(head, add_special_tokens=False)["input_ids"])
        while len(pending) >= seq_len:
            window, pending = pending[:seq_len], pending[seq_len:]
            yield tokenizer.decode(window, **kw), window
    if carry:
        pending.extend(tokenizer(carry, add_special_tokens=False)["input_ids"])
    while pending:
        window, pending = pending[:seq_len], pending[seq_len:]
        yield tokenizer.decode(window, **kw), window


def _mean_logprobs(model: nn.Module, batch: list[list[int]]) -> list[float]:
    """Mean next-token log-probability of each row, right-padded with an attention mask; padded positions are
    neither attended to by real tokens (causal mask) nor counted, so a row's score does not depend on its batch."""
    width = max(len(r) for r in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for j, r in enumerate(batch):
        ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[j, : len(r)] = 1
    device = _model_device(model)
    ids, mask = ids.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    valid = mask[:, 1:].to(logp.dtype)
    means = (logp * valid).sum(1) / valid.sum(1)
    return means.double().cpu().tolist()


def select_by_difference(
    teacher: nn.Module,
    reference: nn.Module,
    source: TextSource,
    *,
    tokenizer,
    keep_fraction: float = 0.5,
    seq_len: int = 512,
    batch_size: int = 8,
    max_documents: int | None = None,
    out_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> SelectionReport:
    """MiniPLM's difference sampling: keep the documents of ``source`` the teacher predicts much better than
    ``reference`` (a smaller model, or the pruned student itself) — text that is neither trivial (both know it)
    nor noise (neither does), where the teacher has knowledge to pass on.

    Each document's score is ``mean log p_teacher(token) - mean log p_reference(token)`` over its first
    ``seq_len`` tokens (documents of fewer than 2 tokens are skipped; see :func:`_documents` for what a document
    is). The top ``ceil(keep_fraction * n)`` documents are kept, in their original order, and written (given
    ``out_path``) as JSON lines ``{"text", "score"}`` atomically; an existing ``out_path`` is refused
    (:class:`OutputExistsError`). ``max_documents`` caps the documents scored. Both models must fit the
    tokenizer (:class:`DataError` otherwise) and come back in their train/eval mode.
    """
    _check_model(teacher, "teacher")
    _check_model(reference, "reference")
    if isinstance(keep_fraction, bool) or not isinstance(keep_fraction, (int, float)) or not 0 < keep_fraction <= 1:
        raise ConfigError(f"keep_fraction should lie in (0, 1], got keep_fraction={keep_fraction!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ConfigError(
            f"seq_len should be an integer of at least 2 (a token to predict from and one to predict), "
            f"got seq_len={seq_len!r}"
        )
    _positive_int("batch_size", batch_size)
    if max_documents is not None:
        _positive_int("max_documents", max_documents)
    for name, model in (("teacher", teacher), ("reference", reference)):
        try:
            check_tokenizer_matches(model, tokenizer)
        except DataError as exc:
            raise DataError(
                f"{name}: {exc} (difference sampling compares both models on the same token ids, so "
                "they must share the tokenizer's vocabulary)"
            ) from None
    out = None
    if out_path is not None:
        if not isinstance(out_path, (str, os.PathLike)) or not str(out_path):
            raise ConfigError(f"out_path should be a file path or None, got {out_path!r}")
        out = Path(out_path).expanduser()
        if out.exists() or out.is_symlink():
            raise OutputExistsError(f"out_path {str(out)!r} exists; give a new file path or delete it")
        if not out.parent.is_dir():
            raise ConfigError(f"the folder of out_path {str(out)!r} does not exist; create it first")
    if isinstance(source, (str, os.PathLike)) and as_path(source) is not None:
        check_text_file(cast(Path, as_path(source)), source)  # not None: checked just above

    start = time.perf_counter()
    texts: list[str] = []
    scores: list[float] = []
    skipped = 0
    modes = teacher.training, reference.training
    teacher.eval()
    reference.eval()

    def flush(batch_texts: list[str], batch_ids: list[list[int]]) -> None:
        t = _mean_logprobs(teacher, batch_ids)
        r = _mean_logprobs(reference, batch_ids)
        texts.extend(batch_texts)
        scores.extend(a - b for a, b in zip(t, r))

    try:
        with (
            torch.inference_mode(),
            progress_bar(desc="scoring documents", unit="doc", total=max_documents, show=progress) as bar,
        ):
            pending_texts: list[str] = []
            pending_ids: list[list[int]] = []
            for text, ids in _documents(source, tokenizer, seq_len):
                if len(ids) < 2:
                    skipped += 1
                    continue
                pending_texts.append(text)
                pending_ids.append(ids)
                if len(pending_ids) == batch_size:
                    flush(pending_texts, pending_ids)
                    bar.update(len(pending_ids))
                    pending_texts, pending_ids = [], []
                if max_documents is not None and len(texts) + len(pending_ids) >= max_documents:
                    break
            if pending_ids:
                flush(pending_texts, pending_ids)
                bar.update(len(pending_ids))
    finally:
        teacher.train(modes[0])
        reference.train(modes[1])
    if not scores:
        raise DataError(f"{describe_source(source)} holds no document of at least 2 tokens to score")

    n = len(scores)
    n_keep = min(n, max(1, math.ceil(keep_fraction * n - 1e-9)))
    ranked = sorted(range(n), key=lambda i: (-scores[i], i))
    kept = sorted(ranked[:n_keep])
    dropped = ranked[n_keep:]
    if out is not None:
        _write_selection(out, [(texts[i], scores[i]) for i in kept])
    seconds = time.perf_counter() - start

    def mean(idx: list[int]) -> float | None:
        return sum(scores[i] for i in idx) / len(idx) if idx else None

    return SelectionReport(
        documents=n,
        kept=n_keep,
        skipped_short=skipped,
        keep_fraction=float(keep_fraction),
        threshold=scores[ranked[n_keep - 1]],
        mean_kept=mean(kept),
        mean_dropped=mean(dropped),
        seq_len=seq_len,
        seconds=round(seconds, 3),
        out_path=str(out) if out else None,
        source=describe_source(source),
        scores=scores,
        kept_indices=kept,
    )


def _write_selection(out: Path, rows: list[tuple[str, float]]) -> None:
    """Write the kept documents through a temporary file; link it into place so a file that appeared meanwhile
    is refused, never overwritten."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for text, score in rows:
                fh.write(json.dumps({TEXT_FIELD: text, "score": score}, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, out)  # fails if out exists: no overwrite, even of a file created while we scored
        except FileExistsError:
            raise OutputExistsError(f"out_path {str(out)!r} appeared while scoring; not overwritten") from None
        except OSError:  # a file system without hard links
            if out.exists():
                raise OutputExistsError(f"out_path {str(out)!r} appeared while scoring; not overwritten") from None
            os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)


__all__ = [
    "CorpusReport",
    "SelectionReport",
    "generate_corpus",
    "load_prompts",
    "prompts_from_documents",
    "select_by_difference",
]
