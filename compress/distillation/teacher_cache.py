"""Offline teacher logits: run the teacher once, keep its top-k per token, distill from the cache.

:func:`build_teacher_cache` runs the teacher over the distillation windows and stores, for every position that
predicts a next token (positions ``0 .. L-2`` of each ``[L]`` window), the teacher's ``top_k`` log-probabilities
at temperature 1 (after the family's :class:`~compress.distillation.losses.LogitTransform`), their token ids, and the
log of the probability mass left outside them, ``log(1 - sum(top-k p))``. :class:`TeacherCache` reads it back
for any batch of windows, and :func:`cached_logit_loss` distills a student from it with the fused, chunked
treatment of :mod:`compress.distillation.losses`: the missing mass is an explicit "everything else" bucket, so the
losses compare two proper distributions over ``k + 1`` outcomes.

Folder format (version 1)::

    out_dir/
      manifest.json              format, version, top_k, vocab_size, seq_len, windows, dtypes, shard list,
                                 fingerprints of the windows and the teacher, bytes per token, ...
      shard-00000.safetensors    windows [start, start + n) of the input, n <= shard_windows:
        logp  [n, L-1, k]  float16 (or bfloat16)  teacher log-probabilities of its top k, largest first
        idx   [n, L-1, k]  uint8 / int16 / int32   their token ids (int16 holds uint16 bit-exactly: ids >= 32768
                                                   are stored as id - 65536; read back with ``& 0xFFFF``)
        rest  [n, L-1]     float32                 log of the teacher's mass outside the top k (``-inf`` when
                                                   k == vocab size)
      shard-00001.safetensors    ...

The rest mass is computed stably, as ``logsumexp(logits outside the top k) - logsumexp(logits)``, never as
``log1p(-sum p)`` (which loses everything once the top k hold nearly all the mass). Storage per token is
``k * (2 + index bytes) + 4`` bytes: 260 bytes at k = 64 with a vocabulary below 65536.

The cache is at temperature 1 only: a temperature changes the teacher's distribution outside the top k in a way
the rest mass alone cannot reproduce, so :func:`cached_logit_loss` has no temperature argument.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import re
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, DataError, OutputExistsError
from ..io import atomic_output_dir, check_output_dir
from ..progress import bar as progress_bar
from ..validate import check_token_ids
from .losses import LogitTransform, _active

FORMAT = "compress-teacher-cache"
VERSION = 1
CACHED_LOSSES = ("forward_kl", "reverse_kl")
MANIFEST = "manifest.json"
_SHARD_RE = re.compile(r"shard-\d{5,}\.safetensors")
_STORE_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
# The smallest log-probability a float32 holds as a normal number: where the teacher gives a bucket exactly zero
# mass, reverse KL (which weighs the teacher's log-probability by the student's mass) uses this instead of -inf.
_LOG_TINY = math.log(torch.finfo(torch.float32).tiny)
_FINGERPRINT_SAMPLE = 65536  # elements per weight tensor that enter the teacher's fingerprint


# ----------------------------------------------------------------------------------------------- fingerprints


def windows_fingerprint(windows: torch.Tensor) -> str:
    """``sha256:<hex>`` of the windows' shape and their ids as int64 (so int32 and int64 copies agree)."""
    t = windows.detach().to("cpu", torch.int64).contiguous()
    h = hashlib.sha256(f"windows {tuple(t.shape)}\n".encode())
    # ndarray has the buffer protocol; numpy's stubs declare __buffer__ for Python >= 3.12 only
    h.update(t.numpy())  # type: ignore[arg-type]
    return "sha256:" + h.hexdigest()


def teacher_fingerprint(teacher: nn.Module) -> str:
    """``sha256:<hex>`` of the teacher's class, model type and vocabulary, and of every weight tensor's name,
    shape and up to 65536 evenly spaced elements rounded to bfloat16.

    Rounding makes a bf16 copy and an fp32 copy of the same weights agree (the cache is the same teacher's
    either way, within bf16 noise); any training step changes many sampled elements even in bf16, and a pruned
    or another model changes names or shapes."""
    config = getattr(teacher, "config", None)
    h = hashlib.sha256()
    h.update(
        f"{type(teacher).__name__} {getattr(config, 'model_type', None)} "
        f"{getattr(config, 'vocab_size', None)}\n".encode()
    )
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if p.device.type == "meta":
                raise DataError(f"the teacher has weights on the meta device ({name}): load its weights first")
            flat = p.detach().reshape(-1)
            step = max(1, -(-flat.numel() // _FINGERPRINT_SAMPLE))
            sample = flat[::step]
            if sample.is_floating_point():
                sample = sample.to(torch.bfloat16).view(torch.int16)
            h.update(f"{name} {tuple(p.shape)} {sample.numel()}\n".encode())
            h.update(sample.to("cpu").contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


# ----------------------------------------------------------------------------------------------- building


@dataclass
class CacheReport:
    """What :func:`build_teacher_cache` wrote: ``tokens`` cached positions (``windows × (seq_len - 1)``),
    ``bytes`` on disk (shards and manifest), ``bytes_per_token`` = ``bytes / tokens``,
    ``payload_bytes_per_token`` = ``top_k × (value + index bytes) + 4`` (the tensors alone), and the speed."""

    path: str
    windows: int
    tokens: int
    shards: int
    top_k: int
    vocab_size: int
    bytes: int
    bytes_per_token: float
    payload_bytes_per_token: int
    seconds: float
    tokens_per_second: float

    def to_dict(self) -> dict:
        return asdict(self)


def _index_storage(vocab: int) -> tuple[str, torch.dtype]:
    """(logical dtype, stored dtype) of the token ids: the smallest unsigned type holding ``0 .. vocab-1``;
    uint16 is stored as int16 (same bits) so that any safetensors reader loads it."""
    if vocab <= 256:
        return "uint8", torch.uint8
    if vocab <= 65536:
        return "uint16", torch.int16
    return "int32", torch.int32


def _encode_ids(idx: torch.Tensor, logical: str, stored: torch.dtype) -> torch.Tensor:
    if logical == "uint16":  # ids 32768..65535 become their two's-complement int16 (the same 16 bits)
        return torch.where(idx >= 32768, idx - 65536, idx).to(stored)
    return idx.to(stored)


def _decode_ids(raw: torch.Tensor, logical: str) -> torch.Tensor:
    ids = raw.to(torch.int64)
    return ids.bitwise_and_(0xFFFF) if logical == "uint16" else ids


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} should be an integer >= {low}, got {value!r}")
    return value


def _store_dtype(dtype) -> tuple[str, torch.dtype]:
    if isinstance(dtype, torch.dtype):
        names = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
        if dtype in names:
            return names[dtype], dtype
    elif isinstance(dtype, str) and dtype.lower() in _STORE_DTYPES:
        stored = _STORE_DTYPES[dtype.lower()]
        return ("float16" if stored == torch.float16 else "bfloat16"), stored
    raise ConfigError(f"dtype should be 'float16' or 'bfloat16' (how the log-probabilities are stored), got {dtype!r}")


def _is_own_cache(folder: Path) -> bool:
    """True when every entry of ``folder`` is a file a teacher cache writes, and its manifest says so."""
    try:
        entries = list(folder.iterdir())
        if not any(e.name == MANIFEST for e in entries):
            return False
        if any(not e.is_file() or not (e.name == MANIFEST or _SHARD_RE.fullmatch(e.name)) for e in entries):
            return False
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_cache_dir(out_dir, overwrite: bool) -> None:
    """The rules of :func:`compress.io.check_output_dir`, and one more: ``overwrite=True`` replaces only an
    earlier teacher cache, never a folder holding files the cache did not write."""
    check_output_dir(out_dir, overwrite)
    real = Path(out_dir).resolve()
    if overwrite and real.is_dir() and any(real.iterdir()) and not _is_own_cache(real):
        raise OutputExistsError(
            f"output folder {str(out_dir)!r} is not empty and is not a teacher cache (it holds files "
            f"build_teacher_cache did not write, or no {MANIFEST} of one); overwrite=True only replaces an earlier "
            "teacher cache. Choose another folder, or empty this one yourself"
        )


def _top_k_chunk(
    hidden: torch.Tensor, head: torch.Tensor, k: int, transform: LogitTransform | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk of final hidden states ``[c, D]`` -> (top-k log-probs ``[c, k]``, their ids ``[c, k]``, log of
    the mass outside them ``[c]``), in float32. One ``[c, V]`` float32 tensor (plus logsumexp's temporary)."""
    logits = (hidden @ head.t()).float()
    if transform is not None:
        logits = transform.apply(logits)
    lse = torch.logsumexp(logits, dim=-1)
    top, idx = logits.topk(k, dim=-1)
    logp = top - lse.unsqueeze(-1)
    # The rest: logsumexp over the logits outside the top k, relative to all of them (-inf when k == V).
    logits.scatter_(-1, idx, float("-inf"))
    rest = torch.logsumexp(logits, dim=-1) - lse
    return logp, idx, rest


def build_teacher_cache(
    teacher: nn.Module,
    windows: torch.Tensor,
    out_dir,
    *,
    top_k: int = 64,
    batch_size: int = 8,
    shard_windows: int = 1024,
    device=None,
    dtype="float16",
    transform: LogitTransform | None = None,
    progress: bool = True,
    overwrite: bool = False,
    chunk_tokens: int = 1024,
) -> CacheReport:
    """Run ``teacher`` once over ``windows`` (int ``[N, L]``) and write its top-k cache to ``out_dir``.

    For each window, positions ``0 .. L-2`` (those that predict tokens ``1 .. L-1``) keep the teacher's
    ``top_k`` log-probabilities at temperature 1 in ``dtype`` (float16 or bfloat16), their ids in the smallest
    integer type that holds the vocabulary, and the float32 log of the mass outside them (see the module
    docstring for the file format). ``transform`` is the logit transform applied to the LM head's output before
    the softmax; ``None`` takes the family's own (Gemma's soft-capping, Granite's scaling), as distillation
    does; pass ``LogitTransform()`` for none. The logits come from the decoder's final hidden states times the
    LM-head weight, ``chunk_tokens`` positions at a time, so memory holds one ``[chunk_tokens, vocab]`` float32
    tensor besides the teacher's forward of ``batch_size`` windows.

    ``device``: where the teacher runs (default: where it is); the teacher's devices, dtypes, flags and
    train/eval modes are put back afterwards, success or error. ``shard_windows`` windows go in each shard file.

    The folder is written into a temporary folder beside ``out_dir`` and renamed into place once complete, so
    a failure (Ctrl-C included) leaves neither ``out_dir`` nor the temporary folder. An existing non-empty
    ``out_dir`` is refused (:class:`~compress.errors.OutputExistsError`); ``overwrite=True`` replaces it only
    when it is an earlier teacher cache, never a folder holding other files.
    """
    from ..models import check_plain_logits, layout_for
    from .parallel import ModelBackup

    if not isinstance(teacher, nn.Module):
        raise DataError(
            f"the teacher should be a torch.nn.Module (a Hugging Face causal LM), got {type(teacher).__name__}"
        )
    if next(teacher.parameters(), None) is None:
        raise DataError(f"the teacher ({type(teacher).__name__}) has no parameters")
    _check_int("batch_size", batch_size, 1)
    _check_int("shard_windows", shard_windows, 1)
    _check_int("chunk_tokens", chunk_tokens, 1)
    value_name, value_dtype = _store_dtype(dtype)
    if transform is not None and not isinstance(transform, LogitTransform):
        raise ConfigError(f"transform should be a LogitTransform or None, got {type(transform).__name__}")
    adapter = layout_for(teacher)
    vocab = cast(torch.Tensor, teacher.get_submodule(adapter.lm_head).weight).shape[0]
    _check_int("top_k", top_k, 1)
    if top_k > vocab:
        raise ConfigError(f"top_k={top_k} is larger than the teacher's vocabulary ({vocab} tokens)")
    check_token_ids(windows, vocab, "the windows to cache")
    if transform is None:
        transform = adapter.logit_transform(adapter.shape_config(teacher.config))
    _check_cache_dir(out_dir, overwrite)
    check_plain_logits(teacher, adapter)

    windows = windows.detach().to("cpu", torch.int64)
    n, seq_len = windows.shape
    positions = seq_len - 1
    index_name, index_dtype = _index_storage(vocab)
    w_fp, t_fp = windows_fingerprint(windows), teacher_fingerprint(teacher)
    active = _active(transform)
    config = getattr(teacher, "config", None)
    backup = ModelBackup(teacher)
    t0 = time.perf_counter()
    shards: list[dict[str, Any]] = []
    bar = None
    with atomic_output_dir(out_dir, overwrite) as tmp:
        try:
            teacher.eval()
            if device is not None:
                teacher.to(device)
            base = teacher.get_submodule(adapter.base)
            head = cast(torch.Tensor, teacher.get_submodule(adapter.lm_head).weight)
            run_device = head.device
            if progress:
                bar = progress_bar(total=n, desc="caching teacher", unit="win")
            with torch.no_grad():
                for s, start in enumerate(range(0, n, shard_windows)):
                    count = min(shard_windows, n - start)
                    logp_buf = torch.empty(count * positions, top_k, dtype=value_dtype)
                    idx_buf = torch.empty(count * positions, top_k, dtype=index_dtype)
                    rest_buf = torch.empty(count * positions, dtype=torch.float32)
                    for b in range(start, start + count, batch_size):
                        e = min(b + batch_size, start + count)
                        ids = windows[b:e].to(run_device)
                        hidden = base(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
                        flat = hidden.reshape(-1, hidden.shape[-1])
                        offset = (b - start) * positions
                        for c in range(0, flat.shape[0], chunk_tokens):
                            logp, idx, rest = _top_k_chunk(flat[c : c + chunk_tokens], head, top_k, active)
                            rows = slice(offset + c, offset + c + logp.shape[0])
                            logp_buf[rows] = logp.to(value_dtype).cpu()
                            idx_buf[rows] = _encode_ids(idx, index_name, index_dtype).cpu()
                            rest_buf[rows] = rest.cpu()
                            del logp, idx, rest
                        del hidden, flat
                        if bar is not None:
                            bar.update(e - b)
                    name = f"shard-{s:05d}.safetensors"
                    _save_shard(
                        tmp / name,
                        {
                            "logp": logp_buf.view(count, positions, top_k),
                            "idx": idx_buf.view(count, positions, top_k),
                            "rest": rest_buf.view(count, positions),
                        },
                        {"format": FORMAT, "version": str(VERSION), "start": str(start), "windows": str(count)},
                    )
                    shards.append(
                        {"file": name, "start": start, "windows": count, "bytes": (tmp / name).stat().st_size}
                    )
                    del logp_buf, idx_buf, rest_buf
        finally:
            if bar is not None:
                bar.close()
            backup.restore(error=False)
        seconds = time.perf_counter() - t0
        tokens = n * positions
        shard_bytes = sum(sh["bytes"] for sh in shards)
        payload = top_k * (value_dtype.itemsize + index_dtype.itemsize) + 4
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "top_k": top_k,
            "vocab_size": vocab,
            "seq_len": seq_len,
            "positions_per_window": positions,
            "windows": n,
            "tokens": tokens,
            "temperature": 1.0,
            "dtype": value_name,
            "index_dtype": index_name,
            "index_storage": str(index_dtype).replace("torch.", ""),
            "rest_dtype": "float32",
            "transform": transform.to_dict(),
            "shard_windows": shard_windows,
            "shards": shards,
            "windows_fingerprint": w_fp,
            "teacher_fingerprint": t_fp,
            "teacher": {
                "class": type(teacher).__name__,
                "model_type": getattr(config, "model_type", None),
                "name_or_path": getattr(config, "_name_or_path", None) or None,
            },
            "bytes_per_token": round(shard_bytes / tokens, 3),
            "payload_bytes_per_token": payload,
            "build_seconds": round(seconds, 3),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        total_bytes = shard_bytes + (tmp / MANIFEST).stat().st_size
    return CacheReport(
        path=str(out_dir),
        windows=n,
        tokens=tokens,
        shards=len(shards),
        top_k=top_k,
        vocab_size=vocab,
        bytes=total_bytes,
        bytes_per_token=round(total_bytes / tokens, 3),
        payload_bytes_per_token=payload,
        seconds=round(seconds, 3),
        tokens_per_second=round(tokens / max(seconds, 1e-9), 1),
    )


def _save_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


# ----------------------------------------------------------------------------------------------- reading


class TeacherCache:
    """A teacher cache written by :func:`build_teacher_cache`, read a batch of windows at a time.

    Open it with :meth:`open`. :meth:`lookup` reads only the rows it needs (memory-mapped safetensors slices of
    contiguous runs of windows), keeping up to ``max_open_shards`` shard files open (least recently used
    closed first).
    """

    def __init__(self, path: Path, manifest: dict, max_open_shards: int = 8):
        self.path = path
        self.manifest = manifest
        self.max_open_shards = max_open_shards
        self._starts = [sh["start"] for sh in manifest["shards"]]
        self._open: OrderedDict[int, object] = OrderedDict()

    # -- metadata
    @property
    def top_k(self) -> int:
        return self.manifest["top_k"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def seq_len(self) -> int:
        return self.manifest["seq_len"]

    @property
    def num_windows(self) -> int:
        return self.manifest["windows"]

    @property
    def transform(self) -> LogitTransform:
        """The logit transform the teacher's log-probabilities were computed after."""
        return LogitTransform(**self.manifest["transform"])

    def __len__(self) -> int:
        return self.num_windows

    def describe(self) -> dict:
        """What a distillation report says about the cache it trained from."""
        m = self.manifest
        return {
            "path": str(self.path),
            "windows": self.num_windows,
            "seq_len": self.seq_len,
            "top_k": self.top_k,
            "dtype": m.get("dtype"),
            "bytes_per_token": m.get("bytes_per_token"),
        }

    def __repr__(self) -> str:
        return (
            f"TeacherCache({str(self.path)!r}, windows={self.num_windows}, seq_len={self.seq_len}, "
            f"top_k={self.top_k}, vocab_size={self.vocab_size})"
        )

    @classmethod
    def open(
        cls, out_dir, *, windows: torch.Tensor | None = None, teacher: nn.Module | None = None, max_open_shards: int = 8
    ) -> TeacherCache:
        """Read ``out_dir/manifest.json`` and check that the shard files are there.

        Given ``windows`` and/or ``teacher``, also check that the cache was built from them (their
        fingerprints): a cache of other windows or of another teacher (a different model, or the same one after
        training, e.g. teacher correction) raises :class:`~compress.errors.DataError` — rebuild it. A missing
        or damaged cache raises :class:`~compress.errors.CheckpointError`.
        """
        path = Path(out_dir)
        where = str(out_dir)
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise CheckpointError(
                f"{where!r} is not a teacher cache: it has no {MANIFEST} (build one with build_teacher_cache)"
            ) from exc
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"the teacher cache's {MANIFEST} in {where!r} cannot be read ({exc}); rebuild the cache"
            ) from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise CheckpointError(f"{where!r} holds a {MANIFEST} that is not a teacher cache's; rebuild the cache")
        if manifest.get("version") != VERSION:
            raise CheckpointError(
                f"the teacher cache in {where!r} has format version {manifest.get('version')!r}; "
                f"this compress reads version {VERSION}: rebuild the cache"
            )
        for sh in manifest["shards"]:
            f = path / sh["file"]
            if not f.is_file() or f.stat().st_size != sh["bytes"]:
                state = "is missing" if not f.is_file() else f"has {f.stat().st_size} bytes, not {sh['bytes']}"
                raise CheckpointError(
                    f"the teacher cache in {where!r} is incomplete: {sh['file']} {state}; rebuild the cache"
                )
        if windows is not None:
            if not isinstance(windows, torch.Tensor) or windows.dim() != 2:
                raise DataError(
                    f"windows should be the [N, seq_len] token tensor the cache was built from, got "
                    f"{type(windows).__name__} {tuple(getattr(windows, 'shape', ()))}"
                )
            shape = (manifest["windows"], manifest["seq_len"])
            if tuple(windows.shape) != shape:
                raise DataError(
                    f"the teacher cache in {where!r} was built for {shape[0]} windows of {shape[1]} "
                    f"tokens, these are {tuple(windows.shape)}: it belongs to other data. Rebuild it "
                    "(build_teacher_cache) for these windows"
                )
            if windows_fingerprint(windows) != manifest["windows_fingerprint"]:
                raise DataError(
                    f"the teacher cache in {where!r} was built for other windows (same shape "
                    f"{shape}, different tokens or order): rebuild it (build_teacher_cache) for these "
                    "windows"
                )
        if teacher is not None and teacher_fingerprint(teacher) != manifest["teacher_fingerprint"]:
            built = manifest.get("teacher", {})
            raise DataError(
                f"the teacher cache in {where!r} was built with another teacher "
                f"({built.get('class')} {built.get('name_or_path') or ''}) or with different weights "
                f"(e.g. before teacher correction): rebuild it with this teacher"
            )
        return cls(path, manifest, max_open_shards)

    def _shard(self, i: int):
        from safetensors import safe_open

        handle = self._open.get(i)
        if handle is None:
            handle = safe_open(str(self.path / self.manifest["shards"][i]["file"]), framework="pt")
            self._open[i] = handle
            while len(self._open) > self.max_open_shards:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(i)
        return handle

    def close(self) -> None:
        self._open.clear()

    def __enter__(self) -> TeacherCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def lookup(
        self, indices, device=None, *, renormalize: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cached teacher for windows ``indices`` (rows of the ``windows`` the cache was built from, any
        order, repeats allowed): ``(logp [B, L-1, k] float32, idx [B, L-1, k] int64, rest [B, L-1] float32)``
        on ``device`` (default CPU). Row ``j`` position ``t`` is the teacher's prediction of token ``t + 1``
        of window ``indices[j]``; flatten with ``reshape(-1, k)`` to feed :func:`cached_logit_loss`.

        ``renormalize`` (default) shifts each position's log-probabilities so that its ``k + 1`` buckets sum to
        exactly 1: float16 storage rounds a log-probability by up to ~0.4% of its probability (bfloat16 ~3%),
        and the KL gradient ``q - p`` only vanishes at the optimum for a normalized ``p``."""
        idx = torch.as_tensor(indices)
        if idx.dim() != 1 or idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
            raise DataError(
                f"indices should be a 1-D integer tensor of window numbers, got dtype {idx.dtype} "
                f"shape {tuple(idx.shape)}"
            )
        idx = idx.to("cpu", torch.int64)
        n = self.num_windows
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise DataError(
                f"window indices must lie in 0..{n - 1} (the cache holds {n} windows), got "
                f"{int(idx.min())}..{int(idx.max())}"
            )
        uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
        parts: dict[str, list[torch.Tensor]] = {"logp": [], "idx": [], "rest": []}
        values = uniq.tolist()
        i = 0
        while i < len(values):
            s = bisect.bisect_right(self._starts, values[i]) - 1
            shard = self.manifest["shards"][s]
            end_of_shard = shard["start"] + shard["windows"]
            j = i + 1
            while j < len(values) and values[j] == values[j - 1] + 1 and values[j] < end_of_shard:
                j += 1
            a, b = values[i] - shard["start"], values[j - 1] + 1 - shard["start"]
            handle = self._shard(s)
            for name in parts:
                parts[name].append(handle.get_slice(name)[a:b])
            i = j
        k, positions = self.top_k, self.manifest["positions_per_window"]
        if not values:
            raw = {
                "logp": torch.empty(0, positions, k, dtype=torch.float16),
                "idx": torch.empty(0, positions, k, dtype=torch.int64),
                "rest": torch.empty(0, positions),
            }
        else:
            raw = {name: torch.cat(p) if len(p) > 1 else p[0] for name, p in parts.items()}
        if idx.numel() != len(values) or not torch.equal(uniq, idx):
            raw = {name: t.index_select(0, inverse) for name, t in raw.items()}
        device = torch.device(device) if device is not None else torch.device("cpu")
        # Moved in their stored (small) types, widened where they are used.
        logp = raw["logp"].to(device).float()
        ids = _decode_ids(raw["idx"].to(device), self.manifest["index_dtype"])
        rest = raw["rest"].to(device).float()
        if renormalize:
            norm = torch.logsumexp(torch.cat([logp, rest.unsqueeze(-1)], dim=-1), dim=-1)
            logp = logp - norm.unsqueeze(-1)
            rest = rest - norm
        return logp, ids, rest


# ----------------------------------------------------------------------------------------------- the loss


def _cached_chunk_loss_and_grad(
    h: torch.Tensor,
    w: torch.Tensor,
    t_logp: torch.Tensor,
    t_idx: torch.Tensor,
    t_rest: torch.Tensor,
    kind: str,
    weight: float,
    need_grad: bool,
    transform: LogitTransform | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk: ``(kd_sum, d(weight * kd_sum)/d(raw student logits))``; see :func:`cached_logit_loss` for the
    math. Memory: the ``[c, V]`` logits, reused in place for the gradient (plus the soft-cap's derivative when
    there is one, and logsumexp's temporary)."""
    compute = torch.promote_types(h.dtype, torch.float32)
    z = (h @ w.t()).to(compute)
    if transform is not None:
        z = transform.apply(z)
    deriv = None
    if need_grad and transform is not None and transform.softcap is not None:
        deriv = (z / transform.softcap).square_().neg_().add_(1)  # d(c tanh(u/c))/du = 1 - (z/c)^2
    a = t_logp.to(compute)
    a_r = t_rest.to(compute)
    idx = t_idx.long()
    lse = torch.logsumexp(z, dim=-1)
    s = z.gather(-1, idx) - lse.unsqueeze(-1)  # student log q on the teacher's top k
    z.scatter_(-1, idx, float("-inf"))  # z now: the logits outside the top k
    lse_rest = torch.logsumexp(z, dim=-1)
    s_r = lse_rest - lse  # log q_rest (-inf when k == V)
    q, q_r = s.exp(), s_r.exp()
    zero = torch.zeros((), dtype=compute, device=z.device)
    if kind == "forward_kl":
        p, r = a.exp(), a_r.exp()
        kd = torch.where(p > 0, p * (a - s), zero).sum() + torch.where(r > 0, r * (a_r - s_r), zero).sum()
        g, g_r = -p, -r  # dL/ds, dL/ds_r
    else:  # reverse_kl
        a = a.clamp_min(_LOG_TINY)
        a_r = a_r.clamp_min(_LOG_TINY)
        diff = s - a
        kd = (q * diff).sum() + torch.where(q_r > 0, q_r * (s_r - a_r), zero).sum()
        g = q * (diff + 1)
        g_r = torch.where(q_r > 0, q_r * (s_r - a_r + 1), zero)
    grad = None
    if need_grad:
        total = g.sum(-1) + g_r  # G
        # Outside the top k: dL/dz_j = (g_r - q_r G) exp(z_j - lse_rest); inside: g_j - q_j G.
        safe = torch.where(torch.isfinite(lse_rest), lse_rest, zero)
        grad = z.sub_(safe.unsqueeze(-1)).exp_().mul_((weight * (g_r - q_r * total)).unsqueeze(-1))
        grad.scatter_(-1, idx, weight * (g - q * total.unsqueeze(-1)))
        if transform is not None:  # back through softcap(scale * raw) to the raw logits
            if deriv is not None:
                grad.mul_(deriv)
            if transform.scale != 1.0:
                grad.mul_(transform.scale)
        grad = grad.to(h.dtype)
    return kd, grad


class _CachedHeadLoss(torch.autograd.Function):
    """The cached-teacher loss and its gradient, computed together chunk by chunk in the forward pass (as
    :class:`compress.distillation.losses._FusedHeadLoss`); backward only scales the stored gradients."""

    @staticmethod
    def forward(ctx, h, w, t_logp, t_idx, t_rest, kind, chunk_tokens, transform, weight):
        n = h.shape[0]
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        compute = torch.promote_types(h.dtype, torch.float32)
        grad_h = torch.zeros_like(h) if needs_grad else None
        grad_w = torch.zeros_like(w, dtype=torch.promote_types(w.dtype, torch.float32)) if needs_grad else None
        kd_total = torch.zeros((), dtype=compute, device=h.device)
        for start in range(0, n, chunk_tokens):
            sl = slice(start, start + chunk_tokens)
            h_chunk = h[sl]
            kd, g = _cached_chunk_loss_and_grad(
                h_chunk, w, t_logp[sl], t_idx[sl], t_rest[sl], kind, weight, needs_grad, transform
            )
            if needs_grad:
                grad_h[sl] = g @ w
                grad_w += (g.t() @ h_chunk).to(grad_w.dtype)
                del g
            kd_total += kd
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w.dtype
        ctx.mark_non_differentiable(kd_total)
        return weight * kd_total, kd_total

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd):
        grad_h, grad_w = ctx.saved_tensors
        out_h = None if grad_h is None else grad_h.mul_(grad_loss.to(grad_h.dtype))
        out_w = None if grad_w is None else grad_w.mul_(grad_loss.to(grad_w.dtype)).to(ctx.w_dtype)
        return out_h, out_w, None, None, None, None, None, None, None


def cached_logit_loss(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    t_logp: torch.Tensor,
    t_idx: torch.Tensor,
    t_rest: torch.Tensor,
    *,
    kind: str = "forward_kl",
    chunk_tokens: int = 1024,
    student_transform: LogitTransform | None = None,
    weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight ×`` the mean over tokens of a divergence between the cached teacher and the student, on the
    ``k + 1`` buckets "each of the teacher's top k tokens" and "everything else"; returns ``(loss, kd)``:
    the differentiable loss and the detached mean divergence for logging.

    Inputs, per token (``N`` flattened positions): ``student_hidden`` ``[N, D]`` (final hidden states) and
    ``student_head`` ``[V, D]`` (LM-head weight), differentiable; the cache's ``t_logp`` ``[N, k]``, ``t_idx``
    ``[N, k]`` (distinct ids per token) and ``t_rest`` ``[N]`` (:meth:`TeacherCache.lookup`, reshaped).
    ``student_transform`` is what the student's family does to its raw logits (as in
    :func:`~compress.distillation.losses.chunked_logit_loss`). Temperature is 1: the cache holds the teacher at T = 1.

    The buckets. Teacher: ``p_i = exp(t_logp_i)`` on the top k, ``r = exp(t_rest)`` for the rest. Student, with
    logits ``z``: ``s_i = z_{idx_i} - LSE(z)`` (``q_i = exp(s_i)``) and, computed stably,
    ``s_r = LSE(z outside idx) - LSE(z)`` (``q_r = exp(s_r) = 1 - sum q_i``; the top k masked with ``-inf``).

    - ``forward_kl``: ``sum_i p_i (log p_i - s_i) + r (log r - s_r)``; ``dL/ds_i = -p_i``, ``dL/ds_r = -r``.
    - ``reverse_kl``: ``sum_i q_i (s_i - log p_i) + q_r (s_r - log r)``; ``dL/ds_i = q_i (s_i - log p_i + 1)``,
      ``dL/ds_r = q_r (s_r - log r + 1)``.

    A bucket with zero mass contributes 0 (``0 log 0 = 0``): ``r = 0`` when ``k = V`` (``t_rest = -inf``;
    then ``q_r = 0`` too and both losses equal the full-vocabulary KL). Reverse KL weighs ``log p`` by the
    student's mass, so a teacher log-probability of ``-inf`` is taken as ``log(float32 tiny) ≈ -87.3`` there
    (a large, finite penalty instead of an infinite loss).

    The gradient, analytic, per token. With ``g_i = dL/ds_i``, ``g_r = dL/ds_r`` and ``G = sum_i g_i + g_r``:
    ``ds_i/dz_j = [j = idx_i] - q_j`` and ``ds_r/dz_j = [j outside idx] q_j / q_r - q_j``, so

    - for ``j`` in the top k: ``dL/dz_j = g_j - q_j G``;
    - for ``j`` outside it: ``dL/dz_j = (g_r - q_r G) · exp(z_j - LSE(z outside idx))`` (``q_j / q_r``, in
      ``[0, 1]`` and finite even where ``q_r`` underflows).

    For forward KL with normalized buckets this is ``q - p~``, where ``p~`` spreads the teacher's rest mass
    ``r`` over the tokens outside the top k in the student's own proportions. The transform's derivative then
    takes it back to the raw logits (``scale · (1 - (z / softcap)²)``), and two matmuls to ``student_hidden``
    and ``student_head``.

    Memory: one chunk of ``chunk_tokens`` tokens at a time, a ``[chunk, V]`` float32 tensor reused in place
    for the gradient (a second one with a soft-cap); math in float32 (float64 for float64 inputs, and then the
    loss is float64 too); the gradients come back in the inputs' dtypes.
    """
    if kind not in CACHED_LOSSES:
        raise ValueError(
            f"unknown cached divergence {kind!r}; choose one of {CACHED_LOSSES} (JSD and "
            "temperatures other than 1 need the teacher's full distribution: use chunked_logit_loss)"
        )
    _check_int("chunk_tokens", chunk_tokens, 1)
    if student_hidden.dim() != 2 or student_head.dim() != 2 or student_hidden.shape[1] != student_head.shape[1]:
        raise ValueError(
            f"student_hidden [N, D] and student_head [V, D] do not fit: {tuple(student_hidden.shape)} "
            f"and {tuple(student_head.shape)}"
        )
    n = student_hidden.shape[0]
    if t_logp.dim() != 2 or t_logp.shape != t_idx.shape or t_logp.shape[0] != n or tuple(t_rest.shape) != (n,):
        raise ValueError(
            f"the cached teacher should be t_logp [N, k], t_idx [N, k], t_rest [N] with N = {n}, got "
            f"{tuple(t_logp.shape)}, {tuple(t_idx.shape)}, {tuple(t_rest.shape)}"
        )
    if t_logp.shape[1] > student_head.shape[0]:
        raise ValueError(
            f"the cache keeps {t_logp.shape[1]} tokens per position, more than the student's "
            f"vocabulary of {student_head.shape[0]}"
        )
    loss, kd = _CachedHeadLoss.apply(
        student_hidden,
        student_head,
        t_logp,
        t_idx,
        t_rest,
        kind,
        chunk_tokens,
        _active(student_transform),
        float(weight),
    )
    return loss / n, kd / n
