"""``RunLayout``: the ONE place that knows every path under a run directory ``<storage>/<run_name>/``.

Every module asks a ``RunLayout`` (``RunLayout.of(cfg)``) for the paths it reads or writes; nothing else joins
run-directory paths. The tree::

  <root>/
    pipeline.json                          the pipeline's per-stage records (pipeline/run.py)
    data/<name>/                           token shards + manifest.json (or data.output)
    kd/                                    KD data (or generate.output): config.json, prompts.parquet,
      magpie/part-NNNNN.parquet              Magpie instructions,
      responses/<writer>-t<T>/part-NNNNN.parquet   one file per unit of work, DONE.json
    <stage>/ (pt, cp, ft)                  Ray Train's run folder: init/, step_<N>/ checkpoints, tb/, export/,
                                           DONE.json
    eval/                                  results.json/.csv/.md/.png, DONE.json
    report/                                the pipeline's report
    loss_curve.png                         train/val loss of every finished stage
    draft_init/                            jobs/derive_draft.py's untrained draft
    proxy/set.npz                          the training proxy's held-out continuations + target top-k
    search/<trial>/                        one isolated run directory per search trial (a RunLayout of its own)

**Remote storage, one policy.** A config's ``storage``, ``data.output`` and ``generate.output`` are filesystem
paths (a URL is refused when the config loads: mount the bucket). ``RunLayout.at`` also takes an fsspec URL
(``s3://``, ``gs://``: every path is then a ``str`` URL) for an existing run directory: evaluation reports are
copied there through fsspec; everything that writes through the filesystem calls ``require_local``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastdraft_ray.stage_graph import TRAINING

if TYPE_CHECKING:
    from fastdraft_ray.config import DataConfig, FastDraftConfig

Location = Path | str  # Path for a local/NFS run directory, str for an fsspec URL
KD_RESPONSES_GLOB = "responses/*/part-*.parquet"
KD_MAGPIE_GLOB = "magpie/part-*.parquet"
DONE = "DONE.json"  # every stage's completion record, written last


def done_file(folder: Path) -> Path:
    """The completion record of a stage folder (``<folder>/DONE.json``)."""
    return Path(folder) / DONE


class LayoutError(ValueError):
    """A run directory that cannot be used as asked; the message says what to change."""


def is_url(location: str | Path) -> bool:
    """Whether ``location`` is an fsspec URL (``s3://bucket/...``) rather than a filesystem path."""
    return "://" in str(location)


def _join(base: Location, *parts: str) -> Location:
    if isinstance(base, Path):
        return base.joinpath(*parts)
    return "/".join([base.rstrip("/"), *parts])


def _local(location: str) -> Location:
    return location.rstrip("/") if is_url(location) else Path(location).expanduser().resolve()


@dataclass(frozen=True)
class KDLayout:
    """Files of one KD data folder (``<run_dir>/kd`` or ``generate.output``, or a folder given on a command line)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def prompts(self) -> Path:
        return self.root / "prompts.parquet"

    @property
    def done(self) -> Path:
        return done_file(self.root)

    def magpie_part(self, index: int) -> Path:
        return self.root / "magpie" / f"part-{index:05d}.parquet"

    def response_part(self, writer: str, temperature: float, shard: int) -> Path:
        """The file of one unit of work: (writer, temperature, shard of prompts)."""
        return self.root / "responses" / f"{writer}-t{float(temperature):.2f}" / f"part-{shard:05d}.parquet"

    def response_files(self) -> list[Path]:
        """Every finished response file, sorted."""
        return sorted(self.root.glob(KD_RESPONSES_GLOB))

    def magpie_files(self) -> list[Path]:
        return sorted(self.root.glob(KD_MAGPIE_GLOB))


@dataclass(frozen=True)
class StageLayout:
    """Files of one training stage folder ``<run_dir>/<stage>`` (also Ray Train's run folder)."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def init(self) -> Path:
        """The draft the stage starts from."""
        return self.root / "init"

    @property
    def export(self) -> Path:
        """The trained draft as a plain HF folder: the hand-off to later stages."""
        return self.root / "export"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def done(self) -> Path:
        return done_file(self.root)


@dataclass(frozen=True)
class SearchLayout:
    """Files of an architecture search, ``<run_dir>/search`` (fastdraft_ray.search)."""

    root: Path

    @property
    def tune(self) -> Path:
        """Ray Tune's experiment folder (``Tuner.restore`` resumes from it; per-trial TensorBoard events)."""
        return self.root / "tune"

    @property
    def profile(self) -> Path:
        """The device profile the drafts were priced with (search/latency.py)."""
        return self.root / "profile.json"

    @property
    def results(self) -> Path:
        """The trials as a table; ``.md`` beside it."""
        return self.root / "results.csv"

    @property
    def recipe(self) -> Path:
        """The winner as a recipe YAML the pipeline runs directly."""
        return self.root / "recipe.yaml"

    @property
    def done(self) -> Path:
        return done_file(self.root)

    def plot(self, name: str) -> Path:
        return self.root / f"{name}.png"

    def trial(self, trial: str) -> RunLayout:
        """An isolated run directory for one trial, ``<run_dir>/search/trials/<trial>``."""
        return RunLayout(self.root / "trials" / trial)


@dataclass(frozen=True)
class RunLayout:
    """Every path of one run directory (see the module docstring for the tree and the remote-storage policy)."""

    root: Location
    data_output: str = ""  # data.output of the config it was built from ('' = data/<name>)
    kd_output: str = ""  # generate.output ('' = kd/)

    @classmethod
    def of(cls, cfg: FastDraftConfig) -> RunLayout:
        """The layout of ``cfg``'s run directory ``<storage>/<run_name>``."""
        return cls(_local(f"{cfg.storage.rstrip('/')}/{cfg.run_name}"), cfg.data.output, cfg.generate.output)

    @classmethod
    def at(cls, root: str | Path) -> RunLayout:
        """The layout of an existing run directory (e.g. a report re-rendered from its folder)."""
        return cls(_local(str(root)))

    @property
    def remote(self) -> bool:
        return not isinstance(self.root, Path)

    def require_local(self, what: str) -> Path:
        """The root as a ``Path``; raises ``LayoutError`` for URL storage, which ``what`` cannot write through."""
        if self.remote:
            raise LayoutError(
                f"storage={self.root!r}: {what} needs a filesystem path (local disk, or NFS mounted on every node)"
            )
        return self.root  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------ data and KD

    def data(self, data: DataConfig | str) -> Location:
        """Shard folder of a prepared set: ``data.output`` if set, else ``<root>/data/<data.name>`` (a plain name
        gives ``<root>/data/<name>``)."""
        if not isinstance(data, str):
            if data.output:
                return _local(data.output)
            data = data.name
        return _join(self.root, "data", data)

    def inside(self, name: str) -> Location:
        """A folder named relative to the run directory (``draft.head_vocab_from`` entries such as ``data/pt``);
        an absolute path or URL is kept as it is."""
        if is_url(name) or Path(name).expanduser().is_absolute():
            return _local(name)
        return _join(self.root, *Path(name).parts)

    @property
    def kd(self) -> KDLayout:
        """The KD data folder: ``generate.output`` if set, else ``<root>/kd``."""
        return KDLayout(Path(self.kd_output).expanduser().resolve() if self.kd_output else self._path("kd"))

    # ------------------------------------------------------------------------------------------- stages

    def stage(self, stage: str) -> StageLayout:
        """The folder of training stage ``stage`` (pt, cp, ft)."""
        if stage not in TRAINING:
            raise LayoutError(f"{stage!r} is not a training stage; choose from {', '.join(TRAINING)}")
        return StageLayout(self._path(stage))

    @property
    def eval_dir(self) -> Location:
        return _join(self.root, "eval")

    @property
    def report_dir(self) -> Path:
        return self._path("report")

    @property
    def pipeline_record(self) -> Path:
        return self._path("pipeline.json")

    @property
    def loss_curve(self) -> Path:
        return self._path("loss_curve.png")

    @property
    def draft_init(self) -> Path:
        return self._path("draft_init")

    @property
    def proxy_set(self) -> Path:
        """The training proxy's cached held-out set (train/proxy.py): target-written continuations + top-k."""
        return self._path("proxy", "set.npz")

    @property
    def search_latency(self) -> Path:
        """A search trial's measured price (draft step, c), written before it trains."""
        return self._path("latency.json")

    @property
    def search(self) -> SearchLayout:
        """The architecture search's folder ``<root>/search`` (trials, Tune experiment, profile, results)."""
        return SearchLayout(self._path("search"))

    def _path(self, *parts: str) -> Path:
        return self.require_local("this stage").joinpath(*parts)
