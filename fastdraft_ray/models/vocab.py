"""Choosing the kept set of a vocabulary-trimmed draft head, and trimming an existing full-head draft.

The kept set = every special token of the target's tokenizer (EOS and the chat-template tokens must stay
proposable) + the most frequent other tokens of the training data, up to K. Counts come from prepared token
shards (``manifest.json`` + parquet ``input_ids`` rows; FT rows are decoded with their ``kd_layout``) or from
a KD folder's ``response_ids`` (the target's own outputs: the closest sample of what the draft must predict).
Ties are broken by the smaller id, so the set is a deterministic function of the counts.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel

from fastdraft_ray.layout import KDLayout
from fastdraft_ray.models.trimmed_head import MODEL_TYPE_PREFIX, TrimmedLMHead, trimmed_config, trimmed_head

log = logging.getLogger(__name__)


def _count_array(counts: np.ndarray, ids: np.ndarray, vocab_size: int) -> np.ndarray:
    ids = ids[(ids >= 0) & (ids < vocab_size)]
    return counts + np.bincount(ids, minlength=vocab_size)[:vocab_size]


def token_counts(source: str | Path, vocab_size: int, max_tokens: int = 50_000_000) -> np.ndarray:
    """Occurrences of each token id ``[vocab_size]`` in a prepared shard folder (train split) or a KD folder
    (``responses/*/part-*.parquet``, column ``response_ids``), reading at most about ``max_tokens`` tokens."""
    import pyarrow.parquet as pq

    root = Path(source)
    counts = np.zeros(vocab_size, dtype=np.int64)
    manifest_path = root / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        column = manifest.get("column", "input_ids")
        files = [root / s["file"] for s in manifest["splits"]["train"]["shards"]]
        ids_width = manifest["kd_layout"]["seq_len"] + 1 if manifest.get("kd_layout") else None
    else:
        files = KDLayout(root).response_files()
        column, ids_width = "response_ids", None
    if not files:
        raise FileNotFoundError(
            f"{source} is neither a prepared shard folder (manifest.json) nor a KD folder (responses/*/part-*.parquet)"
        )
    seen = 0
    for path in files:
        values = pq.read_table(path, columns=[column]).column(column).combine_chunks()
        if ids_width is None:  # list<int> rows: count every id
            flat = np.asarray(values.flatten(), dtype=np.int64)
        else:  # fixed-width FT rows: only the leading seq_len + 1 token ids are tokens
            flat = np.stack(values.to_numpy(zero_copy_only=False))[:, :ids_width].astype(np.int64).ravel()
        counts = _count_array(counts, flat, vocab_size)
        seen += flat.size
        if seen >= max_tokens:
            break
    if seen == 0:
        raise ValueError(f"{source} holds no tokens to count")
    return counts


def special_token_ids(tokenizer, config: PretrainedConfig | None = None) -> list[int]:
    """Ids a trimmed head must always keep: the tokenizer's special and added-special tokens, and the config's
    (and generation config's) bos/eos/pad ids."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids |= {i for i, tok in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items() if tok.special}
    for source in (config, getattr(config, "generation_config", None)):
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(source, key, None) if source is not None else None
            ids |= set(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
    return sorted(ids)


def kept_token_ids(counts: np.ndarray, k: int, required: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
    """The ``k`` kept ids (sorted): all of ``required`` plus the most frequent others (ties: smaller id)."""
    vocab = len(counts)
    required = sorted(set(int(i) for i in required))
    if k > vocab:
        raise ValueError(f"draft.head_vocab={k} exceeds the target's vocabulary of {vocab} tokens")
    if k < len(required):
        raise ValueError(
            f"draft.head_vocab={k} is smaller than the {len(required)} special tokens a draft must be able to "
            f"propose (ids {required[:20]}{'...' if len(required) > 20 else ''}): use at least {len(required)}"
        )
    if any(i < 0 or i >= vocab for i in required):
        raise ValueError(f"special token ids {required} fall outside the vocabulary of {vocab}")
    order = np.lexsort((np.arange(vocab), -np.asarray(counts)))  # most frequent first, then smaller id
    chosen = set(required)
    for i in order:
        if len(chosen) >= k:
            break
        chosen.add(int(i))
    return torch.tensor(sorted(chosen), dtype=torch.long)


def coverage(counts: np.ndarray, kept_ids: torch.Tensor) -> float:
    """Fraction of counted tokens that fall in the kept set."""
    total = counts.sum()
    return float(counts[kept_ids.numpy()].sum() / total) if total else 0.0


def trim_draft(draft: PreTrainedModel, kept_ids: torch.Tensor) -> PreTrainedModel:
    """A trimmed-head copy of a full-head draft: same body and input embedding, head rows = the old output
    embedding's rows at ``kept_ids`` (so its kept-set logits are unchanged)."""
    if trimmed_head(draft) is not None:
        raise ValueError("the draft's head is already trimmed")
    config = trimmed_config(draft.config, len(kept_ids))
    from transformers import AutoModelForCausalLM

    trimmed = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v for k, v in draft.state_dict().items() if not k.startswith("lm_head.")}
    missing, unexpected = trimmed.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.linear.weight", "lm_head.kept_ids"}:
        raise ValueError(f"cannot transfer weights: missing {missing}, unexpected {unexpected}")
    trimmed.generation_config = copy.deepcopy(draft.generation_config)
    head: TrimmedLMHead = trimmed.lm_head
    head.set_kept_ids(kept_ids)
    with torch.no_grad():
        head.linear.weight.copy_(draft.get_output_embeddings().weight[head.kept_ids].float())
    return trimmed.eval()


def untrim_draft(draft: PreTrainedModel) -> PreTrainedModel:
    """The stock-architecture twin of a trimmed-head draft, for servers that load drafts without remote code
    (vLLM's and SGLang's draft-model paths, llama.cpp conversion): the family's own causal LM with a
    full-vocabulary ``lm_head`` holding the kept rows and zero rows elsewhere. Every token outside the kept set
    gets logit 0 instead of -inf, so the draft's distribution (and its acceptance) can differ from the trimmed
    one; speculative decoding with it stays lossless, as with any draft."""
    head = trimmed_head(draft)
    if head is None:
        raise ValueError("the draft's head is not trimmed: it already is a stock architecture")
    base_type = draft.config.model_type.removeprefix(MODEL_TYPE_PREFIX)
    from transformers import AutoConfig, AutoModelForCausalLM

    values = {
        k: v
        for k, v in draft.config.to_dict().items()
        if k not in ("model_type", "auto_map", "architectures", "head_vocab")
    }
    config = AutoConfig.for_model(base_type, **values)
    stock = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v for k, v in draft.state_dict().items() if not k.startswith("lm_head.")}
    missing, unexpected = stock.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"cannot transfer weights: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        full = torch.zeros_like(stock.lm_head.weight)
        full[head.kept_ids] = head.linear.weight.float()
        stock.lm_head.weight.copy_(full)
    stock.generation_config = copy.deepcopy(draft.generation_config)
    return stock.eval()
