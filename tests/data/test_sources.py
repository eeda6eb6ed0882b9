"""Sources: spec parsing, every file format, byte-range splitting, bad input errors, embedded corpora."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from fastdraft_ray.data import embedded, sources
from fastdraft_ray.data.holdout import is_reserved_for_eval
from fastdraft_ray.data.sources import SourceError, iter_documents, parse_spec, plan_units

DOCS = [f"document number {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(40)]


def texts(spec, **kw):
    return [d.text for d in iter_documents(spec, **kw)]


def write_jsonl(path, docs, key="text"):
    path.write_text("".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def test_parse_spec_and_unknown_option():
    spec = parse_spec("data/*.jsonl?field=content&split_by=line")
    assert (spec.kind, spec.location, spec.options) == (
        "files",
        "data/*.jsonl",
        {"field": "content", "split_by": "line"},
    )
    assert parse_spec("hub:allenai/c4?config=en").kind == "hub"
    with pytest.raises(SourceError, match="unknown option.*colour"):
        parse_spec("x.jsonl?colour=red")
    with pytest.raises(SourceError, match="unknown embedded corpus 'nope'"):
        plan_units("embedded:nope")


def test_all_formats_read_the_same_documents(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", DOCS)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress((tmp_path / "a.jsonl").read_bytes()))
    (tmp_path / "c.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress((tmp_path / "a.jsonl").read_bytes())
    )
    (tmp_path / "d.json").write_text(json.dumps([{"body": d} for d in DOCS]))
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "e.parquet", row_group_size=7)
    (tmp_path / "f.txt").write_text("\n".join(DOCS) + "\n")
    assert texts(str(tmp_path / "a.jsonl")) == DOCS
    assert texts(str(tmp_path / "b.jsonl.gz")) == DOCS
    assert texts(str(tmp_path / "c.jsonl.zst")) == DOCS
    assert texts(str(tmp_path / "d.json") + "?field=body") == DOCS
    assert len(plan_units(str(tmp_path / "e.parquet"))) == 6  # one unit per row group
    assert texts(str(tmp_path / "e.parquet")) == DOCS
    assert texts(str(tmp_path / "f.txt") + "?split_by=line") == DOCS
    assert texts(str(tmp_path / "f.txt")) == ["\n".join(DOCS) + "\n"]
    assert len(texts(str(tmp_path / "*.jsonl*"))) == 3 * len(DOCS)


def test_large_jsonl_is_split_into_byte_ranges_without_losing_lines(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "big.jsonl", DOCS)
    monkeypatch.setattr(sources, "SPLIT_BYTES", 301)
    units = plan_units(str(tmp_path / "big.jsonl"))
    assert len(units) > 5
    assert [d.text for u in units for d in sources.read_unit(u)] == DOCS


def test_chat_messages_use_the_chat_template(tmp_path, smollm2_dir):
    from fastdraft_ray.models.target import load_tokenizer

    tok = load_tokenizer(str(smollm2_dir))
    conv = [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"}]
    (tmp_path / "c.jsonl").write_text(json.dumps({"conversations": conv}) + "\n")
    (doc,) = iter_documents(str(tmp_path / "c.jsonl") + "?messages=conversations", tokenizer=tok)
    assert doc.messages == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    assert "<|im_start|>user\nHi there<|im_end|>" in doc.text
    (plain,) = iter_documents(str(tmp_path / "c.jsonl") + "?messages=conversations")
    assert plain.text == "Hi there\n\nHello!"


# ---------------------------------------------------------------------------------------------- bad input


def test_empty_source_errors_name_the_pattern(tmp_path):
    with pytest.raises(SourceError, match=r"is empty: no files match .*nothing-\*\.jsonl"):
        plan_units(str(tmp_path / "nothing-*.jsonl"))
    with pytest.raises(SourceError, match="missing.jsonl does not exist"):
        plan_units(str(tmp_path / "missing.jsonl"))


def test_corrupt_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(SourceError, match=r"bad.jsonl line 2: not valid JSON"):
        texts(str(path))


def test_missing_text_field_lists_the_fields(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", DOCS[:2], key="content")
    with pytest.raises(
        SourceError, match=r"f.jsonl line 1: record has no field 'text' \(fields: content, id\).*\?field="
    ):
        texts(str(path))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(SourceError, match=r"p.parquet: no column 'text' \(columns: body\)"):
        texts(str(tmp_path / "p.parquet"))


def test_corrupt_parquet_and_gzip_name_the_file(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(SourceError, match="cannot read parquet file .*x.parquet"):
        plan_units(str(tmp_path / "x.parquet"))
    (tmp_path / "y.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 50)[:-20])
    with pytest.raises(SourceError, match="cannot read .*y.jsonl.gz"):
        texts(str(tmp_path / "y.jsonl.gz"))
    (tmp_path / "z.dat").write_text("?")
    with pytest.raises(SourceError, match="z.dat: unknown file type"):
        plan_units(str(tmp_path / "z.dat"))


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "caf\xe9 cr\xe8me"}\n{"text": "ok \xef\xbf\xbd"}\n')
    docs = list(iter_documents(str(path)))
    assert [d.text for d in docs] == ["caf\ufffd cr\ufffdme", "ok \ufffd"]
    assert [d.replaced for d in docs] == [2, 0]  # a U+FFFD already in the file is not counted


def test_truncated_json_array(tmp_path):
    (tmp_path / "t.json").write_text('[{"text": "a"}, {"text": "b"}, {"text": "c')
    with pytest.raises(SourceError, match="t.json: truncated"):
        texts(str(tmp_path / "t.json"))
    with open(tmp_path / "t.json") as fh:
        assert [r["text"] for _, r in embedded.iter_json_array(fh, tolerate_truncation=True)] == ["a", "b"]


# ---------------------------------------------------------------------------------------------- embedded


def test_embedded_wiki_c4_and_reserved_selection():
    wiki = list(iter_documents("embedded:wiki"))
    assert len(wiki) == 30 and wiki[0].text.startswith("Anarchism")
    reserved = list(iter_documents("embedded:wiki", reserved=True))
    assert [d.doc_id for d in reserved] == [d.doc_id for d in wiki if is_reserved_for_eval(d.text)]
    assert 0 < len(reserved) < 30
    assert len(list(iter_documents("embedded:c4"))) == 300


def test_embedded_kjv_shakespeare_code_sharegpt():
    kjv = list(iter_documents("embedded:kjv"))
    assert len(kjv) == 1189 and kjv[0].text.startswith("Genesis 1\n\nIn the beginning God created")
    plays = {d.doc_id for d in iter_documents("embedded:shakespeare")}
    assert any("hamlet" in p for p in plays) and any("paradise" in p for p in plays)
    code = next(iter_documents("embedded:code"))
    assert code.doc_id.startswith("stdlib/") and code.doc_id.endswith(".py")
    chat = next(iter_documents("embedded:sharegpt"))
    assert chat.messages and chat.messages[0]["role"] in ("user", "system")
    labels = [u["path"].rsplit("/", 1)[1].split("-")[0] for u in plan_units("embedded:text")[:40]]
    assert {"shakespeare", "kjv", "wiki", "c4"} <= set(labels)  # the prose corpora are interleaved


def test_a_hub_corpus_without_text_is_refused_before_any_work():
    """The Stack v2 lists files by Software Heritage blob id: a recipe that trains on it would fail after hours
    of preparing the other sources. Parsing the spec refuses it, naming what to use instead; no shipped recipe
    uses it."""
    from fastdraft_ray.config import RECIPES_DIR, load_config, stage_config

    with pytest.raises(SourceError, match="blob ids, not file contents.*the-stack-dedup"):
        parse_spec("hub:bigcode/the-stack-v2-dedup")
    assert parse_spec("hub:bigcode/the-stack-dedup?data_dir=data/python&field=content").options == {
        "data_dir": "data/python",
        "field": "content",
    }
    for recipe in sorted(RECIPES_DIR.glob("*.yaml")):
        cfg = load_config(str(recipe))
        for stage in cfg.stages:
            for spec in stage_config(cfg, stage).data.sources.values():
                parse_spec(spec)  # raises for an unusable hub corpus
