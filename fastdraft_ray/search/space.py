"""The architecture search space: every draft shape the search may try, already constrained.

A point is an ``Architecture`` (depth, width, heads / KV heads, MLP ratio, output-head vocabulary, init). The
space is the product of ``search.*`` lists, kept only where the shape is valid for the target (heads = hidden /
the target's head_dim, KV heads dividing heads) and its parameter count (``search.budget_kind``: total or
non-embedding, counted on the meta device) lies in ``[search.min_params, search.params_budget]``. ``init=layers``
points (target layers copied, so the target's widths) are a separate sub-space: one per ``search.target_layers``
entry. Sampling only ever picks from this finite, validated list, so an invalid point cannot be sampled.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from fastdraft_ray.config import ConfigError, DraftConfig, SearchConfig
from fastdraft_ray.models.draft import count_params, derive_draft_config, head_dim_of


@dataclass(frozen=True)
class Architecture:
    """One draft shape of the search space."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_vocab: int  # 0 = the full vocabulary
    init: str  # random | pca | layers
    init_layers: tuple[int, ...] = ()  # init=layers: the target layers copied
    params: int = 0
    non_embedding_params: int = 0

    @property
    def name(self) -> str:
        """A readable unique id, e.g. ``L2_H256_h4kv2_I768_K8192_pca`` (also the trial's run-directory name)."""
        head = f"K{self.head_vocab}" if self.head_vocab else "Kfull"
        base = f"L{self.num_layers}_H{self.hidden_size}_h{self.num_heads}kv{self.num_kv_heads}_I{self.intermediate_size}"
        layers = "-".join(map(str, self.init_layers))
        return f"{base}_{head}_{self.init}" + (f"{layers}" if layers else "")

    def draft_config(self, base: DraftConfig | None = None) -> DraftConfig:
        """``base`` (default ``DraftConfig()``) with this shape."""
        return dataclasses.replace(
            base or DraftConfig(),
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size,
            head_vocab=self.head_vocab,
            init=self.init,
            init_layers=list(self.init_layers),
            params_budget=None,
        )

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "init_layers": list(self.init_layers), "name": self.name}

    @classmethod
    def from_dict(cls, data: dict) -> Architecture:
        """From ``to_dict`` output or a results-table row (``init_layers`` there is ``"0-29"``, or empty/NaN)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        layers = data.get("init_layers", ())
        if not isinstance(layers, (list, tuple)):
            layers = [int(i) for i in str(layers).split("-") if i.isdigit()]
        return cls(**{**{k: v for k, v in data.items() if k in fields}, "init_layers": tuple(layers)})

    @classmethod
    def of(cls, shape: DraftConfig, params: int = 0, non_embedding_params: int = 0) -> Architecture:
        """The point of a draft shape (parameter counts as given)."""
        return cls(
            shape.num_layers,
            shape.hidden_size,
            shape.num_heads,
            shape.num_kv_heads,
            shape.intermediate_size,
            shape.head_vocab,
            shape.init,
            tuple(shape.init_layers),
            params,
            non_embedding_params,
        )


def shape_at(
    layers: int, hidden: int, groups: int, ratio: float, head_vocab: int, init: str, head_dim: int
) -> DraftConfig | None:
    """The draft shape of one combination of the space's lists (heads = hidden / head_dim, KV heads = heads /
    groups, MLP = ratio x hidden rounded to a multiple of 64), or None when the combination is not a valid shape."""
    if layers < 1 or hidden % head_dim or hidden < head_dim or groups < 1:
        return None
    heads = hidden // head_dim
    inter = int(round(hidden * ratio / 64)) * 64
    if heads % groups or inter < 64:
        return None
    return DraftConfig(
        num_layers=int(layers),
        hidden_size=int(hidden),
        num_heads=heads,
        num_kv_heads=heads // int(groups),
        intermediate_size=inter,
        head_vocab=int(head_vocab),
        init=init,
    )


def _check_lists(s: SearchConfig, target) -> None:
    """What only the target can tell (the lists themselves were checked when ``s`` was built)."""
    n = target.num_hidden_layers
    for layers in s.target_layers:
        if not isinstance(layers, list) or not layers or any(not 0 <= int(i) < n for i in layers):
            raise ConfigError(
                f"search.target_layers entries must be lists of target layer indices 0..{n - 1}, got {layers!r}"
            )
    if any(k > target.vocab_size for k in s.head_vocabs):
        raise ConfigError(
            f"search.head_vocabs must be <= the target's vocabulary ({target.vocab_size}), got {s.head_vocabs}"
        )


def enumerate_space(target, s: SearchConfig) -> list[Architecture]:
    """Every valid point of the space within the parameter budget, smallest first; ``ConfigError`` when none."""
    _check_lists(s, target)
    head_dim = head_dim_of(target)
    shapes = [
        shape_at(layers, hidden, groups, ratio, k, init, head_dim)
        for layers, hidden, groups, ratio, k, init in itertools.product(
            s.layers, s.hidden_sizes, s.gqa_groups, s.intermediate_ratios, s.head_vocabs, s.inits
        )
    ]
    shapes += [
        DraftConfig(
            num_layers=len(layers),
            hidden_size=target.hidden_size,
            num_heads=target.num_attention_heads,
            num_kv_heads=getattr(target, "num_key_value_heads", None) or target.num_attention_heads,
            intermediate_size=target.intermediate_size,
            head_vocab=int(k),
            init="layers",
            init_layers=[int(i) for i in layers],
        )
        for layers, k in itertools.product(s.target_layers, s.head_vocabs)
    ]
    points: list[Architecture] = []
    for shape in filter(None, shapes):
        counts = count_params(derive_draft_config(target, shape))
        if s.min_params <= (counts.total if s.budget_kind == "total" else counts.non_embedding) <= s.params_budget:
            points.append(Architecture.of(shape, counts.total, counts.non_embedding))
    if not points:
        raise ConfigError(
            f"the search space is empty: no shape of search.layers x hidden_sizes x gqa_groups x intermediate_ratios "
            f"x head_vocabs (heads = hidden / {head_dim}) has {s.budget_kind} parameters in "
            f"[{s.min_params:.3g}, {s.params_budget:.3g}]; raise search.params_budget or add smaller widths"
        )
    unique = {p.name: p for p in points}
    return sorted(unique.values(), key=lambda p: (p.params, p.name))


def sample_points(points: list[Architecture], n: int, seed: int) -> list[Architecture]:
    """``n`` distinct points (all of them when ``n`` >= the space), seeded, spread over depth: points are drawn
    round-robin over the depths present so a small search still sees shallow and deep shapes."""
    import random

    if n >= len(points):
        return list(points)
    rng = random.Random(seed)
    by_depth: dict[int, list[Architecture]] = {}
    for p in points:
        by_depth.setdefault(p.num_layers, []).append(p)
    for group in by_depth.values():
        rng.shuffle(group)
    chosen: list[Architecture] = []
    depths = sorted(by_depth)
    while len(chosen) < n:
        for d in depths:
            if by_depth[d] and len(chosen) < n:
                chosen.append(by_depth[d].pop())
    return chosen
