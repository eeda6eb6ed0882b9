"""Driver side of one training stage (PT, CP): prepare the initial draft, build the datasets, run the
``TorchTrainer``, and write the stage's ``DONE.json``.

Run-directory layout of a stage (``<run_dir>/<stage>/`` is also Ray Train's run folder, so the same run name
resumes the same run):

  init/          the draft the stage starts from (PT: random, derived from the target; CP: the PT export)
  step_<N>/      Ray Train checkpoints: DeepSpeed state (``ds/``) + ``train_state.json`` (data position)
  tb/            TensorBoard scalars (train/loss, train/tokens_per_s, train/lr, val/loss, samples/tokens seen,
                 train/proxy_acceptance, train/proxy_top1, proxy/<family>/..., train/elapsed_s)
  export/        the trained draft as a plain HF folder (safetensors + the target's tokenizer): the hand-off
  DONE.json      config, metrics, wall time, input fingerprints; present only once the stage finished

Storage must be visible to every node (local disk on one machine, NFS on several).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from fastdraft_ray.assets import sha256_file
from fastdraft_ray.config import FastDraftConfig, to_dict
from fastdraft_ray.layout import RunLayout, is_url
from fastdraft_ray.models.construct import prepare_init
from fastdraft_ray.ray_runtime import DATA_CPUS
from fastdraft_ray.train.position import DataPosition, Geometry, epoch_plan

log = logging.getLogger(__name__)


def checkpoint_state(sdir: str | Path) -> dict | None:
    """The training state (data position, batch geometry, metrics) of the latest checkpoint Ray Train registered
    for the stage in ``sdir`` (``<run_dir>/<stage>``), or None (no run folder, no registered checkpoint yet)."""
    from ray.train import Result

    sdir = Path(sdir)
    if not sdir.is_dir():
        return None
    try:
        checkpoint = Result.from_path(str(sdir)).checkpoint
    except RuntimeError:
        return None
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as ckpt_dir:
        return json.loads(Path(ckpt_dir, "train_state.json").read_text())


def resume_position(sdir: str | Path) -> DataPosition | None:
    """Where training of the stage in ``sdir`` resumes: the data position of its latest checkpoint, or None.

    The one rule ``train_stage`` follows; the pipeline asks it to say whether a stage has unfinished work.
    """
    state = checkpoint_state(sdir)
    return DataPosition.from_dict(state["position"]) if state else None


def check_resume_geometry(state: dict | None, geo: Geometry) -> None:
    """Refuse, before any worker starts, to resume a checkpoint written with another batch geometry: DeepSpeed's
    ZeRO state is partitioned per worker, and the data position counts global batches."""
    if state is None or state["geometry"] == geo.to_dict():
        return
    old = Geometry(**state["geometry"])
    raise ValueError(
        f"the checkpoint to resume was written by {old.world_size} workers x micro_batch_size "
        f"{old.micro_batch_size} x grad_accum_steps {old.grad_accum_steps} (seq_len {old.seq_len}); this run has "
        f"{geo.world_size} x {geo.micro_batch_size} x {geo.grad_accum_steps} (seq_len {geo.seq_len}). Resume with "
        f"train.num_workers={old.world_size} train.micro_batch_size={old.micro_batch_size} "
        f"train.grad_accum_steps={old.grad_accum_steps}: on fewer nodes, Ray places several workers on one node "
        "(lower train.cpus_per_worker until they fit). Or choose another run_name to start the stage afresh."
    )


def build_datasets(
    data_dir: str, cfg: FastDraftConfig, start_row: int, end_row: int, tokenizer_hash: str, rows_per_epoch: int
) -> dict:
    """``{"train": rows [start_row, end_row) of the global order, "val": the val split}`` as Ray Datasets."""
    from fastdraft_ray.data.stream import read_manifest, training_dataset, worker_blocks

    parts = [
        training_dataset(
            data_dir,
            split="train",
            seed=cfg.train.seed,
            epoch=epoch,
            skip_rows=skip,
            expected_tokenizer_hash=tokenizer_hash,
        )
        for epoch, skip in epoch_plan(start_row, end_row, rows_per_epoch)
    ]
    train = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    # blocks of one worker's micro-batch, dealt round-robin by the split: worker r reads rows [r*m, (r+1)*m) of
    # each global micro-batch, and only those
    datasets = {"train": worker_blocks(train, cfg.train.micro_batch_size)}
    if cfg.train.val_rows > 0 and _split_rows(read_manifest(data_dir), "val"):
        datasets["val"] = training_dataset(
            data_dir, split="val", seed=0, epoch=0, expected_tokenizer_hash=tokenizer_hash
        )
    return datasets


def _split_rows(manifest: dict, split: str) -> int:
    """Rows of a split, 0 if the shard folder has no such split."""
    return int(manifest.get("splits", {}).get(split, {}).get("rows", 0))


def _check_cpus(tc) -> None:
    """Refuse (before any worker starts) a CPU run whose workers would leave Ray Data less than ``DATA_CPUS``: the
    shard reads and the per-worker block cutting could then never run, and training would wait forever."""
    import ray

    if tc.use_gpu:
        return
    total, needed = ray.cluster_resources().get("CPU", 0), tc.num_workers * tc.cpus_per_worker
    if total - needed < DATA_CPUS:
        raise ValueError(
            f"the cluster has {total:g} CPUs and the {tc.num_workers} training workers take {needed}: Ray Data "
            f"needs {DATA_CPUS} more to read the token shards and cut them into per-worker blocks. Add a CPU "
            "(ray start --num-cpus / ray.init(num_cpus=...) count logical CPUs) or lower "
            "train.cpus_per_worker / train.num_workers."
        )


def train_stage(
    cfg: FastDraftConfig,
    data_dir: str,
    *,
    init_from: str | None = None,
    proxy=None,
    callbacks: list | None = None,
    speedup_model=None,
    hooks=None,
) -> dict:
    """Train stage ``cfg.train.stage`` on the prepared shards in ``data_dir``; returns the DONE.json record.

    Resumes the stage's latest checkpoint if the run directory has one (``resume_position``; DONE.json's
    ``resumed_from`` records which). ``proxy``: a ``ProxySet`` to score (default: the run's own, built on first
    use); ``callbacks``: Ray Train callbacks and ``speedup_model``: a ``stats.SpeedupModel`` (the search's
    ``TuneReportCallback`` and latency model); ``hooks``: the loop's test ``Hooks`` (audit trace, a planted death).
    """
    import ray.train
    from ray.data import DataContext
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from fastdraft_ray.data.stream import read_manifest, train_data_config
    from fastdraft_ray.models.target import load_tokenizer, tokenizer_fingerprint
    from fastdraft_ray.train.deepspeed import deepspeed_config
    from fastdraft_ray.train.loop import Hooks, LoopSpec, train_fn_per_worker
    from fastdraft_ray.train.losses import check_loss_settings

    stage, tc = cfg.train.stage, cfg.train
    started = time.time()
    paths = RunLayout.of(cfg).stage(stage)
    sdir = paths.root
    sdir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(data_dir)
    DataContext.get_current().enable_progress_bars = False
    tokenizer_hash = tokenizer_fingerprint(load_tokenizer(cfg.model.target, cfg.model.trust_remote_code))
    if manifest.get("tokenizer_hash") != tokenizer_hash:
        raise ValueError(
            f"{data_dir} was tokenized with a different tokenizer than target {cfg.model.target} "
            f"(hash {manifest.get('tokenizer_hash')} vs {tokenizer_hash}); re-run data preparation"
        )
    geo = Geometry(tc.num_workers, tc.micro_batch_size, tc.grad_accum_steps, int(manifest["seq_len"]))
    total_steps = geo.total_steps(tc.token_budget)
    deepspeed_config(tc, total_steps)  # validate before starting workers
    check_loss_settings(manifest.get("kd_layout"), tc.kd_loss, tc.teacher == "online")
    init_dir = prepare_init(cfg, paths.init, init_from, data_dir=data_dir)
    rows_per_epoch = _split_rows(manifest, "train")
    _check_cpus(tc)
    state = checkpoint_state(sdir)
    check_resume_geometry(state, geo)
    resume = DataPosition.from_dict(state["position"]) if state else None
    start_row = resume.rows_consumed if resume else 0
    if resume:
        log.info("resuming stage %s at step %d (global row %d)", stage, resume.step, start_row)
    datasets = build_datasets(
        data_dir, cfg, start_row, max(start_row, total_steps * geo.rows_per_step), tokenizer_hash, rows_per_epoch
    )
    if tc.proxy_every <= 0:
        proxy = None
    elif proxy is None:
        from fastdraft_ray.train.proxy import load_or_build

        proxy = load_or_build(cfg)
    spec = LoopSpec(
        run=cfg,
        init_dir=str(init_dir),
        stage_dir=str(sdir),
        seq_len=geo.seq_len,
        rows_per_epoch=rows_per_epoch,
        data_start_row=start_row,
        has_val="val" in datasets,
        kd_layout=manifest.get("kd_layout"),  # FT rows (train/kd_rows.py); None for packed text
        proxy=proxy,
        speedup_model=speedup_model,
        hooks=hooks or Hooks(trace_dir=tc.audit_dir or None),
    )
    resources = {"CPU": tc.cpus_per_worker, **tc.worker_resources}  # Ray adds GPU: 1 when use_gpu
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers,
            use_gpu=tc.use_gpu,
            resources_per_worker=resources,
            placement_strategy=tc.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=sdir.name,
            storage_path=str(sdir.parent),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=max(1, tc.checkpoints_to_keep)),
            callbacks=callbacks or None,
        ),
        datasets=datasets,
        dataset_config=train_data_config(datasets_to_split=["train"]),  # val: every worker reads the same rows
    )
    result = trainer.fit()
    export = paths.export
    if not (export / "config.json").exists():
        raise RuntimeError(f"training finished but no export was written to {export}")
    record = {
        "stage": stage,
        "config": to_dict(cfg),
        "metrics": dict(result.metrics or {}),
        "wall_time_s": round(time.time() - started, 1),
        "geometry": {**geo.to_dict(), "total_steps": total_steps, "tokens": total_steps * geo.tokens_per_step},
        # where this run started: None = step 0, else the checkpoint it resumed (steps, rows, tokens done before)
        "resumed_from": None
        if resume is None
        else {"step": resume.step, "rows_consumed": start_row, "tokens": resume.step * geo.tokens_per_step},
        "inputs": {
            "data_dir": data_dir if is_url(data_dir) else str(Path(data_dir).resolve()),
            "manifest_sha256": sha256_file(f"{str(data_dir).rstrip('/')}/manifest.json"),
            "tokenizer_hash": tokenizer_hash,
            "init_from": init_from,
            "init_sha256": sha256_file(init_dir / "model.safetensors"),
        },
        "outputs": {"export": str(export), "checkpoint": result.checkpoint.path if result.checkpoint else None},
    }
    paths.done.write_text(json.dumps(record, indent=1, default=str))
    return record
