"""Loss curves are read back from the stages' TensorBoard scalars and drawn end to end."""

from torch.utils.tensorboard import SummaryWriter

from fastdraft_ray.layout import RunLayout
from fastdraft_ray.train.curves import plot_loss_curves, read_scalars


def _write_stage(run_dir, stage, losses):
    writer = SummaryWriter(str(run_dir / stage / "tb"))
    for step, loss in enumerate(losses, start=1):
        writer.add_scalar("train/loss", loss, step)
        writer.add_scalar("train/tokens_seen", step * 1000, step)
    writer.add_scalar("val/loss", losses[-1] + 0.1, len(losses))
    writer.close()


def test_curves_read_back_and_plot(tmp_path):
    _write_stage(tmp_path, "pt", [9.0, 7.5, 6.5])
    _write_stage(tmp_path, "cp", [7.0, 6.0])
    scalars = read_scalars(tmp_path / "pt" / "tb")
    assert scalars["train/loss"] == [(1, 9.0), (2, 7.5), (3, 6.5)]
    ((val_step, val_loss),) = scalars["val/loss"]
    assert val_step == 3 and abs(val_loss - 6.6) < 1e-5  # stored as float32
    out = plot_loss_curves(RunLayout.at(tmp_path), tmp_path / "curve.png")
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
    assert read_scalars(tmp_path / "pt" / "tb", ("nope",)) == {"nope": []}
