"""The per-worker training loop of one stage (Ray Train V2 ``train_fn_per_worker``), written as a recipe:
``setup`` (DeepSpeed engine, resume, data, TensorBoard) -> ``train`` (``step`` -> ``log`` -> ``validate`` ->
``score_proxy`` -> ``checkpoint``) -> ``export`` (the trained draft as a plain HF folder).

``train_stage`` (``run.py``) sends every worker one ``LoopSpec``; the test hooks travel in its ``hooks`` (a
``Hooks``). Data order and resume follow ``position.py``: every step trains a fixed range of global rows, and a
checkpoint records exactly where the data stands.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from fastdraft_ray.config import FastDraftConfig, TrainConfig
from fastdraft_ray.jit_ops import clear_stale_locks
from fastdraft_ray.layout import StageLayout
from fastdraft_ray.specdec.stats import SpeedupModel
from fastdraft_ray.train.losses import make_loss_fn
from fastdraft_ray.train.position import DataPosition, Geometry, row_id
from fastdraft_ray.train.proxy import SCORE_ROWS, ProxySet, score_rows, summarize
from fastdraft_ray.train.watchdog import TrainingStalled, Watchdog

log = logging.getLogger(__name__)
DS_TAG = "ds"
STATE_FILE = "train_state.json"


@dataclass
class Hooks:
    """Hooks of the loop, off by default.

    ``trace_dir`` (``train.audit_dir``): every rank appends one JSON line per optimizer step (ids of the rows it
    trained, rows received, loss, node): an audit log.
    ``fail_at`` ``{"rank", "step", "marker", "delay_s"}``: that rank's process dies (``os._exit``) ``delay_s`` after
    that step, once (the marker file remembers it) -- a real process death, not an exception. Ray Train V2 registers
    a reported checkpoint when its controller next polls the workers (every 2 s): a death inside that window falls
    back to the checkpoint before.
    """

    trace_dir: str | None = None
    fail_at: dict | None = None

    def trace(self, **record) -> None:
        """Append ``record`` (its ``rank`` names the file) to this rank's audit log."""
        if self.trace_dir:
            Path(self.trace_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(self.trace_dir, f"rank{record['rank']}.jsonl"), "a") as fh:
                fh.write(json.dumps({"pid": os.getpid(), **record}) + "\n")

    def maybe_fail(self, rank: int, step: int) -> None:
        f = self.fail_at
        if f and rank == f["rank"] and step == f["step"] and not Path(f["marker"]).exists():
            Path(f["marker"]).write_text(str(os.getpid()))
            time.sleep(float(f.get("delay_s", 0)))
            os._exit(1)


@dataclass
class LoopSpec:
    """What every worker of one training stage needs; ``train_stage`` builds it, Ray pickles it to the workers."""

    run: FastDraftConfig  # the stage's config: its train section drives the loop
    init_dir: str  # the HF draft the stage starts from (weights + the target's tokenizer)
    stage_dir: str  # <run_dir>/<stage>: TensorBoard in tb/, the export in export/ (shared storage)
    seq_len: int
    rows_per_epoch: int
    data_start_row: int  # the global row the driver's dataset starts at (the resumed checkpoint's position)
    has_val: bool  # a "val" dataset was passed: validation loss every train.eval_every steps
    kd_layout: dict | None = None  # FT: fixed-width distillation rows (kd_rows.RowLayout) and the FT loss
    proxy: ProxySet | None = None  # scored before the first step, every train.proxy_every steps, after the last
    speedup_model: SpeedupModel | None = None  # the search's: adds train/predicted_speedup to every proxy score
    hooks: Hooks = field(default_factory=Hooks)


def train_fn_per_worker(config: dict) -> None:
    """Ray Train V2 entry point: train the stage's token budget (resuming ``ray.train.get_checkpoint()``), under a
    watchdog (``train.watchdog_s``) that turns a silent stall into a failure naming what the worker waited for."""
    spec: LoopSpec = config["spec"]
    watchdog = Watchdog(spec.run.train.watchdog_s, ray.train.get_context().get_world_rank())
    try:
        StageLoop(spec, watchdog).train()
    except TrainingStalled:
        raise TrainingStalled(watchdog.fired) from None
    finally:
        watchdog.stop()


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


class WorkerRows:
    """This worker's micro-batches (``micro_batch_size`` rows, int32 numpy) from its split of the train dataset:
    Ray Data hands it every ``world``-th block of ``micro_batch_size`` rows (``train.run.build_datasets``), i.e.
    its slice of each global micro-batch, so no worker reads another's rows. ``skip_rows`` (all workers together)
    are discarded first; ``read`` counts the rows this worker received (the audit trace records it)."""

    def __init__(self, shard, geo: Geometry, skip_rows: int):
        if skip_rows % geo.rows_per_micro_step:
            raise ValueError(f"cannot resume {skip_rows} rows into the stream: not a whole global micro-batch")
        self.to_skip, self.read = skip_rows // geo.rows_per_micro_step, 0
        self.batches = iter(
            shard.iter_batches(batch_size=geo.micro_batch_size, batch_format="numpy", drop_last=True)
        )

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        while True:
            rows = _as_rows(next(self.batches))
            self.read += len(rows)
            if not self.to_skip:
                return rows
            self.to_skip -= 1


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


def predicted_speedups(proxy_scores: dict[str, float], speedup_model: SpeedupModel | None) -> dict[str, float]:
    """``train/predicted_speedup`` (+ ``_greedy``, ``train/predicted_gamma``): the speedup a draft with the proxy's
    per-token acceptance would reach with ``speedup_model`` (the search's), else empty."""
    if speedup_model is None or "train/proxy_acceptance" not in proxy_scores:
        return {}
    gamma, speedup = speedup_model.predict(proxy_scores["train/proxy_acceptance"])
    _, greedy = speedup_model.predict(proxy_scores["train/proxy_top1"])
    return {
        "train/predicted_speedup": speedup,
        "train/predicted_speedup_greedy": greedy,
        "train/predicted_gamma": gamma,
    }


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load_teacher(run: FastDraftConfig, train: TrainConfig):
    """The frozen target as the online teacher (train.teacher=online), on this worker's device: bf16 on GPU when
    the stage trains in bf16, else the target's configured dtype."""
    from fastdraft_ray.models.target import load_target

    model_cfg = run.model
    device = "cuda" if train.use_gpu and torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if train.precision == "bf16" and device == "cuda" else model_cfg.dtype
    teacher, _ = load_target(model_cfg.target, dtype, device, model_cfg.trust_remote_code)
    teacher.eval().requires_grad_(False)
    log.info(
        "online teacher %s loaded (%s, %s), peak RSS %.0f MB", model_cfg.target, dtype, device, _peak_rss_mb()
    )
    return teacher


class StageLoop:
    """One worker's training of one stage: ``__init__`` is the setup, ``train`` the loop (see the module doc)."""

    def __init__(self, spec: LoopSpec, watchdog: Watchdog | None = None):
        import deepspeed

        from fastdraft_ray.models.draft import load_draft
        from fastdraft_ray.train.deepspeed import deepspeed_config, lr_scheduler

        self.spec, self.train_cfg = spec, spec.run.train
        self.watchdog = watchdog or Watchdog(0)
        train = self.train_cfg
        torch.set_num_threads(train.cpus_per_worker)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.geo = Geometry(self.world, train.micro_batch_size, train.grad_accum_steps, spec.seq_len)
        self.total_steps = self.geo.total_steps(train.token_budget)
        torch.manual_seed(train.seed)
        self.watchdog.phase(f"loading the online teacher {spec.run.model.target}")
        teacher = _load_teacher(spec.run, train) if train.teacher == "online" else None
        self.loss_fn = make_loss_fn(spec.kd_layout, train.kd_loss, train.kd_alpha, teacher, train.teacher_topk)

        self.watchdog.phase(f"loading the draft {spec.init_dir}")
        model = load_draft(spec.init_dir).train()
        model.config.use_cache = False
        if train.freeze_embeddings:
            model.get_input_embeddings().requires_grad_(False)
        clear_stale_locks()  # a build killed earlier must not make DeepSpeed's op build wait forever
        self.watchdog.phase("starting DeepSpeed (it may be building or loading its C++ communication op)")
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(train, self.total_steps),
            lr_scheduler=lr_scheduler(train, self.total_steps),
        )
        self.position, last = DataPosition(0, 0, spec.rows_per_epoch), {}
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            self.watchdog.phase("restoring the checkpoint")
            self.position, last = self._restore(checkpoint)
        self.resumed_at = self.position.step
        self.stage = StageLayout(Path(spec.stage_dir))
        self.writer = self._tensorboard() if self.rank == 0 else None
        self.watchdog.phase("reading the validation rows")
        self.val_rows = _val_rows(self.geo, train.val_rows, spec.has_val)
        self.batches = WorkerRows(
            ray.train.get_dataset_shard("train"), self.geo, self.position.rows_consumed - spec.data_start_row
        )
        self.val_loss = last.get("val/loss")
        self.proxy_scores = {k: v for k, v in last.items() if "proxy" in k}
        self.elapsed_before, self.loop_start = float(last.get("train/elapsed_s", 0.0)), time.perf_counter()
        self.window_time, self.window_steps = 0.0, 0

    # ----------------------------------------------------------------------------------------------- loop

    def train(self) -> None:
        """Train from the resumed step to the last, then make sure the export exists."""
        train = self.train_cfg
        if self.position.step == 0:
            self.score_proxy(0)
        while self.position.step < self.total_steps:
            self.watchdog.phase(
                f"training step {self.position.step + 1} (waiting for data, a peer's gradients, or the step itself)"
            )
            t0 = time.perf_counter()
            losses, ids = self.step()
            self.window_time += time.perf_counter() - t0
            self.window_steps += 1
            step = self.position.step
            mean_loss = _mean_across([float(np.mean(losses))], self.engine.device)[0]
            self.spec.hooks.trace(
                step=step,
                rank=self.rank,
                rows=ids,
                rows_read=self.batches.read,
                loss=mean_loss,
                local_loss=float(np.mean(losses)),
                resumed_at=self.resumed_at,
                seconds=time.perf_counter() - t0,
                peak_rss_mb=_peak_rss_mb(),
                node=ray.get_runtime_context().get_node_id() if self.spec.hooks.trace_dir else None,
                ip=ray.util.get_node_ip_address() if self.spec.hooks.trace_dir else None,
            )
            last = step == self.total_steps
            if step % train.log_every == 0 or last:
                self.log(mean_loss)
            if step % train.eval_every == 0 or last:
                self.validate()
            if (train.proxy_every > 0 and step % train.proxy_every == 0) or last:
                self.score_proxy(step)
            metrics = self.metrics(mean_loss)
            if last:
                self.export()
            if step % train.checkpoint_every == 0 or last:
                self.checkpoint(metrics)
            self.spec.hooks.maybe_fail(self.rank, step)
        if self.resumed_at == self.total_steps:  # the final checkpoint exists: only make sure the export does too
            self.export()
        if self.writer is not None:
            self.writer.close()

    def step(self) -> tuple[list[float], list[int]]:
        """One optimizer step over ``grad_accum_steps`` global micro-batches, this rank training its slice of each;
        returns its micro-step losses and (when tracing) the ids of the rows it trained."""
        losses, ids = [], []
        for _ in range(self.geo.grad_accum_steps):
            try:
                rows = next(self.batches)
            except StopIteration as exc:
                raise RuntimeError(
                    f"training data ran out at step {self.position.step + 1} of {self.total_steps}"
                ) from exc
            loss = self.loss_fn(self.engine, torch.from_numpy(rows).to(self.engine.device))
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.item())
            ids += [row_id(r) for r in rows] if self.spec.hooks.trace_dir else []
        step = self.position.step + 1
        self.position = DataPosition(step, step * self.geo.rows_per_step, self.position.rows_per_epoch)
        return losses, ids

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0] if self.scheduler is not None else self.train_cfg.lr

    def metrics(self, loss: float) -> dict:
        """What this step reports to Ray Train (and a checkpoint keeps for a resumed run)."""
        rows = self.position.rows_consumed
        return {
            "step": self.position.step,
            "train/loss": loss,
            "train/lr": self.lr,
            "val/loss": self.val_loss,
            "train/tokens_seen": rows * self.geo.seq_len,
            "train/samples_seen": rows,
            "train/elapsed_s": self.elapsed_before + time.perf_counter() - self.loop_start,
            **self.proxy_scores,
        }

    # ------------------------------------------------------------------------------------------- logging

    def _tensorboard(self):
        from torch.utils.tensorboard import SummaryWriter

        log.info(
            "rank 0: %d workers, %d steps of %d tokens, starting at step %d (row %d)",
            self.world,
            self.total_steps,
            self.geo.tokens_per_step,
            self.resumed_at,
            self.position.rows_consumed,
        )
        return SummaryWriter(
            str(self.stage.tensorboard), purge_step=self.resumed_at + 1 if self.resumed_at else None
        )

    def log(self, loss: float) -> None:
        """Rank 0: the train scalars of the window since the last log."""
        if self.writer is None:
            return
        step, rows = self.position.step, self.position.rows_consumed
        tokens_per_s = self.window_steps * self.geo.tokens_per_step / max(self.window_time, 1e-9)
        for name, value in (
            ("train/loss", loss),
            ("train/lr", self.lr),
            ("train/tokens_per_s", tokens_per_s),
            ("train/samples_seen", rows),
            ("train/tokens_seen", rows * self.geo.seq_len),
            ("train/peak_rss_mb", _peak_rss_mb()),
        ):
            self.writer.add_scalar(name, value, step)
        log.info("step %d/%d loss %.4f lr %.2e %.0f tok/s", step, self.total_steps, loss, self.lr, tokens_per_s)
        self.window_time, self.window_steps = 0.0, 0

    @torch.no_grad()
    def validate(self) -> None:
        """Mean loss on the validation rows (row-weighted); every rank scores an equal share of each micro-batch
        (the last one may be shorter than a global micro-batch)."""
        rows, geo = self.val_rows, self.geo
        self.watchdog.phase(f"validating after step {self.position.step}")
        if rows is None:
            self.val_loss = None
            return
        self.engine.eval()
        total = 0.0
        for start in range(0, len(rows), geo.rows_per_micro_step):
            chunk = rows[start : start + geo.rows_per_micro_step]
            share = len(chunk) // geo.world_size
            mine = chunk[self.rank * share : (self.rank + 1) * share]
            total += self.loss_fn(self.engine, torch.from_numpy(mine).to(self.engine.device)).item() * share
        self.engine.train()
        self.val_loss = _mean_across([total / (len(rows) // geo.world_size)], self.engine.device)[0]
        if self.writer is not None:
            self.writer.add_scalar("val/loss", self.val_loss, self.position.step)

    def score_proxy(self, at_step: int) -> None:
        """The training proxy of the current weights (every rank scores a share of the rows, sums are averaged) and
        the speedup it predicts; rank 0 logs them."""
        proxy = self.spec.proxy
        if proxy is None:
            return
        self.watchdog.phase(f"scoring the training proxy at step {at_step}")
        self.engine.eval()
        share = -(-len(proxy) // self.world)
        rows = list(range(self.rank, len(proxy), self.world))
        totals = score_rows(self.engine, proxy, rows, self.train_cfg.proxy_temperature, -(-share // SCORE_ROWS))
        self.engine.train()
        tasks = list(totals)
        flat = _mean_across([x for task in tasks for x in totals[task]], self.engine.device)
        scores = summarize({task: np.array(flat[3 * i : 3 * i + 3]) for i, task in enumerate(tasks)})
        self.proxy_scores.update(
            {(f"train/{k}" if k.startswith("proxy_") else f"proxy/{k}"): v for k, v in scores.items()}
        )
        self.proxy_scores.update(predicted_speedups(self.proxy_scores, self.spec.speedup_model))
        if self.writer is not None:
            for name, value in self.proxy_scores.items():
                self.writer.add_scalar(name, value, at_step)
            self.writer.add_scalar(
                "train/elapsed_s", self.elapsed_before + time.perf_counter() - self.loop_start, at_step
            )
            acceptance, top1 = (
                self.proxy_scores.get(f"train/proxy_{k}", float("nan")) for k in ("acceptance", "top1")
            )
            log.info("step %d: proxy acceptance %.4f, top-1 %.4f", at_step, acceptance, top1)

    # ---------------------------------------------------------------------------------- checkpoint, export

    def checkpoint(self, metrics: dict) -> None:
        """DeepSpeed checkpoint (every rank writes its part) + data position, reported to Ray Train."""
        self.watchdog.phase(f"writing the checkpoint of step {self.position.step}")
        tmp = tempfile.mkdtemp(prefix="fastdraft-ckpt-")
        try:
            self.engine.save_checkpoint(tmp, tag=DS_TAG)
            if self.rank == 0:
                state = {"position": self.position.to_dict(), "geometry": self.geo.to_dict(), "metrics": metrics}
                Path(tmp, STATE_FILE).write_text(json.dumps(state, indent=1))
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"step_{self.position.step:08d}",
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _restore(self, checkpoint) -> tuple[DataPosition, dict]:
        with checkpoint.as_directory() as ckpt_dir:
            state = json.loads(Path(ckpt_dir, STATE_FILE).read_text())
            if state["geometry"] != self.geo.to_dict():
                raise RuntimeError(
                    f"checkpoint geometry {state['geometry']} differs from this run's {self.geo.to_dict()}: "
                    "resume with the same num_workers, micro_batch_size, grad_accum_steps and seq_len"
                )
            load_path, _ = self.engine.load_checkpoint(ckpt_dir, tag=DS_TAG)
            if load_path is None:
                raise RuntimeError(f"DeepSpeed found no checkpoint under {ckpt_dir}")
        return DataPosition.from_dict(state["position"]), state.get("metrics", {})

    def export(self) -> None:
        """Rank 0 writes the trained draft as a plain HF folder (fp32 safetensors + the target's tokenizer)."""
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from fastdraft_ray.models.draft import save_draft

        engine, out_dir = self.engine, self.stage.export
        self.watchdog.phase(f"exporting the draft to {out_dir}")
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.train_cfg.zero_stage == 3):
            if self.rank == 0:
                state = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
        if self.rank == 0:
            model = AutoModelForCausalLM.from_config(engine.module.config, dtype=torch.float32)
            model.load_state_dict(state)
            tmp = out_dir.with_name(out_dir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            save_draft(model.eval(), AutoTokenizer.from_pretrained(self.spec.init_dir), tmp)
            shutil.rmtree(out_dir, ignore_errors=True)
            tmp.rename(out_dir)
