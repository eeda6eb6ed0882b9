"""The training proxy (train/proxy.py): exact against a dense reference, 1 for the target itself, kept-head drafts
scored on what they can propose, save/load, the ZeRO-3 padding forwards, and the real embedded target."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from fastdraft_ray.config import DraftConfig
from fastdraft_ray.models.draft import new_draft
from fastdraft_ray.models.vocab import trim_draft
from fastdraft_ray.train.proxy import ProxySet, build_proxy_set, position_acceptance, score_draft, score_rows
from tests.conftest import TINY_VOCAB, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SETTINGS = {"tokens": 12, "topk": TINY_VOCAB}  # k = the whole vocabulary: the proxy is then exact


class _Tok:
    """The two things build_proxy_set asks of a tokenizer."""

    pad_token_id, eos_token_id = 0, 2
    all_special_tokens: tuple[str, ...] = ()


def _model(seed: int):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config("llama")).eval()


def _proxy(target, **settings) -> ProxySet:
    gen = torch.Generator().manual_seed(0)
    prompts = {
        task: [torch.randint(3, TINY_VOCAB, (int(n),), generator=gen).tolist() for n in (5, 9, 14)]
        for task in ("story", "code")
    }
    return build_proxy_set(target, _Tok(), prompts, {**SETTINGS, **settings})


def _dense_reference(draft, target, proxy: ProxySet, temperature: float) -> dict[str, float]:
    """Per-family sum_x min(p_T, q_T) over the FULL vocabulary and argmax agreement, one unpadded row at a time."""
    per_task: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for task, prompt, cont in zip(proxy.tasks, proxy.prompts, proxy.continuations, strict=False):
            ids = torch.tensor([prompt + cont])
            sl = slice(len(prompt) - 1, len(prompt) - 1 + len(cont))
            p_logits, q_logits = target(input_ids=ids).logits[0, sl], draft(input_ids=ids).logits[0, sl]
            p, q = F.softmax(p_logits / temperature, -1), F.softmax(q_logits / temperature, -1)
            acc = torch.minimum(p, q).sum(-1).numpy()
            top1 = (p_logits.argmax(-1) == q_logits.argmax(-1)).float().numpy()
            per_task.setdefault(task, []).append(np.stack([acc, top1]))
    out = {}
    for task, rows in per_task.items():
        both = np.concatenate(rows, axis=1)
        out[f"{task}/acceptance"], out[f"{task}/top1"] = both.mean(1)
    return out


def test_proxy_matches_a_dense_full_vocabulary_reference():
    target, draft = _model(0), _model(7)
    proxy = _proxy(target)
    assert len(proxy) == 6 and all(1 <= len(c) <= 12 for c in proxy.continuations)  # greedy, up to EOS
    scores = score_draft(draft, proxy, temperature=0.6)
    reference = _dense_reference(draft, target, proxy, 0.6)
    for key, value in reference.items():
        assert scores[key] == pytest.approx(value, abs=2e-5), key
    assert scores["proxy_acceptance"] == pytest.approx(
        np.mean([reference["story/acceptance"], reference["code/acceptance"]]), abs=2e-5
    )
    assert 0.0 < scores["proxy_acceptance"] < 0.9  # another random model is a poor draft


def test_the_target_scored_as_its_own_draft_is_accepted_everywhere():
    target = _model(0)
    scores = score_draft(target, _proxy(target), temperature=0.6)
    assert scores["proxy_acceptance"] == pytest.approx(1.0, abs=1e-5)
    assert scores["proxy_top1"] == 1.0


def test_a_kept_head_draft_is_scored_on_the_tokens_it_can_propose():
    target = _model(0)
    proxy = _proxy(target)
    kept = torch.tensor([0, 1, 2, *range(3, TINY_VOCAB, 2)])
    trimmed = trim_draft(target, kept).eval()  # the target's body, head rows of the kept tokens only
    scores = score_draft(trimmed, proxy, temperature=0.6)
    # reference: the same model's full-vocabulary output, -inf outside the kept set
    assert scores == pytest.approx(
        {**_dense_reference(trimmed, target, proxy, 0.6), **{k: scores[k] for k in scores if "proxy_" in k}},
        abs=2e-5,
    )
    assert scores["proxy_acceptance"] < 0.99  # the mass on dropped tokens cannot be accepted


def test_padding_forwards_do_not_count_and_the_set_survives_a_round_trip(tmp_path):
    target = _model(0)
    proxy = _proxy(target, topk=8)
    draft = new_draft(
        tiny_config("llama"),
        DraftConfig(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64),
        seed=3,
    ).eval()
    plain = score_rows(draft, proxy, [0, 2, 4], 0.6)
    padded = score_rows(draft, proxy, [0, 2, 4], 0.6, n_forwards=3)
    assert {k: v.tolist() for k, v in plain.items()} == {k: v.tolist() for k, v in padded.items()}
    assert sum(v[2] for v in plain.values()) == sum(len(proxy.continuations[i]) for i in (0, 2, 4))

    loaded = ProxySet.load(proxy.save(tmp_path / "proxy" / "set.npz"))
    assert loaded.prompts == proxy.prompts and loaded.continuations == proxy.continuations
    assert loaded.tasks == proxy.tasks and loaded.settings == proxy.settings
    assert all(np.array_equal(a, b) for a, b in zip(loaded.topk_logprobs, proxy.topk_logprobs, strict=False))
    assert score_draft(draft, loaded) == score_draft(draft, proxy)


def test_top_k_truncation_only_lowers_the_estimate():
    target, draft = _model(0), _model(7)
    exact = score_draft(draft, _proxy(target), temperature=1.0)["proxy_acceptance"]
    truncated = score_draft(draft, _proxy(target, topk=4), temperature=1.0)["proxy_acceptance"]
    assert truncated <= exact + 1e-6
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    acc, top1 = position_acceptance(logits, torch.tensor([[0, 1, 2]]), F.log_softmax(logits, -1), 1.0)
    assert acc.item() == pytest.approx(1.0) and top1.item() == 1.0
    acc, top1 = position_acceptance(logits, torch.tensor([[-100, 1, 2]]), F.log_softmax(logits, -1), 1.0)
    assert acc.item() == pytest.approx(F.softmax(logits, -1)[0, 1:].sum().item()) and top1.item() == 0.0


def test_real_target_proxy_set_is_held_out_and_cached(tmp_path):
    """The real embedded target: the proxy prompts follow the evaluated ones (disjoint), are cached, and the target
    scores ~1 against its own continuations."""
    from fastdraft_ray.config import load_config
    from fastdraft_ray.data.tasks import load_tasks
    from fastdraft_ray.models.target import load_target
    from fastdraft_ray.train.proxy import load_or_build

    overrides = [
        f"storage={tmp_path}",
        "train.proxy_prompts_per_task=1",
        "train.proxy_tokens=8",
        "evaluate.prompts_per_task=2",
        "evaluate.tasks=[story,code]",
    ]
    cfg = load_config("cpu_default", overrides)
    proxy = load_or_build(cfg)
    assert (tmp_path / "cpu_default" / "proxy" / "set.npz").exists()
    assert sorted(proxy.tasks) == ["code", "story"] and all(len(c) == 8 for c in proxy.continuations)
    target, tokenizer = load_target(cfg.model.target)
    evaluated = load_tasks(tokenizer, ["story", "code"], 2)
    assert not {tuple(p.input_ids) for rows in evaluated.values() for p in rows} & {
        tuple(p) for p in proxy.prompts
    }
    again = load_or_build(cfg)  # cached: same rows
    assert again.continuations == proxy.continuations
    scores = score_draft(target, proxy)
    assert scores["proxy_acceptance"] > 0.95 and scores["proxy_top1"] == 1.0


def test_the_driver_never_loads_the_target(tmp_path, tiny_target, ray_local, monkeypatch):
    """The proxy set and the search's device profile are built in Ray tasks with the stage's accelerator: a 7-8B
    target would not fit the job driver's memory (the head node), and the search must price drafts on the device
    they will run on. Loading the target here, in the driver, fails this test."""
    import fastdraft_ray.models.target as target_module
    from fastdraft_ray.config import load_config
    from fastdraft_ray.layout import RunLayout
    from fastdraft_ray.search.run import device_profile
    from fastdraft_ray.train.proxy import load_or_build

    def refuse(*args, **kwargs):
        raise AssertionError("the job's driver loaded the target")

    monkeypatch.setattr(target_module, "load_target", refuse)
    cfg = load_config(
        None,
        [f"model.target={tiny_target}", f"storage={tmp_path}", "train.proxy_prompts_per_task=1"]
        + ["train.proxy_tokens=4", "evaluate.prompts_per_task=1", "evaluate.max_article_tokens=48"]
        + ["search.latency_repeats=2", "search.latency_context=8"],
    )
    proxy = load_or_build(cfg)
    assert len(proxy) > 0 and (tmp_path / "default" / "proxy" / "set.npz").exists()
    profile = device_profile(cfg, RunLayout.of(cfg).search, None)
    assert profile.device == "cpu" and profile.target_step_s > 0 and len(profile.verify_cost) > 2
