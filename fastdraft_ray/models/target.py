"""Load any causal LM target and its tokenizer: embedded default, local HF folder, GGUF file, or hub id."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from fastdraft_ray import assets

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class TargetLoadError(RuntimeError):
    """The target could not be found or loaded; the message lists what was tried."""


def resolve_target(spec: str) -> tuple[str, str | None]:
    """Turn a target spec into ``(folder_or_hub_id, gguf_file_or_None)``.

    ``embedded:<name>`` -> cached HF folder; ``path/model.gguf`` -> (folder, file); a folder -> itself;
    anything else is treated as a hub id.
    """
    if spec.startswith("embedded:"):
        return str(assets.embedded_target_dir(spec.split(":", 1)[1])), None
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TargetLoadError(f"GGUF file {path} does not exist")
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").exists():
            raise TargetLoadError(f"{path} is a folder but has no config.json: not a Hugging Face model folder")
        return str(path), None
    if spec.startswith((".", "/", "~")):
        raise TargetLoadError(f"local target {spec!r} does not exist")
    return spec, None


def _hub_error(spec: str, exc: Exception) -> TargetLoadError:
    return TargetLoadError(
        f"could not load {spec!r} as a hub model ({type(exc).__name__}: {str(exc)[:200]}). Without a hub "
        "connection pass a local HF folder, a .gguf file, or embedded:smollm2-135m-instruct."
    )


def load_target_config(spec: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The target's config only (cheap; no weights)."""
    where, gguf = resolve_target(spec)
    try:
        return AutoConfig.from_pretrained(where, gguf_file=gguf, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise _hub_error(spec, exc) from exc


def load_generation_config(spec: str):
    """The target's generation config (its stop tokens among them) without the weights; the model config when the
    folder has no ``generation_config.json``."""
    from transformers import GenerationConfig

    where, _ = resolve_target(spec)
    try:
        return GenerationConfig.from_pretrained(where)
    except OSError:  # no generation_config.json: the model config's eos_token_id is what generate() uses
        return load_target_config(spec)


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """The target's tokenizer (also the draft's: drafts share it)."""
    where, gguf = resolve_target(spec)
    try:
        return AutoTokenizer.from_pretrained(where, gguf_file=gguf, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise _hub_error(spec, exc) from exc


def load_target(
    spec: str, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False
) -> tuple[PreTrainedModel, object]:
    """Load ``(model, tokenizer)`` in eval mode. GGUF files are dequantized on load (slow: cache them)."""
    if dtype not in DTYPES:
        raise TargetLoadError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    where, gguf = resolve_target(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where, gguf_file=gguf, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
        )
    except OSError as exc:
        raise _hub_error(spec, exc) from exc
    model.to(device).eval()
    return model, load_tokenizer(spec, trust_remote_code)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the vocabulary and special tokens: equal iff two tokenizers map text to the same ids."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "special_ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()
