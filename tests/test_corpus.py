"""Teacher-made corpora: generate_corpus (greedy parity with unbatched generate, identical resumed output,
refusals before work) and select_by_difference (scores equal to a per-document naive computation)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from compress.corpus import generate_corpus, prompts_from_documents, select_by_difference
from compress.data import iter_text, pack_tokens
from compress.errors import ConfigError, DataError, OutputExistsError

from conftest import SAMPLE_TEXT, tiny_model

PROMPTS = ["The quick brown fox", "Python is a", "A list is a mutable", "Functions are",
           "Modules group related code", "A tuple", "packages group"]


@pytest.fixture(scope="module")
def teacher():
    return tiny_model("llama", num_hidden_layers=2)


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _reference_completion(model, tokenizer, ids: list[int], max_new_tokens: int) -> list[int]:
    """model.generate on one prompt alone (no padding), cut after the first EOS."""
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[0, len(ids):].tolist()
    return new[:new.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in new else new


def test_greedy_equals_unbatched_generate_and_output_feeds_iter_text(teacher, tokenizer, tmp_path):
    out = tmp_path / "corpus.jsonl"
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    teacher.train()  # the mode must come back as it was
    report = generate_corpus(teacher, PROMPTS, out, tokenizer=tokenizer, max_new_tokens=12, batch_size=3,
                             do_sample=False, progress=False)
    assert teacher.training
    teacher.eval()
    assert (tokenizer.padding_side, tokenizer.pad_token) == (side, pad)
    rows = _rows(out)
    assert [r["id"] for r in rows] == list(range(len(PROMPTS))) and [r["prompt"] for r in rows] == PROMPTS
    total = 0
    for row in rows:
        ids = tokenizer(row["prompt"])["input_ids"]
        new = _reference_completion(teacher, tokenizer, ids, 12)
        total += len(new)
        body = [t for t in new if t != tokenizer.eos_token_id]
        assert row["completion"] == tokenizer.decode(body, skip_special_tokens=True)
        assert row["text"] == row["prompt"] + row["completion"]
    assert report.completion_tokens == total and report.generated == len(PROMPTS) and report.skipped == 0
    assert any(len(r["completion"]) for r in rows)
    # the library's data loaders read the corpus as text
    assert list(iter_text(out)) == [r["text"] for r in rows]
    assert pack_tokens(tokenizer, out, 8).shape[1] == 8
    meta = json.loads((tmp_path / "corpus.jsonl.meta.json").read_text())
    assert meta["settings"]["max_new_tokens"] == 12 and meta["settings"]["teacher_class"] == "LlamaForCausalLM"
    assert meta["settings"]["prompts"] == len(PROMPTS) and "library_version" in meta
    assert report.to_dict()["out_path"] == str(out)


def test_chat_answers_follow_the_template_and_no_template_is_refused(teacher, tokenizer, tmp_path):
    chat_tok = copy.deepcopy(tokenizer)
    chat_tok.chat_template = ("{% for m in messages %}<s>Q: {{ m['content'] }}\n{% endfor %}"
                              "{% if add_generation_prompt %}A:{% endif %}")
    out = tmp_path / "chat.jsonl"
    generate_corpus(teacher, PROMPTS[:2], out, tokenizer=chat_tok, max_new_tokens=6, do_sample=False, chat=True,
                    progress=False)
    for row in _rows(out):
        ids = chat_tok(f"<s>Q: {row['prompt']}\nA:", add_special_tokens=False)["input_ids"]
        new = [t for t in _reference_completion(teacher, chat_tok, ids, 6) if t != chat_tok.eos_token_id]
        assert row["completion"] == chat_tok.decode(new, skip_special_tokens=True)
    with pytest.raises(ConfigError, match="chat_template"):
        generate_corpus(teacher, PROMPTS, tmp_path / "x.jsonl", tokenizer=tokenizer, chat=True, progress=False)


def test_interrupted_run_resumes_to_the_uninterrupted_file(teacher, tokenizer, tmp_path):
    kw = dict(tokenizer=tokenizer, max_new_tokens=10, batch_size=3, temperature=1.3, top_p=0.9, seed=5,
              progress=False)
    state = torch.get_rng_state()
    full = tmp_path / "full.jsonl"
    generate_corpus(teacher, PROMPTS, full, **kw)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    expected = full.read_bytes()
    lines = expected.split(b"\n")
    other_seed = tmp_path / "seed6.jsonl"
    generate_corpus(teacher, PROMPTS, other_seed, **{**kw, "seed": 6})
    assert other_seed.read_bytes() != expected  # sampling is on: the seed matters

    meta = (tmp_path / "full.jsonl.meta.json").read_bytes()
    cases = {
        "mid-line": b"\n".join(lines[:4]) + b"\n" + lines[4][: len(lines[4]) // 2],  # killed inside batch 1
        "batch-aligned": b"\n".join(lines[:3]) + b"\n",
        "one-line": lines[0] + b"\n",
        "empty": b"",
    }
    for name, content in cases.items():
        part = tmp_path / f"{name}.jsonl"
        part.write_bytes(content)
        (tmp_path / f"{name}.jsonl.meta.json").write_bytes(meta)
        report = generate_corpus(teacher, PROMPTS, part, **kw)
        assert part.read_bytes() == expected, name
        done = content.count(b"\n")
        assert (report.skipped, report.generated) == (done, len(PROMPTS) - done), name
    again = generate_corpus(teacher, PROMPTS, full, **kw)  # complete: nothing to do
    assert again.generated == 0 and full.read_bytes() == expected


def test_resume_refusals(teacher, tokenizer, tmp_path):
    out = tmp_path / "c.jsonl"
    kw = dict(tokenizer=tokenizer, max_new_tokens=4, batch_size=4, progress=False)
    generate_corpus(teacher, PROMPTS[:4], out, **kw)
    before = out.read_bytes()
    with pytest.raises(ConfigError, match="temperature: 0.7 there, 0.9 now"):
        generate_corpus(teacher, PROMPTS[:4], out, **{**kw, "temperature": 0.9})
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate_corpus(teacher, PROMPTS[:4], out, **{**kw, "max_new_tokens": 5})
    with pytest.raises(ConfigError, match="prompts"):
        generate_corpus(teacher, PROMPTS[1:5], out, **kw)
    with pytest.raises(OutputExistsError, match="resume=True"):
        generate_corpus(teacher, PROMPTS[:4], out, **kw, resume=False)
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"text": "not ours"}\n')
    with pytest.raises(OutputExistsError, match="meta"):
        generate_corpus(teacher, PROMPTS[:4], foreign, **kw)
    assert out.read_bytes() == before


def test_bad_arguments_refused_before_generation(teacher, tokenizer, tmp_path, monkeypatch):
    def no_generate(*args, **kwargs):
        raise AssertionError("generate ran before the arguments were checked")

    monkeypatch.setattr(teacher, "generate", no_generate)
    out = tmp_path / "never.jsonl"
    bad = [
        (dict(prompts=[]), DataError, "no prompts"),
        (dict(prompts=["ok", "  "]), DataError, r"prompts\[1\] is an empty prompt"),
        (dict(prompts=["ok", 3]), DataError, r"prompts\[1\] is a int"),
        (dict(prompts=str(tmp_path / "missing.txt")), DataError, "does not exist"),
        (dict(max_new_tokens=0), ConfigError, "max_new_tokens"),
        (dict(batch_size=-1), ConfigError, "batch_size"),
        (dict(temperature=0.0), ConfigError, "temperature"),
        (dict(top_p=0.0), ConfigError, "top_p"),
        (dict(top_p=1.5), ConfigError, "top_p"),
        (dict(seed=-1), ConfigError, "seed"),
    ]
    for change, error, message in bad:
        args = dict(prompts=PROMPTS, tokenizer=tokenizer, progress=False) | change
        with pytest.raises(error, match=message):
            generate_corpus(teacher, out_path=out, **args)
    assert not out.exists() and not (tmp_path / "never.jsonl.meta.json").exists()
    monkeypatch.undo()
    # sampling settings do not apply to greedy decoding, so they are not checked there
    generate_corpus(teacher, PROMPTS[:1], out, tokenizer=tokenizer, max_new_tokens=2, do_sample=False,
                    temperature=0.0, top_p=7, progress=False)
    assert len(_rows(out)) == 1


def test_tokenizer_without_pad_token_is_left_unchanged(teacher, tokenizer, tmp_path):
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    no_pad.padding_side = "right"
    kw = dict(max_new_tokens=8, batch_size=4, do_sample=False, progress=False)
    generate_corpus(teacher, PROMPTS, tmp_path / "a.jsonl", tokenizer=no_pad, **kw)
    generate_corpus(teacher, PROMPTS, tmp_path / "b.jsonl", tokenizer=tokenizer, **kw)
    assert no_pad.pad_token is None and no_pad.padding_side == "right"
    # padding with EOS instead of <pad> changes nothing: padded positions are masked
    assert [r["text"] for r in _rows(tmp_path / "a.jsonl")] == [r["text"] for r in _rows(tmp_path / "b.jsonl")]


def test_prompt_files_and_prompts_from_documents(teacher, tokenizer, tmp_path):
    text_file = tmp_path / "prompts.txt"
    text_file.write_text("first prompt\n\n  \nsecond prompt\n")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "first prompt"}\n\n{"text": "second prompt"}\n')
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    kw = dict(tokenizer=tokenizer, max_new_tokens=3, do_sample=False, progress=False)
    generate_corpus(teacher, text_file, a, **kw)
    generate_corpus(teacher, jsonl, b, **kw)
    assert [r["prompt"] for r in _rows(a)] == ["first prompt", "second prompt"]
    assert [r["completion"] for r in _rows(a)] == [r["completion"] for r in _rows(b)]

    docs = [SAMPLE_TEXT[i:i + 300] for i in range(0, 3000, 300)]
    prompts = prompts_from_documents(docs, tokenizer, prompt_tokens=16, max_prompts=5, skip_tokens=7)
    ids: list[int] = []
    for d in docs:  # the reference: tokenize, join with EOS, skip, cut, decode
        ids += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = ids[7:]
    expected = [tokenizer.decode(ids[i * 16:(i + 1) * 16], skip_special_tokens=True) for i in range(5)]
    assert prompts == expected
    with pytest.raises(ConfigError, match="prompt_tokens"):
        prompts_from_documents(docs, tokenizer, prompt_tokens=1)


def _naive_score(teacher, reference, ids: list[int]) -> float:
    x = torch.tensor([ids])
    with torch.no_grad():
        return float(-teacher(x, labels=x).loss + reference(x, labels=x).loss)


def test_difference_scores_match_naive_per_document(teacher, tokenizer, tmp_path):
    reference = tiny_model("llama", seed=3, num_hidden_layers=1)
    reference.train()
    docs = [SAMPLE_TEXT[s:s + n] for s, n in [(0, 40), (50, 200), (300, 15), (400, 90), (700, 400), (1200, 60),
                                               (1300, 120), (1500, 33), (1600, 250)]]
    docs.insert(3, "a")  # one token: skipped
    seq_len = 24
    out = tmp_path / "kept.jsonl"
    report = select_by_difference(teacher, reference, docs, tokenizer=tokenizer, keep_fraction=0.4, seq_len=seq_len,
                                  batch_size=3, out_path=out, progress=False)
    assert reference.training and not teacher.training
    reference.eval()
    scored = [d for d in docs if len(tokenizer(d, add_special_tokens=False)["input_ids"]) >= 2]
    naive = [_naive_score(teacher, reference, tokenizer(d, add_special_tokens=False)["input_ids"][:seq_len])
             for d in scored]
    assert report.documents == len(scored) == 9 and report.skipped_short == 1
    assert max(abs(a - b) for a, b in zip(report.scores, naive)) < 1e-4
    n_keep = math.ceil(0.4 * len(naive))
    top = sorted(sorted(range(len(naive)), key=lambda i: -naive[i])[:n_keep])
    assert report.kept == n_keep and report.kept_indices == top
    rows = _rows(out)
    assert [r["text"] for r in rows] == [scored[i] for i in top]  # whole documents, original order
    assert max(abs(r["score"] - naive[i]) for r, i in zip(rows, top)) < 1e-4
    assert report.threshold == pytest.approx(min(naive[i] for i in top), abs=1e-4)
    assert report.mean_kept > report.mean_dropped
    assert list(iter_text(out)) == [scored[i] for i in top]
    # batch composition (padding) does not change the scores
    alone = select_by_difference(teacher, reference, docs, tokenizer=tokenizer, seq_len=seq_len, batch_size=1,
                                 progress=False)
    assert max(abs(a - b) for a, b in zip(alone.scores, report.scores)) < 1e-5
    with pytest.raises(OutputExistsError):
        select_by_difference(teacher, reference, docs, tokenizer=tokenizer, out_path=out, progress=False)


def test_difference_text_file_windows_and_refusals(teacher, tokenizer, tmp_path):
    reference = tiny_model("llama", seed=4, num_hidden_layers=1)
    path = tmp_path / "train.txt"
    path.write_text(SAMPLE_TEXT[:1500])
    report = select_by_difference(teacher, reference, path, tokenizer=tokenizer, seq_len=32, keep_fraction=1.0,
                                  progress=False)
    ids = tokenizer(SAMPLE_TEXT[:1500], add_special_tokens=False)["input_ids"]
    windows = [ids[i:i + 32] for i in range(0, len(ids), 32)]
    windows = [w for w in windows if len(w) >= 2]
    assert report.documents == len(windows) and report.kept == len(windows)
    naive = [_naive_score(teacher, reference, w) for w in windows]
    assert max(abs(a - b) for a, b in zip(report.scores, naive)) < 1e-4
    capped = select_by_difference(teacher, reference, path, tokenizer=tokenizer, seq_len=32, max_documents=3,
                                  progress=False)
    assert capped.documents == 3

    other_vocab = tiny_model("llama", vocab_size=1000, num_hidden_layers=1)
    with pytest.raises(DataError, match="reference"):
        select_by_difference(teacher, other_vocab, path, tokenizer=tokenizer, progress=False)
    for kwargs, message in [({"keep_fraction": 0}, "keep_fraction"), ({"keep_fraction": 1.5}, "keep_fraction"),
                            ({"seq_len": 1}, "seq_len"), ({"batch_size": 0}, "batch_size"),
                            ({"max_documents": 0}, "max_documents")]:
        with pytest.raises(ConfigError, match=message):
            select_by_difference(teacher, reference, path, tokenizer=tokenizer, progress=False, **kwargs)
    with pytest.raises(DataError, match="does not exist"):
        select_by_difference(teacher, reference, str(tmp_path / "nope.txt"), tokenizer=tokenizer, progress=False)
