"""The training proxy: how often a draft would be accepted, estimated teacher-forced in well under a second.

A fixed held-out set (``ProxySet``): prompts of every evaluation family (the same seeded selection as the
evaluation, the prompts right after the evaluated ones, so the two never share a prompt), the target's own greedy
continuation of each, and the target's top-k log-probs at every continuation position (computed once, cached in
``<run_dir>/proxy/set.npz``). Scoring a draft on it is one forward pass per batch of rows:

  proxy_acceptance  mean over positions of sum_{x in top-k} min(p_T(x), q_T(x)), p_T the target's top-k
                    renormalised at temperature T, q_T the draft's softmax at T: the expected per-token acceptance
                    of speculative sampling at T (a lower bound by the target mass outside its top-k)
  proxy_top1        how often the draft's argmax is the target's: the per-token acceptance of greedy decoding

Both are first averaged over the positions of each family, then over the families (each family counts the
same). A draft with a trimmed head scores q over its kept tokens (it can never propose the others).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastdraft_ray.models.trimmed_head import kept_logits, trimmed_head

log = logging.getLogger(__name__)
SCORE_ROWS = 8  # rows per draft forward


@dataclass
class ProxySet:
    """Held-out prompts, the target's greedy continuations and its top-k at each continuation position."""

    tasks: list[str]
    prompts: list[list[int]]
    continuations: list[list[int]]
    topk_ids: list[np.ndarray]  # [len(continuation), k] int32
    topk_logprobs: list[np.ndarray]  # [len(continuation), k] float32, temperature 1
    settings: dict

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def positions(self) -> int:
        return sum(len(c) for c in self.continuations)

    def save(self, path: Path) -> Path:
        """Write the set as one ``.npz`` (written beside, then renamed: a crash leaves no half file)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        lengths = np.array(
            [[len(p), len(c)] for p, c in zip(self.prompts, self.continuations, strict=False)], np.int64
        )
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(
            tmp,
            settings=np.array(json.dumps(self.settings, sort_keys=True)),
            tasks=np.array(self.tasks),
            lengths=lengths,
            prompts=np.concatenate([np.asarray(p, np.int32) for p in self.prompts]),
            continuations=np.concatenate([np.asarray(c, np.int32) for c in self.continuations]),
            topk_ids=np.concatenate(self.topk_ids),
            topk_logprobs=np.concatenate(self.topk_logprobs),
        )
        tmp.rename(path)
        return path

    @classmethod
    def load(cls, path: Path) -> ProxySet:
        with np.load(path) as z:
            lengths = z["lengths"]
            p_cuts, c_cuts = np.cumsum(lengths[:, 0])[:-1], np.cumsum(lengths[:, 1])[:-1]
            return cls(
                tasks=[str(t) for t in z["tasks"]],
                prompts=[a.tolist() for a in np.split(z["prompts"], p_cuts)],
                continuations=[a.tolist() for a in np.split(z["continuations"], c_cuts)],
                topk_ids=np.split(z["topk_ids"], c_cuts),
                topk_logprobs=np.split(z["topk_logprobs"], c_cuts),
                settings=json.loads(str(z["settings"])),
            )


def build_proxy_set(target, tokenizer, prompts: dict[str, list[list[int]]], settings: dict) -> ProxySet:
    """The target's greedy continuations (``settings["tokens"]`` new tokens) of ``prompts`` (family -> ids)
    and its top-``settings["topk"]`` log-probs along them."""
    from fastdraft_ray.models.batched import generate_batch, score_topk
    from fastdraft_ray.models.prompting import pad_token_id, stop_token_ids

    pad, stops = pad_token_id(tokenizer), stop_token_ids(tokenizer, getattr(target, "generation_config", None))
    items = sorted(((len(ids), task, ids) for task, rows in prompts.items() for ids in rows), key=lambda t: t[0])
    tasks, ids = [t for _, t, _ in items], [i for _, _, i in items]
    continuations = []
    for start in range(0, len(ids), SCORE_ROWS):  # similar lengths together: little padding
        batch = ids[start : start + SCORE_ROWS]
        out = generate_batch(
            target, batch, temperature=0.0, max_new_tokens=int(settings["tokens"]), pad=pad, eos=stops
        )
        continuations += [tokens for tokens, _ in out]
    keep = [
        i for i, c in enumerate(continuations) if c
    ]  # a prompt the target answers with nothing adds no position
    tasks, ids, continuations = [tasks[i] for i in keep], [ids[i] for i in keep], [continuations[i] for i in keep]
    scored = score_topk(target, ids, continuations, int(settings["topk"]), pad=pad)
    return ProxySet(tasks, ids, continuations, [s[0] for s in scored], [s[1] for s in scored], dict(settings))


def load_or_build(cfg, path: Path | None = None) -> ProxySet:
    """The run's proxy set: read from ``path`` (default ``<run_dir>/proxy/set.npz`` of a local run) when it was
    built with the same settings, else built with the target (a few seconds to a minute) and cached there.

    With Ray running, the target is loaded in a Ray task with the stage's accelerator (``train.use_gpu``), not in
    the job's driver: a 7-8B target does not fit the head node's memory, and its GPU is where it is fast."""
    from fastdraft_ray.layout import RunLayout

    ev, tc = cfg.evaluate, cfg.train
    settings = {
        "target": cfg.model.target,
        "dtype": cfg.model.dtype,
        "tasks": list(ev.tasks),
        "prompts_per_task": tc.proxy_prompts_per_task,
        "skip": ev.prompts_per_task,
        "seed": ev.seed,
        "source": ev.source,
        "max_article_tokens": ev.max_article_tokens,
        "code_chat": ev.code_chat,
        "tokens": tc.proxy_tokens,
        "topk": tc.proxy_topk,
    }
    layout = RunLayout.of(cfg)
    path = path or (None if layout.remote else layout.proxy_set)
    if path is not None and path.exists():
        cached = ProxySet.load(path)
        if {k: v for k, v in cached.settings.items() if k != "tokenizer"} == settings:
            return cached
    import ray

    if ray.is_initialized():
        task = ray.remote(_build_in_task)
        resources = {"num_cpus": tc.cpus_per_worker, "num_gpus": 1 if tc.use_gpu else 0}
        proxy = ray.get(task.options(**resources).remote(cfg, settings, "cuda" if tc.use_gpu else "cpu"))
    else:
        proxy = _build(cfg, settings, "cpu")
    if path is not None:
        proxy.save(path)
    return proxy


def _build_in_task(cfg, settings: dict, device: str) -> ProxySet:
    """``_build`` as a Ray task: the task's CPUs are its threads."""
    torch.set_num_threads(max(1, cfg.train.cpus_per_worker))
    return _build(cfg, settings, device)


def _build(cfg, settings: dict, device: str) -> ProxySet:
    """The proxy set of ``cfg``: the target (on ``device``) writes and scores the held-out continuations."""
    from fastdraft_ray.data.tasks import load_tasks
    from fastdraft_ray.models.target import load_target, tokenizer_fingerprint

    ev, tc = cfg.evaluate, cfg.train
    target, tokenizer = load_target(
        cfg.model.target, cfg.model.dtype, device=device, trust_remote_code=cfg.model.trust_remote_code
    )
    by_task = load_tasks(
        tokenizer,
        ev.tasks,
        tc.proxy_prompts_per_task,
        seed=ev.seed,
        source=ev.source,
        max_article_tokens=ev.max_article_tokens,
        code_chat=ev.code_chat,
        skip=ev.prompts_per_task,
    )
    proxy = build_proxy_set(
        target,
        tokenizer,
        {task: [p.input_ids for p in rows] for task, rows in by_task.items()},
        {**settings, "tokenizer": tokenizer_fingerprint(tokenizer)},
    )
    log.info("training proxy: %d held-out prompts, %d target-written positions", len(proxy), proxy.positions)
    return proxy


@torch.no_grad()
def score_rows(
    model, proxy: ProxySet, indices: list[int], temperature: float, n_forwards: int | None = None
) -> dict[str, np.ndarray]:
    """Per-family sums ``{task: [acceptance sum, top-1 sum, positions]}`` of ``model`` (an HF draft or a DeepSpeed
    engine) on the proxy rows ``indices``, in ``SCORE_ROWS``-row forwards.

    Rows are left-padded so every continuation ends at the last position and only the continuation positions'
    logits are computed (``logits_to_keep``). ``n_forwards`` pads the call to that many forwards (repeating a row
    whose counts are dropped): under ZeRO-3 every rank must run the same number of forwards, since each one
    gathers the sharded parameters collectively.
    """
    from fastdraft_ray.models.batched import left_pad

    totals = {task: np.zeros(3) for task in dict.fromkeys(proxy.tasks)}
    batches = [indices[i : i + SCORE_ROWS] for i in range(0, len(indices), SCORE_ROWS)]
    padding = max(0, (n_forwards or 0) - len(batches))
    device = next(getattr(model, "module", model).parameters()).device
    head = trimmed_head(model)
    for batch, counted in [(b, True) for b in batches] + [([0], False)] * padding:
        ids, mask = left_pad([proxy.prompts[i] + proxy.continuations[i] for i in batch], pad=0)
        keep = max(len(proxy.continuations[i]) for i in batch) + 1
        with kept_logits(model) if head is not None else contextlib.nullcontext():
            logits = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=(mask.cumsum(-1) - 1).clamp_min(0).to(device),
                logits_to_keep=keep,
            ).logits
        if not counted:
            continue
        for row, i in enumerate(batch):
            n = len(proxy.continuations[i])
            topk_ids = torch.from_numpy(proxy.topk_ids[i]).to(device)
            acceptance, top1 = position_acceptance(
                logits[row, keep - 1 - n : keep - 1],
                head.kept_index(topk_ids) if head is not None else topk_ids.long(),
                torch.from_numpy(proxy.topk_logprobs[i]).to(device),
                temperature,
            )
            totals[proxy.tasks[i]] += [acceptance.sum().item(), top1.sum().item(), n]
    return totals


def position_acceptance(
    logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position ``(sum_x min(p_T, q_T) over the target's top-k, draft argmax == target argmax)``.

    ``logits [L, V']`` are the draft's (V' = its head), ``topk_ids [L, k]`` the target's top-k as columns of that
    head (negative: a token the head does not have, so q = 0 there), ``topk_logprobs [L, k]`` the target's at T = 1.
    """
    t = max(float(temperature), 1e-6)
    p = F.softmax(topk_logprobs.float() / t, dim=-1)
    valid = topk_ids >= 0
    q = F.softmax(logits.float() / t, dim=-1).gather(-1, topk_ids.clamp_min(0)) * valid
    top1 = (logits.argmax(-1) == topk_ids[:, 0]) & valid[:, 0]
    return torch.minimum(p, q).sum(-1), top1.float()


def summarize(totals: dict[str, np.ndarray]) -> dict[str, float]:
    """``{"proxy_acceptance", "proxy_top1", "<task>/acceptance", "<task>/top1"}`` from per-family sums
    (families with no positions left out; the headline is the mean over families)."""
    out: dict[str, float] = {}
    per_family = {task: s for task, s in totals.items() if s[2] > 0}
    for task, (acc, top1, n) in per_family.items():
        out[f"{task}/acceptance"], out[f"{task}/top1"] = float(acc / n), float(top1 / n)
    if per_family:
        out["proxy_acceptance"] = float(np.mean([s[0] / s[2] for s in per_family.values()]))
        out["proxy_top1"] = float(np.mean([s[1] / s[2] for s in per_family.values()]))
    return out


def score_draft(model, proxy: ProxySet, temperature: float = 0.6) -> dict[str, float]:
    """The proxy of a finished draft (an HF model): see ``summarize`` for the keys."""
    was_training = model.training
    model.eval()
    try:
        return summarize(score_rows(model, proxy, list(range(len(proxy))), temperature))
    finally:
        model.train(was_training)
