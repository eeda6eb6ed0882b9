"""Target-derived initialisation of a draft (``draft.init``), instead of random weights.

* ``pca``: the draft's input embedding is the target's embedding matrix projected onto its top
  ``draft.hidden_size`` principal directions (exact PCA: eigenvectors of the embedding covariance). The output
  head (full, or the trimmed head's kept rows) is the target's output embedding projected onto the SAME basis,
  so ``draft hidden state ~ target hidden state @ basis`` is a consistent reading of both. Centering the head
  rows shifts every logit of a position by the same amount: softmax-invariant. The decoder layers and the final
  norm stay random (their scale is the config's ``initializer_range``; embeddings keep the target's scale).
* ``layers``: the draft has the target's widths (hidden, heads, KV heads, MLP) and ``len(init_layers)`` (or
  ``num_layers``) decoder layers copied from the target (default: evenly spaced, first and last included), plus
  the target's input embedding, final norm and output head (the trimmed head takes its kept rows).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from transformers import PretrainedConfig, PreTrainedModel

from fastdraft_ray.config import DraftConfig
from fastdraft_ray.models.trimmed_head import trimmed_head

log = logging.getLogger(__name__)
INIT_METHODS = ("random", "pca", "layers")


def check_init_method(method: str) -> None:
    """Raise ``ValueError`` for an unknown ``draft.init``."""
    if method not in INIT_METHODS:
        raise ValueError(f"draft.init must be one of {', '.join(INIT_METHODS)}, got {method!r}")


def pca_basis(matrix: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean [H], basis [H, dim])``: the row mean and the top-``dim`` principal directions (orthonormal
    columns, largest variance first, sign fixed so each column's largest-magnitude entry is positive)."""
    rows, width = matrix.shape
    if not 0 < dim <= width:
        raise ValueError(
            f"PCA can project {width}-wide embeddings to at most {width} dimensions, not {dim}: "
            "draft.init=pca needs draft.hidden_size <= the target's hidden size"
        )
    x = matrix.detach().double()
    mean = x.mean(0)
    centered = x - mean
    eigvals, eigvecs = torch.linalg.eigh(centered.T @ centered / max(rows - 1, 1))
    basis = eigvecs[:, eigvals.argsort(descending=True)[:dim]]
    signs = basis.gather(0, basis.abs().argmax(0, keepdim=True)).sign()
    return mean.float(), (basis * signs).float()


def select_layers(n_target: int, n_draft: int, explicit: list[int] | None = None) -> list[int]:
    """Target layer indices the draft copies: ``explicit`` (validated) or ``n_draft`` evenly spaced ones
    including the first and the last layer."""
    if explicit:
        bad = [i for i in explicit if not isinstance(i, int) or not 0 <= i < n_target]
        if bad:
            raise ValueError(f"draft.init_layers {bad} are not layer indices of a {n_target}-layer target")
        return list(explicit)
    if not 0 < n_draft <= n_target:
        raise ValueError(f"cannot copy {n_draft} layers from a {n_target}-layer target")
    if n_draft == 1:
        return [0]
    return [round(i * (n_target - 1) / (n_draft - 1)) for i in range(n_draft)]


def layers_shape(target: PretrainedConfig, shape: DraftConfig) -> DraftConfig:
    """``shape`` with the target's widths and ``len(shape.init_layers)`` layers (when given), as ``layers``
    initialisation needs: copied layers only fit a draft exactly as wide as the target."""
    head_dim = getattr(target, "head_dim", None) or target.hidden_size // target.num_attention_heads
    if head_dim * target.num_attention_heads != target.hidden_size:
        raise ValueError("draft.init=layers needs a target with hidden_size = num_heads x head_dim")
    layers = len(shape.init_layers) if shape.init_layers else shape.num_layers
    select_layers(target.num_hidden_layers, layers, shape.init_layers or None)  # validate early
    return dataclasses.replace(
        shape,
        num_layers=layers,
        hidden_size=target.hidden_size,
        num_heads=target.num_attention_heads,
        num_kv_heads=getattr(target, "num_key_value_heads", None) or target.num_attention_heads,
        intermediate_size=target.intermediate_size,
        params_budget=None,
    )


def _decoder(model: PreTrainedModel):
    base = getattr(model, model.base_model_prefix, None)
    if base is None or not hasattr(base, "layers") or not hasattr(base, "norm"):
        raise ValueError(
            f"{type(model).__name__} has no <base>.layers / <base>.norm: draft.init=layers supports Llama-like "
            "families only"
        )
    return base


@torch.no_grad()
def _set_head(draft: PreTrainedModel, target_head: torch.Tensor) -> str:
    """Write a [vocab, hidden] head matrix into the draft's head (kept rows for a trimmed head)."""
    head = trimmed_head(draft)
    if head is not None:
        head.linear.weight.copy_(target_head[head.kept_ids.to(target_head.device)].to(head.linear.weight))
        return f"trimmed head ({head.head_vocab} kept rows)"
    if draft.config.tie_word_embeddings:
        return "head tied to the input embedding"
    draft.get_output_embeddings().weight.copy_(target_head.to(draft.get_output_embeddings().weight))
    return "full head"


@torch.no_grad()
def init_from_target(
    draft: PreTrainedModel, target: PreTrainedModel, method: str, layers: list[int] | None = None
) -> dict:
    """Overwrite ``draft``'s weights from ``target`` by ``method`` (see the module docstring); returns a
    short record of what was copied (``{"method", "layers"?, "explained_variance"?, "head"}``)."""
    check_init_method(method)
    if method == "random":
        return {"method": method}
    t_in = target.get_input_embeddings().weight.detach().float()
    t_out = target.get_output_embeddings().weight.detach().float()
    if t_in.shape[0] != draft.get_input_embeddings().weight.shape[0]:
        raise ValueError("draft and target vocabulary sizes differ: derive the draft from this target")
    d_in = draft.get_input_embeddings().weight
    record: dict = {"method": method}
    if method == "pca":
        mean, basis = pca_basis(t_in, d_in.shape[1])
        d_in.copy_(((t_in - mean) @ basis).to(d_in))
        head = t_in if target.config.tie_word_embeddings else t_out
        record["head"] = _set_head(draft, (head - head.mean(0)) @ basis)
        var = (t_in - mean).pow(2).sum()
        record["explained_variance"] = round(float(((t_in - mean) @ basis).pow(2).sum() / var), 4)
        return record
    if d_in.shape[1] != t_in.shape[1]:
        raise ValueError(
            f"draft.init=layers needs a draft as wide as the target (hidden {t_in.shape[1]}), got {d_in.shape[1]}"
        )
    t_dec, d_dec = _decoder(target), _decoder(draft)
    chosen = select_layers(len(t_dec.layers), len(d_dec.layers), layers)
    if len(chosen) != len(d_dec.layers):
        raise ValueError(f"draft has {len(d_dec.layers)} layers but draft.init_layers names {len(chosen)}")
    d_in.copy_(t_in.to(d_in))
    for j, i in enumerate(chosen):
        d_dec.layers[j].load_state_dict(t_dec.layers[i].state_dict())
    d_dec.norm.load_state_dict(t_dec.norm.state_dict())
    record.update(layers=chosen, head=_set_head(draft, t_out))
    return record
