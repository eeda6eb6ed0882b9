"""Draft derivation for every supported family, parameter counting, budgets, save/load, compatibility."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastdraft_ray.config import DraftConfig
from fastdraft_ray.models.draft import (
    IncompatibleDraftError,
    build_draft,
    check_compatible,
    count_params,
    derive_draft_config,
    draft_for_budget,
    load_draft,
    save_draft,
)
from tests.conftest import tiny_config

SMALL = DraftConfig(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)


def test_draft_keeps_family_vocab_special_tokens_and_rope(family_config):
    draft_cfg = derive_draft_config(family_config, SMALL)
    assert draft_cfg.model_type == family_config.model_type
    assert draft_cfg.vocab_size == family_config.vocab_size
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(draft_cfg, key) == getattr(family_config, key)
    assert draft_cfg.rope_parameters == family_config.rope_parameters
    assert draft_cfg.num_hidden_layers == 1 and draft_cfg.hidden_size == 32
    draft = build_draft(draft_cfg)
    check_compatible(family_config, draft)
    out = draft.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_saved_draft_loads_with_automodel_and_generates(tmp_path, smollm2, family):
    _, tokenizer = smollm2  # any real tokenizer does: save_draft copies the target's tokenizer next to the weights
    target_cfg = tiny_config(
        family,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    draft = build_draft(derive_draft_config(target_cfg, SMALL))
    path = save_draft(draft, tokenizer, tmp_path / family)
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    assert type(reloaded).__name__ == type(draft).__name__
    ids = torch.tensor([[tokenizer.bos_token_id, 42, 43]])
    assert torch.equal(
        reloaded.generate(ids, max_new_tokens=5, do_sample=False),
        load_draft(path).generate(ids, max_new_tokens=5, do_sample=False),
    )
    check_compatible(target_cfg, reloaded)


def test_unknown_family_falls_back_to_llama(caplog):
    from transformers import AutoConfig

    gpt2 = AutoConfig.for_model("gpt2", vocab_size=96, n_embd=64, n_layer=2, n_head=4)
    draft_cfg = derive_draft_config(gpt2, SMALL)
    assert draft_cfg.model_type == "llama" and draft_cfg.vocab_size == 96
    assert draft_cfg.eos_token_id == gpt2.eos_token_id
    assert "no derivation rule" in caplog.text


def test_invalid_shapes_are_refused():
    with pytest.raises(ValueError, match="divide num_heads"):
        derive_draft_config(tiny_config(), DraftConfig(num_heads=4, num_kv_heads=3))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        derive_draft_config(tiny_config(), DraftConfig(hidden_size=100, num_heads=3, num_kv_heads=1))


def test_count_params_splits_embedding_and_matches_torch():
    tied = build_draft(derive_draft_config(tiny_config(tie_word_embeddings=True), SMALL))
    untied = build_draft(derive_draft_config(tiny_config(tie_word_embeddings=False), SMALL))
    for model in (tied, untied):
        n = count_params(model)
        assert n.total == sum(p.numel() for p in model.parameters())
        assert n.total == n.embedding + n.non_embedding
        assert count_params(model.config) == n  # meta-device count needs no weights
    assert count_params(untied).embedding == 2 * count_params(tied).embedding == 2 * 96 * 32


@pytest.mark.parametrize("budget, layers", [(50e6, None), (20e6, 4), (120e6, None)])
def test_draft_for_budget_fits_and_is_close(budget, layers):
    from transformers import AutoConfig

    phi3 = AutoConfig.for_model("phi3")  # Phi-3-mini shape: 32,064 vocab, hidden 3072
    shape = draft_for_budget(phi3, params=budget, layers=layers)
    total = count_params(derive_draft_config(phi3, shape)).total
    assert 0.65 * budget <= total <= budget  # widths move in steps of head_dim (96 for Phi-3)
    if layers:
        assert shape.num_layers == layers


def test_incompatible_drafts_are_refused_with_the_differing_ids():
    target = tiny_config()
    with pytest.raises(IncompatibleDraftError, match="vocab_size: target 96 vs draft 128"):
        check_compatible(target, tiny_config(vocab_size=128))
    with pytest.raises(IncompatibleDraftError, match="eos_token_id: target 2 vs draft 3"):
        check_compatible(target, tiny_config(eos_token_id=3))


@pytest.mark.real_target
def test_real_target_draft_is_compatible_and_runs(smollm2):
    target, tokenizer = smollm2
    draft = build_draft(derive_draft_config(target.config, DraftConfig()))
    check_compatible(target, draft, tokenizer, tokenizer)
    assert 0.05 < count_params(draft).total / count_params(target).total < 0.2
    enc = tokenizer("def fibonacci(n):", return_tensors="pt")
    with torch.no_grad():
        assert draft(**enc).logits.shape == (1, enc.input_ids.shape[1], 49152)


def test_tokenizers_with_swapped_ids_are_named(smollm2):
    _, tokenizer = smollm2

    class Swapped:
        def get_vocab(self):
            vocab = dict(tokenizer.get_vocab())
            vocab["hello"], vocab["world"] = vocab["world"], vocab["hello"]
            return vocab

    cfg = tiny_config(vocab_size=49152)
    with pytest.raises(IncompatibleDraftError, match="2 tokens map to different ids.*'hello'"):
        check_compatible(cfg, cfg, tokenizer, Swapped())


def test_the_qwen_recipe_draft_is_mostly_transformer_not_embedding():
    """Qwen2.5-7B's untied 152k-token vocabulary: a plain 150M draft would be 117M of embedding and output head.
    The recipe's 32k-token head leaves ~30M for the transformer within the same budget."""
    from transformers import AutoConfig

    from fastdraft_ray.config import load_config
    from fastdraft_ray.models.draft import draft_for_budget

    qwen = AutoConfig.for_model(
        "qwen2",
        vocab_size=152_064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )  # fmt: skip  (Qwen2.5-7B-Instruct's config.json)
    d = load_config("qwen25_7b_150m_8gpu", ["storage=/x"]).draft
    shape = draft_for_budget(qwen, d.params_budget, layers=d.num_layers or None, head_vocab=d.head_vocab)
    counts = count_params(derive_draft_config(qwen, shape))
    assert counts.total <= 150e6 and counts.non_embedding >= 25e6, counts
    plain = count_params(derive_draft_config(qwen, draft_for_budget(qwen, d.params_budget)))
    assert plain.non_embedding < 15e6  # what the recipe avoids
