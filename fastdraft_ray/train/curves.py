"""Loss curves of a run: read the stages' TensorBoard scalars and draw train/val loss against tokens seen."""

from __future__ import annotations

from pathlib import Path

from fastdraft_ray.layout import RunLayout
from fastdraft_ray.stage_graph import COMPUTE, TRAINING


def read_scalars(tb_dir: str | Path, tags: tuple[str, ...] = ("train/loss", "val/loss")) -> dict[str, list]:
    """``{tag: [(step, value), ...]}`` from one stage's TensorBoard folder (missing tags are empty)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    present = set(acc.Tags().get("scalars", []))
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] if tag in present else [] for tag in tags}


def plot_loss_curves(layout: RunLayout, out_png: str | Path, stages: tuple[str, ...] = TRAINING) -> Path:
    """One figure, stages laid end to end on a tokens axis: train loss as lines, validation loss as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    offset = 0
    for stage in stages:
        tb = layout.stage(stage).tensorboard
        if not tb.exists():
            continue
        scalars = read_scalars(tb, ("train/loss", "val/loss", "train/tokens_seen"))
        tokens_at = dict(scalars["train/tokens_seen"])
        per_step = max(tokens_at.items())[1] / max(tokens_at) if tokens_at else 1.0

        def x(step: int) -> float:
            return (offset + tokens_at.get(step, step * per_step)) / 1e6  # noqa: B023 - used within this iteration

        for tag, style in (("train/loss", "-"), ("val/loss", "o--")):
            points = scalars[tag]
            if points:
                ax.plot([x(s) for s, _ in points], [v for _, v in points], style, label=f"{stage.upper()} {tag}")
        offset += max(tokens_at.values(), default=0)
        ax.axvline(offset / 1e6, color="grey", lw=0.5)
    ax.set_xlabel("training tokens (millions, stages end to end)")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(f"draft training: {Path(layout.root).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


PROXY_TAGS = ("train/proxy_acceptance", "train/proxy_top1", "train/elapsed_s")


def stage_wall_s(layout: RunLayout, stage: str) -> float | None:
    """Wall seconds a finished stage took (its DONE.json), None if it has not finished."""
    import json

    done = layout.kd.done if stage == "generate" else layout.stage(stage).done
    return float(json.loads(done.read_text())["wall_time_s"]) if done.exists() else None


def proxy_curve(layout: RunLayout) -> list[dict]:
    """The training proxy against wall minutes spent, stages end to end in pipeline order (PT, CP, KD generation,
    FT): rows ``{stage, step, minutes, proxy_acceptance, proxy_top1}`` from each stage's TensorBoard scalars.

    Within a stage the clock is its ``train/elapsed_s``; each finished stage then adds its whole DONE.json wall time
    (start-up and export included), so a later stage's points sit after everything spent before it."""
    rows, offset = [], 0.0
    for stage in COMPUTE:
        if stage != "generate" and layout.stage(stage).tensorboard.exists():
            scalars = {k: dict(v) for k, v in read_scalars(layout.stage(stage).tensorboard, PROXY_TAGS).items()}
            for step, value in sorted(scalars["train/proxy_acceptance"].items()):
                rows.append(
                    {
                        "stage": stage,
                        "step": step,
                        "minutes": (offset + scalars["train/elapsed_s"].get(step, 0.0)) / 60,
                        "proxy_acceptance": value,
                        "proxy_top1": scalars["train/proxy_top1"].get(step),
                    }
                )
        offset += stage_wall_s(layout, stage) or 0.0
    return rows
