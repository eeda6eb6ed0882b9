"""The pipeline's stages, defined once: name, label, the ``pipeline.stages`` entry that selects each, whether it
trains a draft, where its draft and data come from, and which config keys only change how fast it runs.

It is the lowest module of the package (config reads it); layout, training, curves, distillation, the pipeline
and the jobs read it too, and no other module spells a list of stage names (``tests/test_stage_graph.py`` checks it with ``ast``). In order::

  prepare/pt, prepare/cp   token shards                    (entry: prepare)
  search                   the draft's shape (opt-in)      (entry: search)
  pt                       pre-training                    trains; data prepare/pt
  cp                       continued pre-training          trains; data prepare/cp; draft from pt
  generate                 target-written KD data
  ft                       distillation                    trains; data generate; draft from cp, else pt
  evaluate                 speculative decoding of the trained drafts
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    """One stage of the graph (see the module docstring)."""

    name: str
    label: str  # how logs and reports name it
    entry: str  # the ``pipeline.stages`` entry that selects it
    trains: bool = False  # a training stage: its folder is a Ray Train run, its export a draft
    data_from: str | None = None  # the stage whose output it trains on
    draft_from: tuple[str, ...] = ()  # training stages whose export it may start from; the last is the default
    costs_compute: bool = False  # counted on the compute clock of the alpha-against-compute curves


STAGES = (
    StageSpec("prepare/pt", "prepare PT data", "prepare"),
    StageSpec("prepare/cp", "prepare CP data", "prepare"),
    StageSpec("search", "architecture search", "search"),
    StageSpec("pt", "PT", "pt", trains=True, data_from="prepare/pt", costs_compute=True),
    StageSpec("cp", "CP", "cp", trains=True, data_from="prepare/cp", draft_from=("pt",), costs_compute=True),
    StageSpec("generate", "generate KD data", "generate", costs_compute=True),
    StageSpec("ft", "FT", "ft", trains=True, data_from="generate", draft_from=("pt", "cp"), costs_compute=True),
    StageSpec("evaluate", "evaluate", "evaluate"),
)
BY_NAME = {s.name: s for s in STAGES}
ORDER = tuple(BY_NAME)
TRAINING = tuple(s.name for s in STAGES if s.trains)
COMPUTE = tuple(s.name for s in STAGES if s.costs_compute)
ENTRIES = {
    entry: tuple(s.name for s in STAGES if s.entry == entry) for entry in dict.fromkeys(s.entry for s in STAGES)
}
PREPARE = ENTRIES["prepare"]
PRETRAINING = tuple(s.name for s in STAGES if s.trains and s.data_from in PREPARE)  # train on prepared shards

# Config keys that change how fast a stage runs, not what it produces: a finished stage is reused across them.
SPEED_ONLY = {
    "data": ("output", "num_tokenizer_actors", "tokenizer_actor_cpus", "tokenize_batch_size", "max_buffer_mb"),
    "train": (
        "max_failures",
        "log_every",
        "checkpoints_to_keep",
        "checkpoint_every",
        "eval_every",  # the final val/loss is computed at the last step whatever eval_every is
        "worker_resources",
        "placement_strategy",
        "watchdog_s",
        "audit_dir",
        "proxy_every",  # the training proxy only measures: it never changes the weights
        "proxy_prompts_per_task",
        "proxy_tokens",
        "proxy_topk",
        "proxy_temperature",
    ),
    "generate": ("num_actors", "cpus_per_actor", "use_gpu", "batch_size", "backend", "output"),
    "evaluate": ("drafts",),
    "search": ("max_concurrent_trials", "device_profile"),
}


class StageError(ValueError):
    """An unknown stage or selection entry; the message lists the valid ones."""


def spec(name: str) -> StageSpec:
    """The stage called ``name``."""
    if name not in BY_NAME:
        raise StageError(f"unknown stage {name!r}; stages: {', '.join(ORDER)}")
    return BY_NAME[name]


def label(name: str) -> str:
    return spec(name).label


def expand(entries: Iterable[str]) -> list[str]:
    """Stage names of ``pipeline.stages``-style entries (``prepare`` = both prepare stages), in pipeline order."""
    names = set()
    for entry in entries:
        if entry not in ENTRIES and entry not in BY_NAME:
            raise StageError(f"unknown pipeline stage {entry!r}; choose from {', '.join(ENTRIES)}")
        names.update(ENTRIES.get(entry, (entry,)))
    return [name for name in ORDER if name in names]


def draft_source(stage: str, selected: Iterable[str]) -> str | None:
    """The training stage whose export ``stage`` starts from: the nearest earlier one of ``selected`` that it may
    start from (so FT starts from PT when the run selects no CP), else its default (CP from PT, FT from CP); None
    for PT (a fresh draft derived from the target)."""
    choices = spec(stage).draft_from
    chosen = [name for name in choices if name in set(selected)]
    return chosen[-1] if chosen else (choices[-1] if choices else None)
