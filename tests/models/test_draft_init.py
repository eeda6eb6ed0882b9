"""Target-derived draft initialisation: PCA-projected embeddings, copied target layers, and (real target) a
layers-initialised draft with a trimmed head that decodes losslessly."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastdraft_ray.config import DraftConfig
from fastdraft_ray.models.draft import derive_draft_config, new_draft
from fastdraft_ray.models.init import pca_basis, select_layers
from tests.conftest import TINY_VOCAB, tiny_config

NARROW = DraftConfig(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _target(layers: int = 2, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config("llama", num_hidden_layers=layers, **overrides)).eval()


def test_pca_embedding_is_the_best_rank_d_projection_of_the_target_embedding():
    target = _target(tie_word_embeddings=True)
    draft = new_draft(target.config, DraftConfig(**{**NARROW.__dict__, "init": "pca"}), target_model=target)
    E = target.get_input_embeddings().weight.detach().double()
    D = draft.get_input_embeddings().weight.detach().double()
    mean, basis = pca_basis(E, 32)
    torch.testing.assert_close(D, ((E - mean.double()) @ basis.double()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(basis.T @ basis, torch.eye(32), rtol=0, atol=1e-5)  # orthonormal directions
    # Reconstruction error = the optimal rank-32 error: the squared singular values PCA leaves out.
    centered = E - E.mean(0)
    residual = (centered - D @ basis.double().T).pow(2).sum()
    sigma = torch.linalg.svdvals(centered)
    torch.testing.assert_close(residual, sigma[32:].pow(2).sum(), rtol=1e-4, atol=1e-8)
    assert draft.config.tie_word_embeddings  # tied target -> tied draft: its head is the projected embedding


def test_pca_trimmed_head_gives_the_projected_target_head_distribution():
    target = _target(tie_word_embeddings=False)
    kept = torch.arange(0, TINY_VOCAB, 2)
    shape = DraftConfig(**{**NARROW.__dict__, "init": "pca", "head_vocab": len(kept)})
    draft = new_draft(target.config, shape, kept_ids=kept, target_model=target)
    _, basis = pca_basis(target.get_input_embeddings().weight, 32)
    W = target.get_output_embeddings().weight.detach()
    h = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    # The centred head rows differ from (W @ basis)[kept] by a constant per position: same softmax.
    expected = (h @ (W @ basis)[kept].T).softmax(-1)
    got = (h @ draft.lm_head.linear.weight.detach().T).softmax(-1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_layers_init_copies_the_chosen_target_layers_norm_and_embeddings():
    target = _target(layers=4)
    shape = DraftConfig(init="layers", init_layers=[0, 3])
    cfg = derive_draft_config(target.config, shape)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads) == (2, 64, 2)  # the target's widths
    draft = new_draft(target.config, shape, target_model=target)
    for j, i in enumerate([0, 3]):
        for (name, p), (_, q) in zip(
            draft.model.layers[j].named_parameters(), target.model.layers[i].named_parameters(), strict=True
        ):
            assert torch.equal(p, q), f"draft layer {j} <- target layer {i}: {name}"
    assert torch.equal(draft.model.norm.weight, target.model.norm.weight)
    assert torch.equal(draft.get_input_embeddings().weight, target.get_input_embeddings().weight)
    assert torch.equal(draft.get_output_embeddings().weight, target.get_output_embeddings().weight)


def test_copying_every_layer_reproduces_the_target_exactly_and_trimmed_head_keeps_its_rows():
    target = _target(layers=3)
    kept = torch.tensor([0, 1, 2, *range(10, 50)])
    shape = DraftConfig(num_layers=3, init="layers", head_vocab=len(kept))
    draft = new_draft(target.config, shape, kept_ids=kept, target_model=target)
    ids = torch.tensor([[1, 9, 33, 47, 5]])
    with torch.no_grad():
        t_logits, d_logits = target(input_ids=ids).logits, draft(input_ids=ids).logits
    torch.testing.assert_close(d_logits[..., kept], t_logits[..., kept], rtol=0, atol=1e-6)


def test_layer_selection_and_errors():
    assert select_layers(30, 3) == [0, 14, 29]  # evenly spaced, first and last included
    assert select_layers(30, 1) == [0] and select_layers(4, 4) == [0, 1, 2, 3]
    assert select_layers(30, 2, [5, 7]) == [5, 7]
    with pytest.raises(ValueError, match="not layer indices of a 4-layer target"):
        derive_draft_config(_target(layers=4).config, DraftConfig(init="layers", init_layers=[0, 4]))
    with pytest.raises(ValueError, match="cannot copy 5 layers"):
        select_layers(4, 5)
    with pytest.raises(ValueError, match="needs the target's weights"):
        new_draft(tiny_config(), DraftConfig(init="pca"))
    with pytest.raises(ValueError, match="at most 64 dimensions"):
        pca_basis(torch.randn(10, 64), 128)


@pytest.mark.real_target
def test_real_target_layers_draft_with_trimmed_head_decodes_losslessly(smollm2):
    from fastdraft_ray.models.vocab import kept_token_ids, special_token_ids
    from fastdraft_ray.specdec.decode import autoregressive_generate, speculative_generate
    from tests.specdec.test_decode import assert_greedy_equal

    target, tokenizer = smollm2
    # Kept set: specials + the 8k lowest ids (BPE ids rise roughly with rarity; counting is tested elsewhere).
    proxy_counts = torch.arange(len(tokenizer), 0, -1).numpy()
    kept = kept_token_ids(proxy_counts, 8192, special_token_ids(tokenizer, target.config))
    shape = DraftConfig(init="layers", init_layers=[0, 15, 29], head_vocab=8192)
    draft = new_draft(target.config, shape, kept_ids=kept, target_model=target)
    assert draft.config.hidden_size == 576 and draft.config.num_hidden_layers == 3
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    ids = ids["input_ids"]
    reference = autoregressive_generate(target, ids, max_new_tokens=24).tokens
    result = speculative_generate(target, draft, ids, gamma=3, max_new_tokens=24)
    assert_greedy_equal(target, ids, reference, result.tokens, "layers-init trimmed draft")
    assert result.stats.proposed > 0
