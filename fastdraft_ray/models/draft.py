"""Derive a draft from any target: same family, vocabulary, special tokens, rope and tokenizer, smaller shape.

Also: parameter counting, picking widths for a parameter budget, save/load as a plain HF folder, and the
compatibility check every draft must pass before speculative decoding. Optional (``DraftConfig``): a
vocabulary-trimmed output head (``head_vocab``, :mod:`.trimmed_head`, kept set from :mod:`.vocab`) and
target-derived initialisation (``init``, :mod:`.init`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedModel

from fastdraft_ray.config import DraftConfig
from fastdraft_ray.models.init import check_init_method, init_from_target, layers_shape
from fastdraft_ray.models.trimmed_head import trimmed_config, trimmed_head

log = logging.getLogger(__name__)


class IncompatibleDraftError(ValueError):
    """Draft and target disagree on vocabulary or special tokens: speculative decoding would be wrong."""


@dataclass(frozen=True)
class ShapeKeys:
    """Names of the shape attributes in one family's HF config (None: the family has no such knob)."""

    layers: str = "num_hidden_layers"
    hidden: str = "hidden_size"
    heads: str = "num_attention_heads"
    kv_heads: str | None = "num_key_value_heads"
    intermediate: str = "intermediate_size"
    head_dim: str | None = "head_dim"


_LLAMA_LIKE = ShapeKeys()
FAMILIES: dict[str, ShapeKeys] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "gpt_neox": ShapeKeys(kv_heads=None, head_dim=None),
}
# Per-layer lists and counts that must be recomputed for the draft's depth (the config's defaults do that).
_DEPTH_DEPENDENT = ("layer_types",)
_DROP = (
    "model_type",
    "_name_or_path",
    "quantization_config",
    "auto_map",
    "architectures",
    "transformers_version",
    "dtype",
)
_SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_WIDTHS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size")


def head_dim_of(config: PretrainedConfig) -> int:
    """The attention head width of a config (``head_dim``, else hidden / heads)."""
    head_dim = getattr(config, "head_dim", None)
    return head_dim or config.hidden_size // config.num_attention_heads


def derive_draft_config(target: PretrainedConfig, shape: DraftConfig | None = None) -> PretrainedConfig:
    """A draft config of the target's family with ``shape``'s depth and widths.

    Vocabulary size, special-token ids and rope settings are copied from the target. Unknown families fall
    back to Llama (logged). ``shape.init == "layers"`` takes the widths from the target; ``shape.head_vocab > 0``
    gives the trimmed-head twin of the family config (:func:`.trimmed_head.trimmed_config`).
    """
    shape = shape or DraftConfig()
    check_init_method(shape.init)
    if shape.init == "layers":
        shape = layers_shape(target, shape)
    base = _derive_family_config(target, shape)
    if not shape.head_vocab:
        return base
    if not 0 < shape.head_vocab <= base.vocab_size:
        raise ValueError(
            f"draft.head_vocab={shape.head_vocab} must be 0 (full vocabulary) or in 1..{base.vocab_size} "
            "(the target's vocabulary size)"
        )
    return trimmed_config(base, shape.head_vocab)


def _derive_family_config(target: PretrainedConfig, shape: DraftConfig) -> PretrainedConfig:
    if shape.num_heads <= 0 or shape.num_kv_heads <= 0 or shape.num_heads % shape.num_kv_heads:
        raise ValueError(
            f"num_kv_heads={shape.num_kv_heads} must be positive and divide num_heads={shape.num_heads}"
        )
    if shape.hidden_size % shape.num_heads:
        raise ValueError(f"hidden_size={shape.hidden_size} must be divisible by num_heads={shape.num_heads}")
    family = target.model_type
    keys = FAMILIES.get(family)
    if keys is None:
        log.warning("target family %r has no derivation rule; building a Llama-family draft instead", family)
        return _llama_fallback(target, shape)

    values = {k: v for k, v in target.to_dict().items() if k not in _DROP and k not in _DEPTH_DEPENDENT}
    values[keys.layers] = shape.num_layers
    values[keys.hidden] = shape.hidden_size
    values[keys.heads] = shape.num_heads
    values[keys.intermediate] = shape.intermediate_size
    if keys.kv_heads:
        values[keys.kv_heads] = shape.num_kv_heads
    if keys.head_dim:
        values[keys.head_dim] = shape.hidden_size // shape.num_heads
    if "max_window_layers" in values:
        values["max_window_layers"] = min(values["max_window_layers"], shape.num_layers)
    if shape.tie_word_embeddings is not None:
        values["tie_word_embeddings"] = shape.tie_word_embeddings
    _check_rope_head_dim(target, shape)
    return AutoConfig.for_model(family, **values)


def _check_rope_head_dim(target: PretrainedConfig, shape: DraftConfig) -> None:
    """Rope scalings with per-dimension factors (e.g. longrope) only fit drafts with the target's head_dim."""
    rope = getattr(target, "rope_parameters", None) or {}
    if any(isinstance(v, list) for v in rope.values()) and shape.hidden_size // shape.num_heads != head_dim_of(
        target
    ):
        raise ValueError(
            f"the target's rope scaling has per-dimension factors, so the draft needs head_dim={head_dim_of(target)}: "
            f"choose num_heads = hidden_size / {head_dim_of(target)}"
        )


def _llama_fallback(target: PretrainedConfig, shape: DraftConfig) -> LlamaConfig:
    text = target.get_text_config() if hasattr(target, "get_text_config") else target
    rope_theta = (getattr(text, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return LlamaConfig(
        vocab_size=text.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.hidden_size // shape.num_heads,
        max_position_embeddings=getattr(text, "max_position_embeddings", None) or 2048,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=shape.tie_word_embeddings if shape.tie_word_embeddings is not None else True,
        **{k: getattr(text, k, None) for k in _SPECIAL_IDS},
    )


def build_draft(config: PretrainedConfig, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised draft model (fp32, eval mode) from a draft config."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def new_draft(
    target: PretrainedConfig,
    shape: DraftConfig,
    seed: int = 0,
    *,
    kept_ids: torch.Tensor | None = None,
    target_model: PreTrainedModel | None = None,
) -> PreTrainedModel:
    """A new draft for ``target``: ``shape``'s widths, or widths picked for ``shape.params_budget`` when set.

    ``shape.head_vocab > 0`` needs ``kept_ids`` (:func:`.vocab.kept_token_ids`); ``shape.init`` other than
    ``random`` needs the loaded ``target_model`` to copy or project weights from.
    """
    check_init_method(shape.init)
    if shape.params_budget and shape.init != "layers":
        budget = draft_for_budget(
            target,
            shape.params_budget,
            layers=shape.num_layers if shape.num_layers else None,
            head_vocab=shape.head_vocab,
        )
        shape = dataclasses.replace(shape, **{f: getattr(budget, f) for f in _WIDTHS}, params_budget=None)
    if shape.head_vocab and kept_ids is None:
        raise ValueError(
            f"draft.head_vocab={shape.head_vocab} needs the kept token ids: count them on the training data "
            "(fastdraft_ray.models.vocab.token_counts + kept_token_ids)"
        )
    if shape.init != "random" and target_model is None:
        raise ValueError(f"draft.init={shape.init} needs the target's weights (pass target_model)")
    draft = build_draft(derive_draft_config(target, shape), seed=seed)
    if kept_ids is not None:
        head = trimmed_head(draft)
        if head is None:
            raise ValueError("kept_ids given but draft.head_vocab is 0")
        head.set_kept_ids(kept_ids)
    if shape.init != "random":
        record = init_from_target(draft, target_model, shape.init, shape.init_layers or None)
        log.info("draft initialised from the target: %s", record)
    return draft


@dataclass(frozen=True)
class ParamCount:
    """Parameters of a model: embedding = input embedding (+ LM head when untied)."""

    total: int
    embedding: int
    non_embedding: int


def count_params(model_or_config: PreTrainedModel | PretrainedConfig) -> ParamCount:
    """Count parameters of a model, or of a config without allocating weights (meta device)."""
    if isinstance(model_or_config, PretrainedConfig):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_or_config)
    else:
        model = model_or_config
    seen: set[int] = set()
    total = embedding = 0
    embed_ids = {id(p) for p in model.get_input_embeddings().parameters()}
    out = model.get_output_embeddings()
    embed_ids |= {id(p) for p in out.parameters()} if out is not None else set()
    for p in model.parameters():  # parameters() already skips tied duplicates
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        embedding += p.numel() if id(p) in embed_ids else 0
    return ParamCount(total, embedding, total - embedding)


def param_bytes(model: PreTrainedModel) -> int:
    """Bytes of all (unique) parameters in their current dtypes."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def draft_for_budget(
    target: PretrainedConfig,
    params: float = 50e6,
    layers: int | None = None,
    head_dim: int | None = None,
    head_vocab: int = 0,
) -> DraftConfig:
    """Choose depth/widths whose total parameter count is as close to ``params`` as possible (not above).

    Widths are multiples of ``head_dim`` (default: the target's); the MLP is 8/3 x hidden for gated MLPs
    (4x for GPT-NeoX); the KV-head ratio follows the target's where it divides. ``layers=None`` tries 2..16
    layers and, among shapes within 10% of the closest fit, keeps the one whose hidden/layers is nearest 64.
    ``head_vocab`` counts a trimmed head of that many rows instead of the full-vocabulary one.
    """
    head_dim = head_dim or head_dim_of(target)
    kv_ratio = max(
        1,
        target.num_attention_heads // (getattr(target, "num_key_value_heads", None) or target.num_attention_heads),
    )
    mlp_mult = 4.0 if target.model_type == "gpt_neox" else 8 / 3

    def shape_for(n_layers: int, heads: int) -> DraftConfig:
        hidden = heads * head_dim
        kv = max(d for d in range(1, heads + 1) if heads % d == 0 and d * kv_ratio <= max(heads, kv_ratio))
        inter = int(round(hidden * mlp_mult / 64)) * 64 or 64
        return DraftConfig(
            num_layers=n_layers,
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=kv,
            intermediate_size=inter,
            head_vocab=head_vocab,
        )

    candidates = []
    for n_layers in [layers] if layers else range(2, 17):
        lo, hi = 0, max(1, target.hidden_size // head_dim * 2)
        while lo < hi:  # largest head count whose draft fits the budget
            mid = (lo + hi + 1) // 2
            if count_params(derive_draft_config(target, shape_for(n_layers, mid))).total <= params:
                lo = mid
            else:
                hi = mid - 1
        if lo >= (1 if layers else 2):
            shape = shape_for(n_layers, lo)
            candidates.append((count_params(derive_draft_config(target, shape)).total, shape))
    if not candidates:
        raise ValueError(
            f"no draft of the target's family fits {params:.3g} parameters (the embedding alone may not)"
        )
    # Free depth: among shapes using >= 90% of the budget, prefer hidden/layers near 64 (typical of small LMs).
    closest = max(total for total, _ in candidates)
    fitting = [shape for total, shape in candidates if total >= 0.9 * closest]
    return min(fitting, key=lambda c: abs(math.log(c.hidden_size / c.num_layers / 64)))


def save_draft(model: PreTrainedModel, tokenizer, out_dir: str | Path) -> Path:
    """Save as a plain HF folder: safetensors weights, config, generation config and the target's tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def load_draft(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a draft folder with ``AutoModelForCausalLM`` (eval mode); trimmed-head drafts load with the locally
    registered classes (no remote code)."""
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def _config_of(obj) -> PretrainedConfig:
    return obj if isinstance(obj, PretrainedConfig) else obj.config


def _vocab_size(config: PretrainedConfig) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return text.vocab_size


def check_compatible(target, draft, target_tokenizer=None, draft_tokenizer=None) -> None:
    """Raise ``IncompatibleDraftError`` unless draft and target share vocabulary size, special-token ids and
    (when both tokenizers are given) the same token->id mapping. Accepts models or configs."""
    t_cfg, d_cfg = _config_of(target), _config_of(draft)
    problems = []
    if _vocab_size(t_cfg) != _vocab_size(d_cfg):
        problems.append(f"vocab_size: target {_vocab_size(t_cfg)} vs draft {_vocab_size(d_cfg)}")
    for key in _SPECIAL_IDS:
        t_id, d_id = getattr(t_cfg, key, None), getattr(d_cfg, key, None)
        if key == "pad_token_id" and (t_id is None or d_id is None):
            continue  # padding is unused in batch-1 decoding; only a conflicting id matters
        if t_id != d_id:
            problems.append(f"{key}: target {t_id} vs draft {d_id}")
    if target_tokenizer is not None and draft_tokenizer is not None:
        t_vocab, d_vocab = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
        differing = sorted(
            (t_vocab.get(tok), d_vocab.get(tok), tok)
            for tok in set(t_vocab) | set(d_vocab)
            if t_vocab.get(tok) != d_vocab.get(tok)
        )
        if differing:
            shown = ", ".join(f"{tok!r}: target id {a} vs draft id {b}" for a, b, tok in differing[:5])
            problems.append(f"{len(differing)} tokens map to different ids ({shown})")
    if problems:
        raise IncompatibleDraftError(
            "draft is not vocabulary-compatible with the target, so speculative decoding would emit wrong tokens: "
            + "; ".join(problems)
            + ". Derive the draft from this target (fastdraft_ray.models.draft.derive_draft_config)."
        )
