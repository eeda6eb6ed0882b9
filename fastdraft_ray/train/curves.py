"""Loss curves of a run: read the stages' TensorBoard scalars and draw train/val loss against tokens seen."""

from __future__ import annotations

from pathlib import Path

from fastdraft_ray.layout import TRAINING_STAGES, RunLayout


def read_scalars(tb_dir: str | Path, tags: tuple[str, ...] = ("train/loss", "val/loss")) -> dict[str, list]:
    """``{tag: [(step, value), ...]}`` from one stage's TensorBoard folder (missing tags are empty)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    present = set(acc.Tags().get("scalars", []))
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] if tag in present else [] for tag in tags}


def plot_loss_curves(layout: RunLayout, out_png: str | Path, stages: tuple[str, ...] = TRAINING_STAGES) -> Path:
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
