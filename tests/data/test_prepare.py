"""Prepare with Ray Data: real tokenizer on real embedded corpora, mixtures, recounts, resume, bad input."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pyarrow.parquet as pq
import pytest

from fastdraft_ray.config import DataConfig
from fastdraft_ray.data.holdout import is_reserved_for_eval
from fastdraft_ray.data.prepare import PrepareError, prepare
from fastdraft_ray.data.progress import Interrupted
from fastdraft_ray.data.sources import SourceError, iter_documents
from fastdraft_ray.models.target import load_tokenizer, tokenizer_fingerprint

TOKENIZER = "embedded:smollm2-135m-instruct"
WORDS = "alpha beta gamma delta river mountain quiet yellow seven window garden music paper silver".split()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER)


def synthetic_jsonl(path, n, seed=0, words=40):
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(
                json.dumps({"text": f"doc {seed}-{i}. " + " ".join(rng.choice(WORDS) for _ in range(words))})
                + "\n"
            )
    return str(path)


def read_rows(out, split="train"):
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    parts = [
        pq.read_table(os.path.join(out, s["file"])).column("input_ids")
        for s in manifest["splits"][split]["shards"]
    ]
    rows = [np.asarray(p.combine_chunks().values).reshape(-1, manifest["row_len"]) for p in parts]
    return manifest, (np.concatenate(rows) if rows else np.empty((0, manifest["row_len"]), np.int32))


def test_code_text_mixture_with_real_tokenizer(ray_local, tmp_path, tok):
    data = DataConfig(
        sources={"code": "embedded:code", "text": "embedded:text"},
        weights={"code": 2, "text": 1},
        token_budget=120_000,
        seq_len=128,
        rows_per_shard=256,
        val_fraction=0.05,
    )
    m = prepare(data, TOKENIZER, str(tmp_path / "mix"), progress=False)
    assert (
        m["tokenizer_hash"] == tokenizer_fingerprint(tok) and m["vocab_size"] == len(tok) and m["seq_len"] == 128
    )
    by_name = {s["name"]: s for s in m["sources"]}
    assert abs(by_name["code"]["proportion"]["train"] - 2 / 3) < 0.02  # asked 2:1 by tokens
    assert abs(by_name["text"]["proportion"]["train"] - 1 / 3) < 0.02
    for split in ("train", "val"):
        manifest, rows = read_rows(tmp_path / "mix", split)
        assert rows.dtype == np.int32 and rows.shape == (m["rows"][split], 129)
        assert rows.size == m["tokens"][split] == m["splits"][split]["tokens"]  # manifest matches a recount
        assert sum(s["tokens_in_rows"][split] for s in m["sources"]) == rows.size
        assert m["rows"][split] > 0
    _, rows = read_rows(tmp_path / "mix")
    assert (rows == tok.eos_token_id).sum() >= m["splits"]["train"]["documents"] - 2
    text = tok.decode(random.Random(0).choice(list(rows)))
    letters = sum(c.isalpha() or c.isspace() for c in text) / len(text)
    assert letters > 0.6 and len(text.split()) > 20, text  # readable prose/code, not id soup
    # same inputs again: nothing to do; different inputs into the same folder: refused
    assert prepare(data, TOKENIZER, str(tmp_path / "mix"), progress=False)["fingerprint"] == m["fingerprint"]
    data.token_budget = 50_000
    with pytest.raises(PrepareError, match="already holds a prepared dataset"):
        prepare(data, TOKENIZER, str(tmp_path / "mix"), progress=False)


def test_whole_corpus_token_count_matches_an_independent_tokenization(ray_local, tmp_path, tok):
    data = DataConfig(
        sources={"wiki": "embedded:wiki"},
        token_budget=10_000_000,
        seq_len=64,
        rows_per_shard=500,
        val_fraction=0.1,
    )
    m = prepare(data, TOKENIZER, str(tmp_path / "wiki"), progress=False)
    docs = list(iter_documents("embedded:wiki"))
    kept = [d.text for d in docs if not is_reserved_for_eval(d.text)]
    expected = sum(len(ids) + 1 for ids in tok(kept, add_special_tokens=False)["input_ids"])  # + EOS each
    assert m["tokens"]["train"] + m["tokens"]["val"] + sum(m["dropped_tail_tokens"].values()) == expected
    assert m["dropped"]["reserved_for_eval"] == len(docs) - len(kept) > 0
    (src,) = m["sources"]
    assert src["exhausted"] and src["documents"]["train"] + src["documents"]["val"] == len(kept)


def test_interrupted_prepare_resumes_without_redoing_shards(ray_local, tmp_path):
    corpus = synthetic_jsonl(tmp_path / "c.jsonl", 400)
    data = DataConfig(sources={"s": corpus}, token_budget=14_000, seq_len=31, rows_per_shard=40, val_fraction=0.05)
    full = prepare(data, TOKENIZER, str(tmp_path / "full"), progress=False)
    out = str(tmp_path / "resumed")
    with pytest.raises(Interrupted):
        prepare(data, TOKENIZER, out, progress=False, stop_after_shards=3)
    assert os.path.exists(f"{out}/.progress/state.json") and not os.path.exists(f"{out}/manifest.json")
    first = {f: os.stat(f"{out}/train/{f}").st_mtime_ns for f in sorted(os.listdir(f"{out}/train"))}
    assert len(first) == 3
    resumed = prepare(data, TOKENIZER, out, progress=False)
    for f, mtime in first.items():
        assert os.stat(f"{out}/train/{f}").st_mtime_ns == mtime  # finished shards were not rewritten
    assert resumed["splits"] == full["splits"] and resumed["sources"] == full["sources"]
    for split in ("train", "val"):
        assert np.array_equal(read_rows(out, split)[1], read_rows(tmp_path / "full", split)[1])
    assert len(full["splits"]["train"]["shards"]) > 4 and not os.path.exists(f"{out}/.progress")


def test_duplicates_and_non_utf8_are_handled(ray_local, tmp_path):
    a = synthetic_jsonl(tmp_path / "a.jsonl", 30, seed=1)
    with open(tmp_path / "b.jsonl", "wb") as fh:
        fh.write(open(a, "rb").read())  # every document of b duplicates one of a
        fh.write(b'{"text": "caf\xe9 au lait, na\xefve r\xe9sum\xe9 of the garden"}\n')
    data = DataConfig(
        sources={"a": a, "b": str(tmp_path / "b.jsonl")}, token_budget=100_000, seq_len=16, val_fraction=0.0
    )
    m = prepare(data, TOKENIZER, str(tmp_path / "out"), progress=False)
    by_name = {s["name"]: s for s in m["sources"]}
    kept_a = sum(not is_reserved_for_eval(d.text) for d in iter_documents(a))
    assert by_name["b"]["dropped"]["duplicate"] == kept_a and by_name["b"]["documents"]["train"] == 1
    assert by_name["b"]["replaced_bytes"] == 4 and m["replaced_bytes"] == {str(tmp_path / "b.jsonl"): 4}


def test_bad_sources_fail_with_the_file_named(ray_local, tmp_path):
    good = synthetic_jsonl(tmp_path / "good.jsonl", 20)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    data = DataConfig(sources={"good": good, "bad": str(bad)}, token_budget=5_000, seq_len=16)
    with pytest.raises(SourceError, match=r"bad.jsonl line 2: not valid JSON"):
        prepare(data, TOKENIZER, str(tmp_path / "o1"), progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "   "}\n\n{"text": ""}\n')
    data = DataConfig(sources={"good": good, "empty": str(empty)}, token_budget=5_000, seq_len=16)
    with pytest.raises(SourceError, match=r"source 'empty' \(.*empty.jsonl\) is empty: no usable documents"):
        prepare(data, TOKENIZER, str(tmp_path / "o2"), progress=False)
    data = DataConfig(sources={"none": str(tmp_path / "none*.jsonl")}, token_budget=5_000)
    with pytest.raises(SourceError, match="no files match"):
        prepare(data, TOKENIZER, str(tmp_path / "o3"), progress=False)


@pytest.mark.slow
def test_default_budget_cp_mixture(ray_local, tmp_path, tok):
    """The CP stage's 2:1 code:text mixture at the default 2M-token budget, seq_len 512."""
    data = DataConfig(sources={"code": "embedded:code", "text": "embedded:text"}, weights={"code": 2, "text": 1})
    m = prepare(data, TOKENIZER, str(tmp_path / "cp"), progress=False)
    for split in ("train", "val"):
        _, rows = read_rows(tmp_path / "cp", split)
        assert rows.shape == (m["rows"][split], 513) and rows.size == m["tokens"][split] > 0
    for s in m["sources"]:
        assert abs(s["proportion"]["train"] - s["requested_proportion"]) < 0.02, s
    assert m["dropped"]["reserved_for_eval"] > 0
