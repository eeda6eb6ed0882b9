"""The per-worker training loop (Ray Train V2 ``train_fn_per_worker``): DeepSpeed engine, token budget,
validation, TensorBoard, checkpoints with the data position, resume, and the final HF export.

``config`` (built by ``fastdraft_ray.train.run.train_stage``) holds:
  run            the stage's RunConfig as a dict (``train`` section drives everything here)
  init_dir       HF folder the draft starts from (weights + the target's tokenizer)
  stage_dir      ``<run_dir>/<stage>``: TensorBoard in ``tb/``, the export in ``export/`` (shared storage)
  seq_len, rows_per_epoch, data_start_row   data geometry (see ``position.py``)
  has_val        whether a "val" dataset was passed (validation loss every ``eval_every`` steps)
  proxy          optional ``proxy.ProxySet``: the training proxy is scored before the first step, every
                 ``train.proxy_every`` steps and after the last (``train/proxy_acceptance``, ``train/proxy_top1``)
  speedup_model  optional ``stats.SpeedupModel`` as a dict (the search's): adds ``train/predicted_speedup`` to
                 every proxy score
  kd_layout      optional (FT): the shards hold fixed-width distillation rows (``kd_rows.RowLayout``); the loss
                 is then ``train.kd_loss`` on response positions instead of next-token loss on packed rows
  trace_dir      optional: every rank appends one JSON line per optimizer step (rows trained, loss) -- an audit
                 log used by the fault-tolerance test
  fail_at        optional test hook ``{"rank", "step", "marker", "delay_s"}``: that rank's process dies
                 (``os._exit``) ``delay_s`` after that step, once (the marker file remembers it) -- a real process
                 death, not an exception. Ray Train V2 registers a reported checkpoint when its controller next
                 polls the workers (every 2 s): a death inside that window falls back to the checkpoint before.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from fastdraft_ray.config import TrainConfig, config_from_dict
from fastdraft_ray.layout import StageLayout
from fastdraft_ray.specdec.stats import SpeedupModel
from fastdraft_ray.train.losses import make_loss_fn
from fastdraft_ray.train.position import DataPosition, Geometry, row_id
from fastdraft_ray.train.proxy import SCORE_ROWS, ProxySet, score_rows, summarize

log = logging.getLogger(__name__)
DS_TAG = "ds"
STATE_FILE = "train_state.json"


def _mean_across(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Average scalars over all workers (one all-reduce; ``device`` must suit the backend: cuda for NCCL)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def _as_rows(batch) -> np.ndarray:
    """The ``input_ids`` column of a numpy batch as a 2-D int32 array."""
    col = batch["input_ids"]
    return np.stack(col).astype(np.int32, copy=False) if col.dtype == object else col.astype(np.int32, copy=False)


def _batches(iterator, geo: Geometry, skip_rows: int):
    """Global micro-batches (``world x micro`` rows, as int32 numpy) after discarding ``skip_rows`` rows."""
    if skip_rows % geo.rows_per_micro_step:
        raise ValueError(f"cannot resume {skip_rows} rows into the stream: not a whole global micro-batch")
    to_skip = skip_rows // geo.rows_per_micro_step
    for batch in iterator.iter_batches(batch_size=geo.rows_per_micro_step, batch_format="numpy", drop_last=True):
        if to_skip:
            to_skip -= 1
            continue
        yield _as_rows(batch)


def _val_rows(geo: Geometry, n_rows: int, has_val: bool) -> np.ndarray | None:
    """The first ``n_rows`` of the val split (trimmed to a multiple of the world size, so a split smaller than one
    global micro-batch is still scored), or None if there is none."""
    if not has_val or n_rows <= 0:
        return None
    shard = ray.train.get_dataset_shard("val")
    chunks, have = [], 0
    for batch in shard.iter_batches(batch_size=geo.rows_per_micro_step, batch_format="numpy"):
        chunks.append(_as_rows(batch))
        have += len(chunks[-1])
        if have >= n_rows:
            break
    if not chunks:
        return None
    rows = np.concatenate(chunks)[:n_rows]
    rows = rows[: len(rows) // geo.world_size * geo.world_size]
    return rows if len(rows) else None


@torch.no_grad()
def _validate(engine, rows: np.ndarray | None, geo: Geometry, rank: int, loss_fn) -> float | None:
    """Mean loss on the validation rows (row-weighted); every rank scores an equal share of each micro-batch
    (the last one may be shorter than a global micro-batch)."""
    if rows is None:
        return None
    engine.eval()
    total = 0.0
    for start in range(0, len(rows), geo.rows_per_micro_step):
        chunk = rows[start : start + geo.rows_per_micro_step]
        share = len(chunk) // geo.world_size
        mine = chunk[rank * share : (rank + 1) * share]
        total += loss_fn(engine, torch.from_numpy(mine).to(engine.device)).item() * share
    engine.train()
    return _mean_across([total / (len(rows) // geo.world_size)], engine.device)[0]


def _score_proxy(engine, proxy: ProxySet | None, temperature: float, rank: int, world: int) -> dict[str, float]:
    """The training proxy of the current weights: every rank scores a share of the rows, sums are averaged
    (ratios are unchanged by the averaging); empty without a proxy set."""
    if proxy is None:
        return {}
    engine.eval()
    share = -(-len(proxy) // world)
    totals = score_rows(engine, proxy, list(range(rank, len(proxy), world)), temperature, -(-share // SCORE_ROWS))
    engine.train()
    tasks = list(totals)
    flat = _mean_across([x for task in tasks for x in totals[task]], engine.device)
    scores = summarize({task: np.array(flat[3 * i : 3 * i + 3]) for i, task in enumerate(tasks)})
    return {(f"train/{k}" if k.startswith("proxy_") else f"proxy/{k}"): v for k, v in scores.items()}


def predicted_speedups(proxy_scores: dict[str, float], speedup_model: dict | None) -> dict[str, float]:
    """``train/predicted_speedup`` (+ ``_greedy``, ``train/predicted_gamma``): the speedup a draft with the proxy's
    per-token acceptance would reach with this ``SpeedupModel`` (as a dict; the search passes it), else empty."""
    if not speedup_model or "train/proxy_acceptance" not in proxy_scores:
        return {}
    model = SpeedupModel(**{**speedup_model, "verify_cost": tuple(speedup_model["verify_cost"])})
    gamma, speedup = model.predict(proxy_scores["train/proxy_acceptance"])
    _, greedy = model.predict(proxy_scores["train/proxy_top1"])
    return {
        "train/predicted_speedup": speedup,
        "train/predicted_speedup_greedy": greedy,
        "train/predicted_gamma": gamma,
    }


def _save(engine, position: DataPosition, geo: Geometry, metrics: dict, rank: int) -> None:
    """DeepSpeed checkpoint (every rank writes its part) + data position, reported to Ray Train."""
    tmp = tempfile.mkdtemp(prefix="fastdraft-ckpt-")
    try:
        engine.save_checkpoint(tmp, tag=DS_TAG)
        if rank == 0:
            state = {"position": position.to_dict(), "geometry": geo.to_dict(), "metrics": metrics}
            Path(tmp, STATE_FILE).write_text(json.dumps(state, indent=1))
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"step_{position.step:08d}",
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _restore(engine, checkpoint, geo: Geometry) -> tuple[DataPosition, dict]:
    with checkpoint.as_directory() as ckpt_dir:
        state = json.loads(Path(ckpt_dir, STATE_FILE).read_text())
        if state["geometry"] != geo.to_dict():
            raise RuntimeError(
                f"checkpoint geometry {state['geometry']} differs from this run's {geo.to_dict()}: "
                "resume with the same num_workers, micro_batch_size, grad_accum_steps and seq_len"
            )
        load_path, _ = engine.load_checkpoint(ckpt_dir, tag=DS_TAG)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {ckpt_dir}")
    return DataPosition.from_dict(state["position"]), state.get("metrics", {})


def _export(engine, init_dir: str, out_dir: Path, train: TrainConfig, rank: int) -> None:
    """Rank 0 writes the trained draft as a plain HF folder (fp32 safetensors + the target's tokenizer)."""
    import deepspeed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastdraft_ray.models.draft import save_draft

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=train.zero_stage == 3):
        if rank == 0:
            state = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    if rank == 0:
        model = AutoModelForCausalLM.from_config(engine.module.config, dtype=torch.float32)
        model.load_state_dict(state)
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_draft(model.eval(), AutoTokenizer.from_pretrained(init_dir), tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)


def _load_teacher(run: dict, train: TrainConfig):
    """The frozen target as the online teacher (train.teacher=online), on this worker's device: bf16 on GPU when
    the stage trains in bf16, else the target's configured dtype."""
    from fastdraft_ray.models.target import load_target

    model_cfg = config_from_dict(run).model
    device = "cuda" if train.use_gpu and torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if train.precision == "bf16" and device == "cuda" else model_cfg.dtype
    teacher, _ = load_target(model_cfg.target, dtype, device, model_cfg.trust_remote_code)
    teacher.eval().requires_grad_(False)
    log.info(
        "online teacher %s loaded (%s, %s), peak RSS %.0f MB", model_cfg.target, dtype, device, _peak_rss_mb()
    )
    return teacher


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Trace:
    """Optional per-rank audit log: one JSON line per optimizer step."""

    def __init__(self, trace_dir: str | None, rank: int):
        self.path = Path(trace_dir, f"rank{rank}.jsonl") if trace_dir else None

    def write(self, **record) -> None:
        if self.path:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"pid": os.getpid(), **record}) + "\n")


def train_fn_per_worker(config: dict) -> None:
    """Train the draft for the stage's token budget; resumes from ``ray.train.get_checkpoint()``."""
    import deepspeed

    from fastdraft_ray.models.draft import load_draft
    from fastdraft_ray.train.deepspeed import deepspeed_config, lr_scheduler

    train = config_from_dict(config["run"]).train
    torch.set_num_threads(train.cpus_per_worker)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    geo = Geometry(world, train.micro_batch_size, train.grad_accum_steps, int(config["seq_len"]))
    total_steps = geo.total_steps(train.token_budget)
    torch.manual_seed(train.seed)
    teacher = _load_teacher(config["run"], train) if train.teacher == "online" else None
    loss_fn = make_loss_fn(config.get("kd_layout"), train.kd_loss, train.kd_alpha, teacher, train.teacher_topk)

    model = load_draft(config["init_dir"]).train()
    model.config.use_cache = False
    if train.freeze_embeddings:
        model.get_input_embeddings().requires_grad_(False)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(train, total_steps),
        lr_scheduler=lr_scheduler(train, total_steps),
    )
    position, last_metrics = DataPosition(0, 0, int(config["rows_per_epoch"])), {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        position, last_metrics = _restore(engine, checkpoint, geo)
    resumed_at = position.step
    stage = StageLayout(Path(config["stage_dir"]))
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(stage.tensorboard), purge_step=resumed_at + 1 if resumed_at else None)
        log.info(
            "rank 0: %d workers, %d steps of %d tokens, starting at step %d (row %d)",
            world,
            total_steps,
            geo.tokens_per_step,
            resumed_at,
            position.rows_consumed,
        )
    trace = _Trace(config.get("trace_dir"), rank)
    fail_at = config.get("fail_at") or {}
    val_rows = _val_rows(geo, train.val_rows, bool(config.get("has_val", True)))

    start_row = int(config.get("data_start_row", 0))
    batches = _batches(ray.train.get_dataset_shard("train"), geo, position.rows_consumed - start_row)
    window_time, window_steps, val_loss = 0.0, 0, last_metrics.get("val/loss")
    proxy, proxy_scores = config.get("proxy"), {k: v for k, v in last_metrics.items() if "proxy" in k}
    elapsed_before, loop_start = float(last_metrics.get("train/elapsed_s", 0.0)), time.perf_counter()

    def log_proxy(at_step: int) -> None:
        if proxy is None:
            return
        proxy_scores.update(_score_proxy(engine, proxy, train.proxy_temperature, rank, world))
        proxy_scores.update(predicted_speedups(proxy_scores, config.get("speedup_model")))
        if writer is not None:
            for name, value in proxy_scores.items():
                writer.add_scalar(name, value, at_step)
            writer.add_scalar("train/elapsed_s", elapsed_before + time.perf_counter() - loop_start, at_step)
            acceptance, top1 = (proxy_scores.get(f"train/proxy_{k}", float("nan")) for k in ("acceptance", "top1"))
            log.info("step %d: proxy acceptance %.4f, top-1 %.4f", at_step, acceptance, top1)

    step = position.step
    if step == 0:
        log_proxy(0)
    while step < total_steps:
        t0 = time.perf_counter()
        losses, ids = [], []
        for _ in range(geo.grad_accum_steps):
            try:
                rows = next(batches)[geo.worker_slice(rank)]
            except StopIteration as exc:
                raise RuntimeError(f"training data ran out at step {step + 1} of {total_steps}") from exc
            loss = loss_fn(engine, torch.from_numpy(rows).to(engine.device))
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            ids += [row_id(r) for r in rows] if trace.path else []
        step += 1
        lr = scheduler.get_last_lr()[0] if scheduler is not None else train.lr
        window_time += time.perf_counter() - t0
        window_steps += 1
        position = DataPosition(step, step * geo.rows_per_step, position.rows_per_epoch)
        mean_loss = _mean_across([float(np.mean(losses))], engine.device)[0]
        trace.write(
            step=step,
            rank=rank,
            rows=ids,
            loss=mean_loss,
            local_loss=float(np.mean(losses)),
            resumed_at=resumed_at,
            seconds=time.perf_counter() - t0,
            peak_rss_mb=_peak_rss_mb(),
            node=ray.get_runtime_context().get_node_id() if trace.path else None,
        )
        if writer is not None and (step % train.log_every == 0 or step == total_steps):
            tokens_per_s = window_steps * geo.tokens_per_step / max(window_time, 1e-9)
            for name, value in (
                ("train/loss", mean_loss),
                ("train/lr", lr),
                ("train/tokens_per_s", tokens_per_s),
                ("train/samples_seen", position.rows_consumed),
                ("train/tokens_seen", position.rows_consumed * geo.seq_len),
                ("train/peak_rss_mb", _peak_rss_mb()),
            ):
                writer.add_scalar(name, value, step)
            log.info("step %d/%d loss %.4f lr %.2e %.0f tok/s", step, total_steps, mean_loss, lr, tokens_per_s)
            window_time, window_steps = 0.0, 0
        if step % train.eval_every == 0 or step == total_steps:
            val_loss = _validate(engine, val_rows, geo, rank, loss_fn)
            if writer is not None and val_loss is not None:
                writer.add_scalar("val/loss", val_loss, step)
        if (train.proxy_every > 0 and step % train.proxy_every == 0) or step == total_steps:
            log_proxy(step)
        metrics = {
            "step": step,
            "train/loss": mean_loss,
            "train/lr": lr,
            "val/loss": val_loss,
            "train/tokens_seen": position.rows_consumed * geo.seq_len,
            "train/samples_seen": position.rows_consumed,
            "train/elapsed_s": elapsed_before + time.perf_counter() - loop_start,
            **proxy_scores,
        }
        if step == total_steps:
            _export(engine, config["init_dir"], stage.export, train, rank)
        if step % train.checkpoint_every == 0 or step == total_steps:
            _save(engine, position, geo, metrics, rank)
        if (
            fail_at
            and rank == fail_at["rank"]
            and step == fail_at["step"]
            and not Path(fail_at["marker"]).exists()
        ):
            Path(fail_at["marker"]).write_text(str(os.getpid()))
            time.sleep(float(fail_at.get("delay_s", 0)))
            os._exit(1)
    if resumed_at == total_steps:  # the final checkpoint exists: only make sure the export does too
        _export(engine, config["init_dir"], stage.export, train, rank)
    if writer is not None:
        writer.close()
