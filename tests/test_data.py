import torch

from compress import data

from conftest import SAMPLE_TEXT


def test_stdlib_corpus_exists_offline_and_splits_do_not_overlap():
    calib = data.stdlib_docstrings(max_chars=200_000)
    held = data.stdlib_docstrings(max_chars=50_000, held_out=True)
    assert sum(map(len, calib)) >= 200_000 and sum(map(len, held)) >= 50_000
    assert not set(calib) & set(held)


def test_pack_tokens_streams_only_what_it_needs(tokenizer, tmp_path):
    path = tmp_path / "big.txt"
    path.write_text(SAMPLE_TEXT * 50)
    ids = data.pack_tokens(tokenizer, path, 16, max_windows=3)
    assert ids.shape == (3, 16) and ids.dtype == torch.long
    skipped = data.pack_tokens(tokenizer, path, 16, max_windows=2, skip_tokens=16)
    assert torch.equal(skipped[0], ids[1])
    assert data.pack_tokens(tokenizer, [SAMPLE_TEXT], 16).shape[0] > 3


def test_jsonl_documents_and_datasets(tokenizer, tmp_path):
    import json

    import pytest
    from datasets import Dataset

    from compress.errors import DataError

    docs = [SAMPLE_TEXT[i:i + 400] for i in range(0, 4000, 400)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)))
    from_jsonl = data.pack_tokens(tokenizer, path, 16)
    from_list = data.pack_tokens(tokenizer, docs, 16)
    from_dataset = data.pack_tokens(tokenizer, Dataset.from_dict({"text": docs}), 16)
    assert torch.equal(from_jsonl, from_list) and torch.equal(from_dataset, from_list)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text field"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1 has no string field 'text'"):
        data.pack_tokens(tokenizer, bad, 16)
