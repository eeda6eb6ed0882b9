"""The preflight: every way a run can fail hours in, checked in minutes before any stage starts.

``python jobs/pipeline.py --check`` prints one line per check (pass / fail / skip, and what to do); a real run
does the same before its first stage (``pipeline.preflight``; failures stop it with the list). The checks:

- the target: its tokenizer and config load (a gated hub repo without ``HF_TOKEN`` fails here);
- every data source of the stages that prepare data, and every KD prompt source: the spec parses (a hub corpus
  without text is refused) and one record opens with the text ``field`` it names (a misspelled ``?field=`` names
  the fields that exist);
- the cluster's CPUs and GPUs against the training workers, generator actors, evaluation workers, tokenizer actors
  and search trials the selected stages will ask for;
- vLLM and ``ray.data.llm`` import when ``generate.backend=vllm``;
- the run directory is writable, and every node of the cluster sees the file one node writes there.

What needs something this machine lacks (the hub under ``HF_HUB_OFFLINE``, a cluster) is skipped, and says why.
"""

from __future__ import annotations

import functools
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

from fastdraft_ray import markdown, stage_graph
from fastdraft_ray.config import FastDraftConfig, stage_config
from fastdraft_ray.layout import RunLayout

HUB_TIMEOUT_S = 60  # one hub record (or a gated repo's answer) takes seconds; past this the hub is unreachable
HUB_PROBE_TIMEOUT_S = 5  # is the hub reachable at all (else every hub check is skipped, not retried for minutes)


@dataclass
class Check:
    """One preflight check: ``status`` pass | fail | skip, and a line that says what it found or what to do."""

    name: str
    status: str
    detail: str


class Skip(Exception):  # noqa: N818 - a check that cannot run here: the message says why
    """Raised by a check that cannot run here (what it needs is missing); the message says why."""


@functools.cache
def hub_unavailable() -> str | None:
    """Why the Hugging Face hub cannot be used from here (``HF_HUB_OFFLINE``, no answer), None when it can."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    import requests

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        requests.head(endpoint, timeout=HUB_PROBE_TIMEOUT_S)
    except requests.RequestException as exc:
        return f"{endpoint} does not answer ({type(exc).__name__})"
    return None


def _needs_hub(what: str) -> None:
    why = hub_unavailable()
    if why:
        raise Skip(f"{what} is on the hub and {why}: run the check where the hub is reachable")


def _with_timeout(fn: Callable[[], str], what: str) -> str:
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(fn).result(timeout=HUB_TIMEOUT_S)
    except FutureTimeout:
        raise RuntimeError(f"{what}: no answer in {HUB_TIMEOUT_S} s (is the hub reachable from here?)") from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _run(name: str, fn: Callable[[], str]) -> Check:
    try:
        return Check(name, "pass", fn())
    except Skip as why:
        return Check(name, "skip", str(why))
    except Exception as exc:  # a check's failure is its result: the message says what to change
        return Check(name, "fail", f"{type(exc).__name__}: {exc}"[:600])


# ------------------------------------------------------------------------------------------------- checks


def check_target(cfg: FastDraftConfig) -> str:
    from fastdraft_ray.models.target import load_target_config, load_tokenizer, resolve_target

    where, _ = resolve_target(cfg.model.target)
    if not Path(where).exists():
        _needs_hub(f"model.target={cfg.model.target}")

    def load() -> str:
        tok = load_tokenizer(cfg.model.target, cfg.model.trust_remote_code)
        conf = load_target_config(cfg.model.target, cfg.model.trust_remote_code)
        return f"{conf.model_type}, {conf.num_hidden_layers} layers, vocabulary {len(tok):,}"

    return _with_timeout(load, f"model.target={cfg.model.target}")


def check_data_source(spec: str) -> str:
    from fastdraft_ray.data.sources import SourceError, parse_spec, plan_units, read_unit

    parsed = parse_spec(spec)  # refuses a hub corpus without text and unknown options
    if parsed.kind == "hub":
        _needs_hub(spec)

    def first() -> str:
        units = plan_units(parsed)
        if not units:
            raise SourceError(f"{spec}: no files match")
        doc = next(iter(read_unit(units[0])), None)
        if doc is None:
            raise SourceError(f"{spec}: its first unit holds no document")
        return f"{len(units)} unit(s); first document {len(doc.text):,} characters"

    return _with_timeout(first, spec)


def check_prompt_source(spec: str, cfg: FastDraftConfig) -> str:
    from fastdraft_ray.distill.prompts import read_source
    from fastdraft_ray.models.target import load_tokenizer

    if spec.startswith("hub:") or ":hub:" in spec:
        _needs_hub(spec)
    shaped = spec.startswith("task:")  # shaped like an evaluation family with the target's tokenizer
    if shaped:
        check_target(cfg)

    def first() -> str:
        tokenizer = load_tokenizer(cfg.model.target, cfg.model.trust_remote_code) if shaped else None
        raw = next(iter(read_source(spec, tokenizer)), None)
        if raw is None:
            raise ValueError(f"{spec}: no prompt")
        return f"first prompt {len(raw.message):,} characters"

    return _with_timeout(first, spec)


def needed_resources(cfg: FastDraftConfig, stages: list[str]) -> dict[str, dict[str, float]]:
    """What the selected stages ask the cluster for at once, per stage: ``{stage: {"CPU": n, "GPU": n}}``."""
    need: dict[str, dict[str, float]] = {}
    for stage in stages:
        if stage in stage_graph.PREPARE:
            d = stage_config(cfg, stage.split("/")[1]).data
            need[stage] = {"CPU": d.num_tokenizer_actors * d.tokenizer_actor_cpus, "GPU": 0}
        elif stage_graph.spec(stage).trains:
            t = stage_config(cfg, stage).train
            need[stage] = {"CPU": t.num_workers * t.cpus_per_worker, "GPU": t.num_workers if t.use_gpu else 0}
        elif stage == "generate":
            g = cfg.generate
            gpus = g.num_actors if (g.use_gpu or g.backend == "vllm") else 0
            need[stage] = {"CPU": g.num_actors * g.cpus_per_actor, "GPU": gpus}
        elif stage == "evaluate":
            e = cfg.evaluate
            cpus = e.num_workers * max(e.cpus_per_worker, 1)
            need[stage] = {"CPU": cpus, "GPU": e.num_workers if e.use_gpu else 0}
        elif stage == "search":
            s = cfg.search
            need[stage] = {"CPU": s.num_workers * s.cpus_per_worker, "GPU": 0}
    return need


def _cluster_resources() -> tuple[dict[str, float], str]:
    """The resources jobs will run on: the Ray cluster this process is connected to, else this machine."""
    import ray

    if ray.is_initialized():
        return ray.cluster_resources(), "the Ray cluster"
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # no torch CUDA runtime: no GPUs to count
        gpus = 0
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)}, "this machine (no Ray cluster connected)"


def check_resources(cfg: FastDraftConfig, stages: list[str]) -> str:
    have, where = _cluster_resources()
    total = f"{where}: {have.get('CPU', 0):g} CPUs, {have.get('GPU', 0):g} GPUs"
    short = [
        f"{stage} {' + '.join(f'{n:g} {kind}' for kind, n in want.items() if n)}"
        for stage, want in needed_resources(cfg, stages).items()
        if any(n > have.get(kind, 0) for kind, n in want.items())
    ]
    if short:
        raise RuntimeError(
            f"{total}; too few for: {'; '.join(short)}. Lower those stages' workers / actors / cpus_per_worker, "
            "or run on a larger cluster"
        )
    return f"{total}; every stage fits"


def check_vllm() -> str:
    try:
        import vllm
        from ray.data.llm import build_llm_processor  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"generate.backend=vllm needs vLLM and ray.data.llm ({exc}): pip install 'fastdraft-ray[gpu]' on every "
            "GPU node (or generate.backend=hf)"
        ) from None
    return f"vllm {vllm.__version__}"


def check_storage(cfg: FastDraftConfig) -> str:
    """The run directory takes a file, and every node of the cluster reads the same file back."""
    import ray

    root = RunLayout.of(cfg).require_local("the pipeline")
    if "runtime_resources/working_dir_files" in str(root):
        raise RuntimeError(
            f"the run directory {root} is inside this Ray job's temporary working directory (a relative storage, "
            "e.g. the default 'runs', resolves there) and is deleted with the job: pass an absolute storage=PATH "
            "that every node sees"
        )
    where = next(p for p in (root, *root.parents) if p.exists())  # the run directory, or where it will be made
    if not os.access(where, os.W_OK):
        raise PermissionError(f"{where} is not writable: the run directory {root} cannot be made there")
    probe = where / f".preflight-{uuid.uuid4().hex[:8]}"
    token = f"{time.time()}"
    probe.write_text(token)
    try:
        if not ray.is_initialized():
            return f"{where} is writable (one node: no Ray cluster connected)"
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        @ray.remote(num_cpus=0)
        def read(path: str) -> str | None:
            return Path(path).read_text() if Path(path).exists() else None

        nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
        reads = ray.get(
            [
                read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
                    str(probe)
                )
                for node in nodes
            ],
            timeout=120,
        )
        blind = [node[:8] for node, got in zip(nodes, reads, strict=True) if got != token]
        if blind:
            raise RuntimeError(
                f"{len(blind)} of {len(nodes)} nodes ({', '.join(blind)}) do not see {where}: put storage on a "
                "filesystem every node mounts (NFS, EFS, a ReadWriteMany volume)"
            )
        return f"{where} is writable and all {len(nodes)} node(s) see the same files"
    finally:
        probe.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------- driver


def preflight(cfg: FastDraftConfig, stages: list[str]) -> list[Check]:
    """Every check for a run of ``stages`` (stage names) of ``cfg``."""
    checks = [_run("target: tokenizer and config", lambda: check_target(cfg))]
    specs: dict[str, str] = {}
    for stage in stages:
        if stage in stage_graph.PREPARE:
            for name, spec in stage_config(cfg, stage.split("/")[1]).data.sources.items():
                specs.setdefault(spec, f"{stage} source {name}")
    checks += [
        _run(f"{where}: {spec}", lambda spec=spec: check_data_source(spec)) for spec, where in specs.items()
    ]
    if "generate" in stages:
        checks += [
            _run(f"KD prompt source {name}: {spec}", lambda spec=spec: check_prompt_source(spec, cfg))
            for name, spec in cfg.generate.prompt_sources.items()
        ]
        if cfg.generate.backend == "vllm":
            checks.append(_run("generate.backend=vllm: vLLM installed", check_vllm))
    checks.append(_run("cluster resources", lambda: check_resources(cfg, stages)))
    checks.append(_run("run directory: writable, seen by every node", lambda: check_storage(cfg)))
    return checks


def render(checks: list[Check]) -> str:
    """The checks as a table (and a last line: how many failed)."""
    rows = [[c.status.upper() if c.status == "fail" else c.status, c.name, c.detail] for c in checks]
    failed = sum(c.status == "fail" for c in checks)
    return markdown.table(["", "check", "result"], rows) + f"\n\n{failed} of {len(checks)} checks failed"
