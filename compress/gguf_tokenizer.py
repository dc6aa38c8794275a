"""Repair the tokenizer transformers builds from a GGUF file, so that what a student ships is what the GGUF meant.

transformers 4.57 converts every Llama-architecture GGUF tokenizer with one converter
(``transformers.integrations.ggml.GGUFLlamaConverter``), which gets three things wrong for the byte-level BPE
vocabularies (``tokenizer.ggml.model = "gpt2"``) that SmolLM2, Llama 3 and most recent models use:

* the end-of-sequence token is set to the beginning-of-sequence token (both read from ``bos_token_id``), so
  generation configs and clients that read the tokenizer stop on ``<|im_start|>`` instead of ``<|im_end|>``;
* a beginning-of-sequence token is added to every encoded text even when the GGUF says not to
  (``tokenizer.ggml.add_bos_token = false``);
* the result is a ``LlamaTokenizer`` with a SentencePiece-style decoder chain: ``decode(encode(text))`` does not
  give the text back, and onnxruntime-genai's tokenizer, which picks its algorithm from the tokenizer class,
  reads it as a SentencePiece model and encodes most pieces as unknown (-1).

:func:`repair_gguf_tokenizer` rebuilds the same vocabulary, merges and pre-tokenizer as a ``GPT2TokenizerFast``
(byte-level decoder, special tokens from the GGUF's own ids). Token ids of any text encoded without special
tokens are unchanged, so perplexities and training data are unaffected; only the special-token settings and
decoding change. For SentencePiece GGUFs (``tokenizer.ggml.model = "llama"``) only the special tokens are set
right.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def gguf_tokenizer_metadata(gguf_file: str | Path) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` scalars of a GGUF file (model, pre, special-token ids, add_bos/eos flags).

    Read with the ``gguf`` package's reader, which memory-maps the file: nothing but the header is read.
    """
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(gguf_file))
    meta: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer.ggml.") or len(field.types) != 1:
            continue  # arrays (tokens, merges, scores) are skipped
        value = field.parts[field.data[0]]
        key = name.removeprefix("tokenizer.ggml.")
        if field.types[0] == GGUFValueType.STRING:
            meta[key] = bytes(value).decode("utf-8")
        elif field.types[0] == GGUFValueType.BOOL:
            meta[key] = bool(value[0])
        else:
            meta[key] = int(value[0])
    return meta


def repair_gguf_tokenizer(tokenizer, gguf_file: str | Path):
    """``tokenizer`` as loaded by ``AutoTokenizer.from_pretrained(..., gguf_file=...)``, with the GGUF's own
    special tokens and, for byte-level BPE vocabularies, a byte-level ``GPT2TokenizerFast`` (see the module
    docstring). A tokenizer of another kind is returned unchanged."""
    if not getattr(tokenizer, "is_fast", False):
        return tokenizer
    meta = gguf_tokenizer_metadata(gguf_file)
    vocab = {i: t for t, i in tokenizer.get_vocab().items()}

    def token(key: str) -> str | None:
        index = meta.get(f"{key}_token_id")
        return vocab.get(index) if isinstance(index, int) else None

    special = {
        name: token(key)
        for name, key in (
            ("bos_token", "bos"),
            ("eos_token", "eos"),
            ("unk_token", "unknown"),
            ("pad_token", "padding"),
        )
    }
    if meta.get("model") == "gpt2":
        import transformers
        from tokenizers import decoders, processors

        # The tokenizers-backed GPT-2 class: GPT2TokenizerFast on 4.57; transformers 5 names it GPT2Tokenizer and
        # keeps the old name as an alias.
        gpt2_fast: Any = getattr(transformers, "GPT2TokenizerFast", None) or transformers.GPT2Tokenizer

        backend = tokenizer.backend_tokenizer
        backend.decoder = decoders.ByteLevel()
        post: list[Any] = [processors.ByteLevel(trim_offsets=False)]
        bos = special.get("bos_token")
        if meta.get("add_bos_token", False) and bos is not None:
            post.append(
                processors.TemplateProcessing(
                    single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, meta["bos_token_id"])]
                )
            )
        backend.post_processor = processors.Sequence(post) if len(post) > 1 else post[0]
        # A token the GGUF does not name stays unset (None): GPT2TokenizerFast would otherwise fill in
        # "<|endoftext|>" and, if the vocabulary lacks it, add a row the model's embedding does not have.
        fixed = gpt2_fast(
            tokenizer_object=backend,
            add_prefix_space=False,
            **special,
            model_max_length=tokenizer.model_max_length,
            padding_side=tokenizer.padding_side,
        )
        fixed.chat_template = tokenizer.chat_template
        return fixed
    tokenizer.add_special_tokens({k: v for k, v in special.items() if v is not None})
    if "add_bos_token" in meta and hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = meta["add_bos_token"]
    return tokenizer


__all__ = ["gguf_tokenizer_metadata", "repair_gguf_tokenizer"]
