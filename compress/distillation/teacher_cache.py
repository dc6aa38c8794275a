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
import re
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, DataError, OutputExistsError
from ..io import atomic_output_dir, check_output_dir
from ..progress import bar as progress_bar
from ..validate import check_device, check_int, check_token_ids
from .config import CACHED_LOSSES
from .losses import LogitTransform, active_transform, cached_logit_loss

if TYPE_CHECKING:
    from ..models import DecoderAdapter

__all__ = [
    "CACHED_LOSSES",
    "FORMAT",
    "MANIFEST",
    "VERSION",
    "CacheReport",
    "TeacherCache",
    "build_teacher_cache",
    "cached_logit_loss",
    "teacher_fingerprint",
    "windows_fingerprint",
]

FORMAT = "compress-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
_SHARD_RE = re.compile(r"shard-\d{5,}\.safetensors")
_STORE_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
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


@dataclass(frozen=True)
class _Storage:
    """How a cache stores each position: its ``top_k`` log-probabilities as ``value_dtype`` and their ids as
    ``index_dtype`` (logical names ``value_name`` / ``index_name``, as the manifest says), the rest as float32."""

    top_k: int
    vocab: int
    value_name: str
    value_dtype: torch.dtype
    index_name: str
    index_dtype: torch.dtype

    @property
    def payload_bytes_per_token(self) -> int:
        return self.top_k * (self.value_dtype.itemsize + self.index_dtype.itemsize) + 4


def _check_build(
    teacher: nn.Module,
    windows: torch.Tensor,
    out_dir,
    *,
    top_k: int,
    batch_size: int,
    shard_windows: int,
    dtype,
    transform: LogitTransform | None,
    overwrite: bool,
    chunk_tokens: int,
) -> tuple[DecoderAdapter, _Storage, LogitTransform]:
    """Every argument of :func:`build_teacher_cache` checked, in this order, before any work; returns the
    teacher's adapter, how the cache will store it, and the logit transform (the family's when ``None``)."""
    from ..models import check_plain_logits, layout_for

    if not isinstance(teacher, nn.Module):
        raise DataError(
            f"the teacher should be a torch.nn.Module (a Hugging Face causal LM), got {type(teacher).__name__}"
        )
    if next(teacher.parameters(), None) is None:
        raise DataError(f"the teacher ({type(teacher).__name__}) has no parameters")
    check_int("batch_size", batch_size, 1)
    check_int("shard_windows", shard_windows, 1)
    check_int("chunk_tokens", chunk_tokens, 1)
    value_name, value_dtype = _store_dtype(dtype)
    if transform is not None and not isinstance(transform, LogitTransform):
        raise ConfigError(f"transform should be a LogitTransform or None, got {type(transform).__name__}")
    adapter = layout_for(teacher)
    vocab = cast(torch.Tensor, teacher.get_submodule(adapter.lm_head).weight).shape[0]
    check_int("top_k", top_k, 1)
    if top_k > vocab:
        raise ConfigError(f"top_k={top_k} is larger than the teacher's vocabulary ({vocab} tokens)")
    check_token_ids(windows, vocab, "the windows to cache")
    if transform is None:
        transform = adapter.logit_transform(adapter.shape_config(teacher.config))
    _check_cache_dir(out_dir, overwrite)
    check_plain_logits(teacher, adapter)
    index_name, index_dtype = _index_storage(vocab)
    return adapter, _Storage(top_k, vocab, value_name, value_dtype, index_name, index_dtype), transform


def _cache_shard(
    base: nn.Module,
    head: torch.Tensor,
    windows: torch.Tensor,
    storage: _Storage,
    *,
    batch_size: int,
    chunk_tokens: int,
    transform: LogitTransform | None,
    bar,
) -> dict[str, torch.Tensor]:
    """The tensors of one shard (``logp``, ``idx``, ``rest``) for ``windows`` ``[n, L]``: the teacher's decoder
    ``base`` run ``batch_size`` windows at a time, its LM ``head`` ``chunk_tokens`` positions at a time. Call
    under ``torch.no_grad()``."""
    count, positions, k = windows.shape[0], windows.shape[1] - 1, storage.top_k
    logp_buf = torch.empty(count * positions, k, dtype=storage.value_dtype)
    idx_buf = torch.empty(count * positions, k, dtype=storage.index_dtype)
    rest_buf = torch.empty(count * positions, dtype=torch.float32)
    for b in range(0, count, batch_size):
        e = min(b + batch_size, count)
        hidden = base(input_ids=windows[b:e].to(head.device), use_cache=False).last_hidden_state[:, :-1]
        flat = hidden.reshape(-1, hidden.shape[-1])
        offset = b * positions
        for c in range(0, flat.shape[0], chunk_tokens):
            logp, idx, rest = _top_k_chunk(flat[c : c + chunk_tokens], head, k, transform)
            rows = slice(offset + c, offset + c + logp.shape[0])
            logp_buf[rows] = logp.to(storage.value_dtype).cpu()
            idx_buf[rows] = _encode_ids(idx, storage.index_name, storage.index_dtype).cpu()
            rest_buf[rows] = rest.cpu()
            del logp, idx, rest
        del hidden, flat
        if bar is not None:
            bar.update(e - b)
    return {
        "logp": logp_buf.view(count, positions, k),
        "idx": idx_buf.view(count, positions, k),
        "rest": rest_buf.view(count, positions),
    }


def _write_shards(
    teacher: nn.Module,
    adapter: DecoderAdapter,
    windows: torch.Tensor,
    folder: Path,
    storage: _Storage,
    *,
    shard_windows: int,
    device,
    progress: bool,
    **chunking,
) -> list[dict[str, Any]]:
    """Run the teacher (in eval mode, on ``device`` when given) over ``windows`` and write its shards into
    ``folder``; returns the manifest's shard list. The teacher's devices, dtypes, flags and modes are put back
    afterwards, success or error. ``chunking``: ``batch_size``, ``chunk_tokens`` and ``transform`` of
    :func:`_cache_shard`."""
    from .parallel import ModelBackup

    n = windows.shape[0]
    backup = ModelBackup(teacher)
    shards: list[dict[str, Any]] = []
    bar = None
    try:
        teacher.eval()
        if device is not None:
            teacher.to(device)
        base = teacher.get_submodule(adapter.base)
        head = cast(torch.Tensor, teacher.get_submodule(adapter.lm_head).weight)
        if progress:
            bar = progress_bar(total=n, desc="caching teacher", unit="win")
        with torch.no_grad():
            for s, start in enumerate(range(0, n, shard_windows)):
                count = min(shard_windows, n - start)
                tensors = _cache_shard(base, head, windows[start : start + count], storage, bar=bar, **chunking)
                name = f"shard-{s:05d}.safetensors"
                metadata = {"format": FORMAT, "version": str(VERSION), "start": str(start), "windows": str(count)}
                _save_shard(folder / name, tensors, metadata)
                shards.append({"file": name, "start": start, "windows": count, "bytes": (folder / name).stat().st_size})
                del tensors
    finally:
        if bar is not None:
            bar.close()
        backup.restore(error=False)
    return shards


def _manifest(
    teacher: nn.Module,
    windows: torch.Tensor,
    storage: _Storage,
    transform: LogitTransform,
    shards: list[dict[str, Any]],
    *,
    shard_windows: int,
    fingerprints: tuple[str, str],
    seconds: float,
) -> dict[str, Any]:
    """``manifest.json`` of a cache of ``windows`` (see the module docstring)."""
    n, seq_len = windows.shape
    tokens = n * (seq_len - 1)
    config = getattr(teacher, "config", None)
    return {
        "format": FORMAT,
        "version": VERSION,
        "top_k": storage.top_k,
        "vocab_size": storage.vocab,
        "seq_len": seq_len,
        "positions_per_window": seq_len - 1,
        "windows": n,
        "tokens": tokens,
        "temperature": 1.0,
        "dtype": storage.value_name,
        "index_dtype": storage.index_name,
        "index_storage": str(storage.index_dtype).replace("torch.", ""),
        "rest_dtype": "float32",
        "transform": transform.to_dict(),
        "shard_windows": shard_windows,
        "shards": shards,
        "windows_fingerprint": fingerprints[0],
        "teacher_fingerprint": fingerprints[1],
        "teacher": {
            "class": type(teacher).__name__,
            "model_type": getattr(config, "model_type", None),
            "name_or_path": getattr(config, "_name_or_path", None) or None,
        },
        "bytes_per_token": round(sum(sh["bytes"] for sh in shards) / tokens, 3),
        "payload_bytes_per_token": storage.payload_bytes_per_token,
        "build_seconds": round(seconds, 3),
    }


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
    check_device(device)
    adapter, storage, transform = _check_build(
        teacher,
        windows,
        out_dir,
        top_k=top_k,
        batch_size=batch_size,
        shard_windows=shard_windows,
        dtype=dtype,
        transform=transform,
        overwrite=overwrite,
        chunk_tokens=chunk_tokens,
    )
    windows = windows.detach().to("cpu", torch.int64)
    fingerprints = windows_fingerprint(windows), teacher_fingerprint(teacher)
    t0 = time.perf_counter()
    with atomic_output_dir(out_dir, overwrite) as tmp:
        shards = _write_shards(
            teacher,
            adapter,
            windows,
            tmp,
            storage,
            shard_windows=shard_windows,
            device=device,
            progress=progress,
            batch_size=batch_size,
            chunk_tokens=chunk_tokens,
            transform=active_transform(transform),
        )
        seconds = time.perf_counter() - t0
        manifest = _manifest(
            teacher,
            windows,
            storage,
            transform,
            shards,
            shard_windows=shard_windows,
            fingerprints=fingerprints,
            seconds=seconds,
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        total_bytes = sum(sh["bytes"] for sh in shards) + (tmp / MANIFEST).stat().st_size
    tokens = manifest["tokens"]
    return CacheReport(
        path=str(out_dir),
        windows=manifest["windows"],
        tokens=tokens,
        shards=len(shards),
        top_k=top_k,
        vocab_size=storage.vocab,
        bytes=total_bytes,
        bytes_per_token=round(total_bytes / tokens, 3),
        payload_bytes_per_token=storage.payload_bytes_per_token,
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
