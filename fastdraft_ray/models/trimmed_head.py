"""Vocabulary-trimmed draft head: the draft's output layer scores only K kept token ids (the most frequent target
tokens plus every special token) while its input embedding keeps the full vocabulary.

The head returns FULL-vocabulary logits with ``-inf`` outside the kept set, so a trimmed draft is a drop-in draft
for :func:`fastdraft_ray.specdec.decode.speculative_generate` (lossless: the draft's probabilities are exactly
what it samples from; kept-out tokens get probability 0 and are simply never proposed) and for transformers'
``model.generate(..., assistant_model=draft)``. Training asks for the K-wide logits instead (``kept_logits``):
the expensive ``hidden x vocab`` product and the softmax shrink by ``vocab / K``.

The model classes are the target family's causal LM with ``lm_head`` replaced by :class:`TrimmedLMHead`
(weights ``lm_head.linear.weight`` [K, hidden], buffer ``lm_head.kept_ids`` [K], both in the safetensors file),
registered under model types ``fastdraft_trimmed_<family>``. ``save_pretrained`` copies THIS file into the
folder and writes ``auto_map`` into config.json (transformers' custom-model mechanism), so
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads it anywhere; importing this
module registers the classes locally, so ``load_draft`` needs no remote code. The file must therefore stay
self-contained: it imports only torch and transformers.
"""

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    MistralModel,
    Phi3Config,
    Phi3ForCausalLM,
    Phi3Model,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Model,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
)

MODEL_TYPE_PREFIX = "fastdraft_trimmed_"
IGNORE_INDEX = -100  # targets outside the kept set (the default ignore_index of torch's cross-entropy)


class TrimmedLMHead(nn.Module):
    """``hidden -> logits`` over ``kept_ids`` only; full-vocabulary output puts ``-inf`` everywhere else."""

    def __init__(self, hidden_size: int, head_vocab: int, vocab_size: int):
        super().__init__()
        if not 0 < head_vocab <= vocab_size:
            raise ValueError(f"head_vocab must be in 1..vocab_size={vocab_size}, got {head_vocab}")
        self.linear = nn.Linear(hidden_size, head_vocab, bias=False)
        self.register_buffer("kept_ids", torch.arange(head_vocab, dtype=torch.long), persistent=True)
        self.vocab_size = vocab_size
        self.full_vocab = True  # False (inside ``kept_logits``): return the K-wide logits

    @property
    def weight(self) -> torch.Tensor:
        """The head's [K, hidden] weight (``get_output_embeddings().weight`` works as for a plain head)."""
        return self.linear.weight

    @property
    def head_vocab(self) -> int:
        return self.linear.out_features

    def set_kept_ids(self, ids) -> None:
        """Set the kept token ids (``K`` distinct ids in ``[0, vocab_size)``, stored sorted)."""
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        if ids.numel() != self.head_vocab or ids.unique().numel() != ids.numel():
            raise ValueError(
                f"expected {self.head_vocab} distinct token ids, got {ids.numel()} ({ids.unique().numel()} distinct)"
            )
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(
                f"kept token ids must lie in [0, {self.vocab_size}), got {int(ids.min())}..{int(ids.max())}"
            )
        self.kept_ids.copy_(ids.sort().values.to(self.kept_ids.device))

    def kept_index(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary ids -> positions in the kept set (``IGNORE_INDEX`` for ids outside it)."""
        lut = torch.full((self.vocab_size,), IGNORE_INDEX, dtype=torch.long, device=self.kept_ids.device)
        lut[self.kept_ids] = torch.arange(self.head_vocab, device=lut.device)
        return lut[token_ids.long().to(lut.device)]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.linear(hidden_states)
        if not self.full_vocab:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.vocab_size), float("-inf"))
        return full.index_copy(-1, self.kept_ids, logits)


class _TrimmedCausalLM:
    """Mixin over a family's ``XForCausalLM``: same body, :class:`TrimmedLMHead` instead of the V-wide head."""

    _tied_weights_keys: dict = {}
    _tp_plan: dict = {}
    _pp_plan: dict = {}
    decoder_class: type  # the family's XModel (embeddings + decoder layers + final norm)

    def __init__(self, config):
        if not 0 < config.head_vocab <= config.vocab_size:
            raise ValueError(f"head_vocab must be in 1..{config.vocab_size}, got {config.head_vocab}")
        if config.tie_word_embeddings:
            raise ValueError(
                "a trimmed head cannot be tied to the full input embedding: set tie_word_embeddings=False"
            )
        family_lm = next(c for c in type(self).__mro__ if c.__module__.startswith("transformers.models."))
        # Skip the family __init__ (it would allocate a vocab x hidden head); it only builds these three things.
        super(family_lm, self).__init__(config)
        self.model = self.decoder_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = TrimmedLMHead(config.hidden_size, config.head_vocab, config.vocab_size)
        self.post_init()


# One (config, causal LM) pair per supported family. Written out, not generated, so auto_map can name them.
class TrimmedLlamaConfig(LlamaConfig):
    model_type = MODEL_TYPE_PREFIX + "llama"
    head_vocab: int = 0


class TrimmedMistralConfig(MistralConfig):
    model_type = MODEL_TYPE_PREFIX + "mistral"
    head_vocab: int = 0


class TrimmedQwen2Config(Qwen2Config):
    model_type = MODEL_TYPE_PREFIX + "qwen2"
    head_vocab: int = 0


class TrimmedQwen3Config(Qwen3Config):
    model_type = MODEL_TYPE_PREFIX + "qwen3"
    head_vocab: int = 0


class TrimmedPhi3Config(Phi3Config):
    model_type = MODEL_TYPE_PREFIX + "phi3"
    head_vocab: int = 0


class TrimmedLlamaForCausalLM(_TrimmedCausalLM, LlamaForCausalLM):
    config_class = TrimmedLlamaConfig
    decoder_class = LlamaModel


class TrimmedMistralForCausalLM(_TrimmedCausalLM, MistralForCausalLM):
    config_class = TrimmedMistralConfig
    decoder_class = MistralModel


class TrimmedQwen2ForCausalLM(_TrimmedCausalLM, Qwen2ForCausalLM):
    config_class = TrimmedQwen2Config
    decoder_class = Qwen2Model


class TrimmedQwen3ForCausalLM(_TrimmedCausalLM, Qwen3ForCausalLM):
    config_class = TrimmedQwen3Config
    decoder_class = Qwen3Model


class TrimmedPhi3ForCausalLM(_TrimmedCausalLM, Phi3ForCausalLM):
    config_class = TrimmedPhi3Config
    decoder_class = Phi3Model


TRIMMED_CLASSES = {
    "llama": (TrimmedLlamaConfig, TrimmedLlamaForCausalLM),
    "mistral": (TrimmedMistralConfig, TrimmedMistralForCausalLM),
    "qwen2": (TrimmedQwen2Config, TrimmedQwen2ForCausalLM),
    "qwen3": (TrimmedQwen3Config, TrimmedQwen3ForCausalLM),
    "phi3": (TrimmedPhi3Config, TrimmedPhi3ForCausalLM),
}

for _config_cls, _model_cls in TRIMMED_CLASSES.values():
    _config_cls.register_for_auto_class()
    _model_cls.register_for_auto_class("AutoModelForCausalLM")
    if __name__.startswith("fastdraft_ray."):  # as a package module; transformers registers remote code itself
        AutoConfig.register(_config_cls.model_type, _config_cls, exist_ok=True)
        AutoModelForCausalLM.register(_config_cls, _model_cls, exist_ok=True)


def trimmed_config(base, head_vocab: int):
    """The trimmed-head twin of a family config (``tie_word_embeddings`` off, ``head_vocab`` = K)."""
    family = base.model_type.removeprefix(MODEL_TYPE_PREFIX)
    if family not in TRIMMED_CLASSES:
        raise ValueError(
            f"a trimmed draft head is implemented for the {', '.join(TRIMMED_CLASSES)} families, not "
            f"{base.model_type!r}: set draft.head_vocab=0 for this target"
        )
    values = {k: v for k, v in base.to_dict().items() if k not in ("model_type", "auto_map", "architectures")}
    values.update(head_vocab=head_vocab, tie_word_embeddings=False)
    return TRIMMED_CLASSES[family][0](**values)


def trimmed_head(model) -> TrimmedLMHead | None:
    """The :class:`TrimmedLMHead` of a model (or of a DeepSpeed/DDP wrapper's ``.module``), else None."""
    model = getattr(model, "module", model)
    head = getattr(model, "lm_head", None)
    return head if isinstance(head, TrimmedLMHead) else None


@contextlib.contextmanager
def kept_logits(model) -> Iterator[TrimmedLMHead]:
    """Within the block, ``model(...)`` returns K-wide logits (column i = token ``kept_ids[i]``)."""
    head = trimmed_head(model)
    if head is None:
        raise ValueError(f"{type(getattr(model, 'module', model)).__name__} has no trimmed head")
    previous, head.full_vocab = head.full_vocab, False
    try:
        yield head
    finally:
        head.full_vocab = previous
