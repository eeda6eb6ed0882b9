"""Token-weighted mixtures: per-source token quotas from weights and a budget, a reading order that
interleaves sources in proportion, and the per-source accounting that enforces the quotas exactly.

Each source ``i`` gets ``quota_i = budget * w_i / sum(w)`` tokens (EOS separators included; train + val).
Documents are taken whole until the quota would overflow; the last one is cut so the quota is met exactly.
Within a source, a document goes to the validation split when it fits under ``val_fraction`` of the tokens
taken so far, so both splits carry the same mixture.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


class MixtureError(ValueError):
    """Weights that do not match the sources, or a budget that cannot be met."""


def quotas(names: list[str], weights: dict, budget: int) -> dict[str, int]:
    """Integer token quotas summing to ``budget`` (largest remainder). Empty ``weights`` = equal weights."""
    if budget <= 0:
        raise MixtureError(f"token budget must be positive, got {budget}")
    if not names:
        raise MixtureError("no sources given")
    if weights:
        missing = [n for n in names if n not in weights]
        extra = [n for n in weights if n not in names]
        if missing or extra:
            raise MixtureError(
                f"weights must name exactly the sources {names}: missing {missing}, unknown {extra}"
            )
        bad = {n: w for n, w in weights.items() if not isinstance(w, (int, float)) or w < 0}
        if bad or not sum(weights.values()) > 0:
            raise MixtureError(f"weights must be non-negative numbers with a positive sum, got {weights}")
    w = {n: float(weights[n]) if weights else 1.0 for n in names}
    total = sum(w.values())
    exact = {n: budget * w[n] / total for n in names}
    out = {n: int(exact[n]) for n in names}
    for n in sorted(names, key=lambda n: out[n] - exact[n])[: budget - sum(out.values())]:
        out[n] += 1
    return out


def interleave(units: dict[str, list[dict]], quota: dict[str, int]) -> list[tuple[str, dict]]:
    """One reading order over all sources' units: each unit is placed at its source's virtual time
    ``bytes read before it / quota``, so sources are consumed at the rate their quotas ask for."""
    keyed = []
    for s, (name, source_units) in enumerate(units.items()):
        if quota[name] <= 0:
            continue
        done = 0
        for i, unit in enumerate(source_units):
            keyed.append((done / quota[name], s, i, name, unit))
            done += max(1, unit.get("est_bytes") or 1)
    return [(name, unit) for *_, name, unit in sorted(keyed, key=lambda k: k[:3])]


@dataclass
class SourceTally:
    """What one source contributed so far; decides truncation and the train/val route of each document."""

    name: str
    spec: str
    weight: float
    quota: int
    val_fraction: float
    tokens: dict = field(default_factory=lambda: {"train": 0, "val": 0})
    documents: dict = field(default_factory=lambda: {"train": 0, "val": 0})
    dropped: dict = field(default_factory=lambda: {"reserved_for_eval": 0, "duplicate": 0, "empty": 0})
    replaced_bytes: int = 0
    truncated_documents: int = 0
    seen_documents: int = 0

    @property
    def taken(self) -> int:
        return self.tokens["train"] + self.tokens["val"]

    @property
    def full(self) -> bool:
        return self.taken >= self.quota

    def take(self, n_tokens: int) -> tuple[int, str]:
        """Admit a document of ``n_tokens`` (EOS included): ``(tokens to keep, split)``."""
        keep = min(n_tokens, self.quota - self.taken)
        if keep < n_tokens:
            self.truncated_documents += 1
        total = self.taken + keep
        split = "val" if self.tokens["val"] + keep <= self.val_fraction * total else "train"
        self.tokens[split] += keep
        self.documents[split] += 1
        return keep, split

    def to_dict(self) -> dict:
        return asdict(self)


def achieved(tallies: list[SourceTally], split_tokens: dict[str, dict[str, int]]) -> list[dict]:
    """Manifest ``sources`` entries: asked vs achieved proportions per split (tokens actually in rows)."""
    total_w = sum(t.weight for t in tallies) or 1.0
    out = []
    for t in tallies:
        entry = t.to_dict()
        entry["requested_proportion"] = t.weight / total_w
        entry["tokens_in_rows"] = {s: split_tokens[s].get(t.name, 0) for s in split_tokens}
        entry["proportion"] = {
            s: (split_tokens[s].get(t.name, 0) / max(1, sum(split_tokens[s].values()))) for s in split_tokens
        }
        entry["exhausted"] = t.taken < t.quota
        out.append(entry)
    return out
