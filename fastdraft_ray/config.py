"""Typed configuration for every stage: dataclasses, YAML presets and ``key.sub=value`` overrides.

Every field carries a one-line ``doc`` in its metadata; ``describe()`` prints them. Loading is strict:
an unknown key or a value of the wrong type raises ``ConfigError`` naming the valid keys.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml

from fastdraft_ray.stage_graph import SPEED_ONLY, TRAINING, StageError, expand

RECIPES_DIR = Path(__file__).parent / "recipes"


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message says what is valid."""


NOT_A_URL = (
    "must be a filesystem path every node sees, not a URL: the run directory is written through the filesystem "
    "(checkpoints, records, resumable units). For object storage, mount the bucket on every node (Mountpoint for "
    "S3, gcsfuse; on KubeRay a CSI volume) and give the mount path. Data sources may be s3:// or gs:// URLs "
    "(read through fsspec: pip install 'fastdraft-ray[cloud]')."
)


def doc(default: Any, text: str) -> Any:
    """A dataclass field with a default and a one-line description."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


class Section:
    """Base of every config section: it checks itself when built (``__post_init__``), its choice fields first and
    then ``validate()``, so a recipe, a command-line override, ``dataclasses.replace`` and a section built in code
    all meet the same checks at load time (``--dry-run`` included) instead of minutes into a run."""

    prefix: ClassVar[str] = ""  # how messages name this section's keys, e.g. "train."

    def __post_init__(self) -> None:
        check_choices(self, self.prefix)
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` for a value out of its range or a combination that cannot run."""

    def need(self, ok: bool, key: str, rule: str) -> None:
        """``ConfigError("<prefix><key>=<value>: <rule>")`` unless ``ok``."""
        if not ok:
            raise ConfigError(f"{self.prefix}{key}={getattr(self, key)!r}: {rule}")

    def positive(self, *keys: str, minimum: float = 1) -> None:
        """Each of ``keys`` must be at least ``minimum``."""
        for key in keys:
            self.need(getattr(self, key) >= minimum, key, f"must be >= {minimum:g}")


def _numbers(values: Any, minimum: float = 0) -> bool:
    return isinstance(values, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v >= minimum for v in values
    )


@dataclass
class ModelConfig(Section):
    """The target model whose draft we train."""

    prefix = "model."

    target: str = doc(
        "embedded:smollm2-135m-instruct", "Target: hub id, local HF folder, .gguf file, or embedded:<name>."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = doc(
        "float32", "Precision the target is loaded in: float32, bfloat16 or float16."
    )
    trust_remote_code: bool = doc(False, "Allow custom modelling code shipped with a hub model.")

    def validate(self) -> None:
        self.need(
            bool(self.target.strip()), "target", "name a hub id, a local folder, a .gguf file or embedded:<name>"
        )


@dataclass
class DraftConfig(Section):
    """Shape of the draft derived from the target (same family, vocabulary, special tokens and rope)."""

    prefix = "draft."

    num_layers: int = doc(4, "Transformer blocks in the draft.")
    hidden_size: int = doc(256, "Hidden width of the draft.")
    num_heads: int = doc(4, "Attention heads.")
    num_kv_heads: int = doc(2, "Key/value heads (grouped-query attention); must divide num_heads.")
    intermediate_size: int = doc(768, "MLP inner width.")
    params_budget: float | None = doc(None, "If set, ignore the widths above and pick them for this many params.")
    tie_word_embeddings: bool | None = doc(
        None, "Tie input embedding and LM head; None copies the target's setting."
    )
    init_from: str | None = doc(None, "Initialise from this HF draft folder instead of random weights.")
    head_vocab: int = doc(
        0, "Output head covers only the K most frequent training tokens + all special tokens; 0 = full vocabulary."
    )
    head_vocab_from: str = doc(
        "",
        "Count token frequencies for head_vocab in these shard/KD folders (comma-separated; relative = inside "
        "the run directory, e.g. data/pt,data/cp); empty = the stage's training shards.",
    )
    init: Literal["random", "pca", "layers"] = doc(
        "random",
        "random | pca (target embeddings projected to the draft width) | layers (copy target layers; target widths)",
    )
    init_layers: list = doc([], "init=layers: target layer indices to copy; empty = num_layers evenly spaced.")

    def validate(self) -> None:
        self.need(self.params_budget is None or self.params_budget > 0, "params_budget", "must be > 0 (or null)")
        self.need(self.head_vocab >= 0, "head_vocab", "must be >= 0 (0 = the full vocabulary)")
        self.need(_numbers(self.init_layers) and all(isinstance(i, int) for i in self.init_layers),
                  "init_layers", "must list target layer indices (integers >= 0)")  # fmt: skip
        if self.params_budget is None and self.init != "layers":  # widths as given (not picked, not the target's)
            self.positive("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size")
            self.need(
                self.num_heads % self.num_kv_heads == 0, "num_kv_heads", f"must divide num_heads={self.num_heads}"
            )
            self.need(
                self.hidden_size % self.num_heads == 0,
                "hidden_size",
                f"must be divisible by num_heads={self.num_heads}",
            )


@dataclass
class DataConfig(Section):
    """Corpora, mixtures and packing."""

    prefix = "data."

    sources: dict = doc(
        {"text": "embedded:text"}, "Named sources: name -> spec (hub:<id>, file glob, embedded:<name>)."
    )
    weights: dict = doc({}, "Mixture weights by tokens, e.g. {code: 2, text: 1}; empty = equal weights.")
    token_budget: int = doc(2_000_000, "Total tokens to prepare across sources.")
    seq_len: int = doc(512, "Packed sequence length (rows hold seq_len+1 ids).")
    val_fraction: float = doc(0.01, "Fraction of documents held out for validation.")
    rows_per_shard: int = doc(2048, "Packed rows per parquet shard.")
    num_tokenizer_actors: int = doc(2, "Actors in the tokenizer pool.")
    seed: int = doc(0, "Seed for shuffles and splits.")
    name: str = doc("main", "Name of the prepared set: shards go to <run_dir>/data/<name> unless output is set.")
    output: str = doc("", "Shard folder (a path every node sees: local, NFS); empty = <run_dir>/data/<name>.")
    dedup: bool = doc(True, "Drop exact duplicate documents (same text) across all sources.")
    tokenize_batch_size: int = doc(64, "Documents per tokenizer call in the actor pool.")
    tokenizer_actor_cpus: float = doc(1.0, "CPUs reserved per tokenizer actor (lowered to fit small clusters).")
    max_buffer_mb: int = doc(256, "Object-store MB the prepare pipeline may run ahead of the packer.")

    def validate(self) -> None:
        self.need(bool(self.sources) and all(isinstance(v, str) and v for v in self.sources.values()),
                  "sources", "must name at least one source: {name: spec}")  # fmt: skip
        unknown = sorted(set(self.weights) - set(self.sources))
        self.need(not unknown, "weights", f"names {unknown}, which are not sources ({', '.join(self.sources)})")
        self.need(_numbers(list(self.weights.values())) and (not self.weights or sum(self.weights.values()) > 0),
                  "weights", "must be non-negative numbers with a positive sum")  # fmt: skip
        self.positive("token_budget", "seq_len", "rows_per_shard", "num_tokenizer_actors", "tokenize_batch_size")
        self.positive("max_buffer_mb")
        self.need(0 <= self.val_fraction < 1, "val_fraction", "must be in [0, 1)")
        self.need(self.tokenizer_actor_cpus > 0, "tokenizer_actor_cpus", "must be > 0")
        self.need("://" not in self.output, "output", NOT_A_URL)


@dataclass
class TrainConfig(Section):
    """Ray Train + DeepSpeed training of the draft."""

    prefix = "train."

    stage: Literal[TRAINING] = doc(
        "pt", "Stage: pt (pre-train), cp (continued pre-train) or ft (distillation fine-tune)."
    )
    num_workers: int = doc(2, "Ray Train workers.")
    use_gpu: bool = doc(False, "Place one worker per GPU.")
    cpus_per_worker: int = doc(1, "CPU cores (and torch threads) per worker.")
    zero_stage: int = doc(2, "DeepSpeed ZeRO stage 0-3.")
    precision: Literal["fp32", "bf16", "fp16"] = doc("fp32", "fp32 or bf16 (fp16 needs a GPU).")
    offload_optimizer: bool = doc(False, "Offload optimizer state to CPU memory (ZeRO 2/3).")
    micro_batch_size: int = doc(8, "Sequences per worker per micro-step.")
    grad_accum_steps: int = doc(1, "Micro-steps per optimizer step.")
    lr: float = doc(1e-3, "Peak learning rate (AdamW).")
    min_lr_ratio: float = doc(0.1, "Final LR as a fraction of the peak (cosine schedule).")
    warmup_steps: int = doc(50, "Linear warm-up steps.")
    weight_decay: float = doc(0.1, "AdamW weight decay.")
    grad_clip: float = doc(1.0, "Gradient-norm clipping.")
    token_budget: int = doc(1_000_000, "Tokens to train on (across workers).")
    eval_every: int = doc(100, "Optimizer steps between validation losses.")
    checkpoint_every: int = doc(100, "Optimizer steps between checkpoints.")
    max_failures: int = doc(3, "Worker-group restarts allowed before the run fails.")
    watchdog_s: float = doc(
        1800.0,
        "A worker that makes no progress (no step, no phase change) for this long fails with a message naming "
        "what it waited for (a C++ op build, data, a peer); 0 = no watchdog.",
    )
    seed: int = doc(0, "Seed for initialisation and data order.")
    log_every: int = doc(10, "Optimizer steps between TensorBoard train scalars (rank 0 only).")
    val_rows: int = doc(256, "Validation rows (first rows of the val split) scored at each validation.")
    checkpoints_to_keep: int = doc(2, "Most recent checkpoints kept on storage.")
    worker_resources: dict = doc(
        {}, "Extra Ray resources per worker, e.g. {trainer: 1} to pin workers to a node type."
    )
    audit_dir: str = doc(
        "",
        "Folder (every node sees) for a per-rank JSON-lines audit: the ids of the rows each step trained, loss, "
        "node; '' = off.",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = doc(
        "PACK",
        "Where Ray places the workers: PACK fills a node first (fast NCCL), SPREAD/STRICT_SPREAD one per node.",
    )
    kd_loss: Literal["ce", "kl", "tvd", "ce_kl", "ce_tvd"] = doc(
        "ce", "FT loss: ce (sequence-level KD), kl, tvd, ce_kl, ce_tvd (sparse top-k token-level KD)."
    )
    kd_alpha: float = doc(0.5, "FT: weight of CE in ce_kl / ce_tvd (alpha*CE + (1-alpha)*KL|TVD).")
    ft_responses: Literal["target", "original"] = doc(
        "target", "FT data: target (KD data from jobs/generate.py) or original (the datasets' own responses)."
    )
    teacher: Literal["none", "online"] = doc(
        "none",
        "online: the frozen target scores every batch in each worker and the loss is train.kd_loss against its "
        "distribution over the draft's head (PT, CP, FT); none: the data's tokens (or FT's stored top-k).",
    )
    teacher_topk: int = doc(0, "train.teacher=online: keep the target's top-k over the draft's head (0 = all).")
    freeze_embeddings: bool = doc(
        False,
        "Keep the draft's input embedding fixed (e.g. draft.init=pca): no gradient, optimizer state or all-reduce "
        "for it; a head tied to it stays fixed too.",
    )
    proxy_every: int = doc(
        25, "Optimizer steps between training-proxy scores (train/proxy_acceptance, proxy_top1); 0 = off."
    )
    proxy_prompts_per_task: int = doc(4, "Training proxy: held-out prompts per task family (after the evaluated).")
    proxy_tokens: int = doc(48, "Training proxy: target-written (greedy) tokens per prompt.")
    proxy_topk: int = doc(32, "Training proxy: target log-probs kept per position (top-k).")
    proxy_temperature: float = doc(0.6, "Training proxy: temperature of proxy_acceptance (the paper's T = 0.6).")

    def validate(self) -> None:
        self.positive("num_workers", "cpus_per_worker", "micro_batch_size", "grad_accum_steps", "token_budget")
        self.positive("eval_every", "checkpoint_every", "log_every", "checkpoints_to_keep")
        self.positive("warmup_steps", "val_rows", "teacher_topk", "proxy_every", "watchdog_s", minimum=0)
        self.need(self.zero_stage in (0, 1, 2, 3), "zero_stage", "must be 0, 1, 2 or 3")
        self.need(self.precision != "fp16", "precision", "fp16 needs loss scaling; use bf16 (or fp32)")
        self.need(not self.offload_optimizer or self.zero_stage >= 1, "offload_optimizer", "needs zero_stage 1-3")
        self.need(self.lr > 0, "lr", "must be > 0")
        self.need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        self.need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        self.need(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 = no clipping)")
        self.need(self.max_failures >= -1, "max_failures", "must be >= 0 (-1 = retry forever)")
        self.need(0 <= self.kd_alpha <= 1, "kd_alpha", "must be in [0, 1]")
        self.need(self.teacher != "online" or self.kd_loss != "ce", "kd_loss",
                  "train.teacher=online needs kd_loss = kl, tvd, ce_kl or ce_tvd (ce ignores the teacher)")  # fmt: skip
        if self.proxy_every:
            self.positive("proxy_prompts_per_task", "proxy_tokens", "proxy_topk")
            self.need(self.proxy_temperature > 0, "proxy_temperature", "must be > 0")


@dataclass
class GenerateConfig(Section):
    """Target-generated distillation data (jobs/generate.py) -> ``<run_dir>/kd``."""

    prefix = "generate."

    prompt_sources: dict = doc(
        {"alpaca": "embedded:alpaca", "sharegpt": "embedded:sharegpt"},
        "Instruction sources: name -> spec (embedded:alpaca|sharegpt, alpaca:<json file>, hub:<id>, chat specs).",
    )
    num_prompts: int = doc(500, "Prompts to answer (from the sources, evaluation-reserved ones excluded).")
    temperatures: list = doc([0.6, 0.8, 1.0, 0.0], "Sampling temperatures; 0.0 means greedy.")
    magpie_prompts: int = doc(0, "Extra instructions the target writes itself (Magpie), answered like the rest.")
    magpie_temperature: float = doc(1.0, "Temperature at which the target writes Magpie instructions.")
    magpie_max_tokens: int = doc(96, "Length cap of a Magpie instruction.")
    max_new_tokens: int = doc(256, "Response length cap.")
    max_prompt_tokens: int = doc(384, "Prompts longer than this (chat template included) are dropped.")
    min_prompt_chars: int = doc(8, "Instructions shorter than this are dropped.")
    batch_size: int = doc(16, "Prompts per generation batch (left-padded, one KV-cached generate call).")
    shard_prompts: int = doc(64, "Prompts per output file: the unit of work and of resume.")
    topk_logprobs: int = doc(0, "Keep the target's top-k log-probs per response token (0 = off).")
    top_p: float = doc(1.0, "Nucleus threshold when sampling (1.0 = the target's full distribution).")
    backend: Literal["hf", "vllm"] = doc(
        "hf", "hf (batched transformers, CPU or GPU) or vllm (ray.data.llm; gpu extra + GPUs)."
    )
    num_actors: int = doc(1, "Generator actors (one target copy each).")
    cpus_per_actor: int = doc(1, "CPU cores (and torch threads) per generator actor.")
    use_gpu: bool = doc(False, "One GPU per generator actor.")
    seed: int = doc(0, "Seed for prompt selection and sampling.")
    output: str = doc("", "KD data folder (a filesystem path every node sees, e.g. NFS); empty = <run_dir>/kd.")
    onpolicy_fraction: float = doc(
        0.0, "On-policy share (DistillSpec): prompts answered by the draft and scored by the target."
    )
    onpolicy_draft: str = doc(
        "", "Draft that writes the on-policy responses; empty = the draft FT starts from (its upstream export)."
    )

    def validate(self) -> None:
        self.need(_numbers(self.temperatures) and bool(self.temperatures), "temperatures",
                  "must list temperatures >= 0 (0.0 = greedy)")  # fmt: skip
        self.positive("num_prompts", "magpie_prompts", "min_prompt_chars", "topk_logprobs", minimum=0)
        self.positive("magpie_max_tokens", "max_new_tokens", "max_prompt_tokens", "batch_size", "shard_prompts")
        self.positive("num_actors", "cpus_per_actor")
        self.need(self.num_prompts + self.magpie_prompts > 0, "num_prompts", "and magpie_prompts are both 0")
        self.need(not self.num_prompts or bool(self.prompt_sources), "prompt_sources", "is empty")
        self.need(self.magpie_temperature > 0, "magpie_temperature", "must be > 0")
        self.need(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        self.need("://" not in self.output, "output", NOT_A_URL)
        self.need(0 <= self.onpolicy_fraction <= 1, "onpolicy_fraction", "must be in [0, 1]")
        self.need(self.backend != "vllm" or not self.onpolicy_fraction, "onpolicy_fraction",
                  "on-policy rows are written by backend=hf only")  # fmt: skip
        self.need(self.backend != "vllm" or not self.topk_logprobs, "topk_logprobs",
                  "the target's top-k log-probs are written by backend=hf only (set 0 with backend=vllm)")  # fmt: skip


PRECISION_CHOICES = Literal["", "fp32", "bf16", "fp16", "int8"]


@dataclass
class DecodeConfig(Section):
    """How the target+draft pair decodes (``specdec.engine.SpecDecoder``): precision, gamma policy, sampling and
    stopping. The one settings section evaluation, benchmarks, the search and the server read; ``evaluate`` and
    ``serve`` extend it, so ``evaluate.gamma`` and ``serve.gamma`` are the same field of the same type."""

    gamma: int = doc(3, "Draft tokens proposed per step (paper protocol: 3).")
    temperature: float = doc(0.6, "Sampling temperature (paper protocol: 0.6); greedy is always run too.")
    top_p: float = doc(1.0, "Nucleus sampling threshold.")
    stop_at_eos: bool = doc(
        True, "Stop a generation at the target's stop tokens (models.prompting.stop_token_ids)."
    )
    precision: PRECISION_CHOICES = doc(
        "", "Target AND draft precision: fp32 | bf16 | fp16 | int8 (dynamic int8 Linear, CPU); '' = model.dtype."
    )
    draft_precision: PRECISION_CHOICES = doc("", "Draft precision if different from precision ('' = the same).")
    linear_kernel: Literal["auto", "torch"] = doc(
        "auto",
        "fp32 on CPU: auto = decode/verify steps (<= 8 rows) on the batch-invariant small-batch kernel "
        "(specdec/kernels.py, AVX2; torch's linear where unavailable); torch = torch's linear everywhere.",
    )
    gamma_policy: Literal["constant", "confidence", "heuristic", "cost"] = doc(
        "constant", "Draft length per step: constant | confidence | heuristic | cost (specdec/policy.py)."
    )
    confidence_threshold: float = doc(0.4, "confidence policy: stop drafting when the draft's token prob < this.")
    max_gamma: int = doc(8, "heuristic/cost policies: most draft tokens per step.")
    prior_alpha: float = doc(
        -1.0,
        "cost policy: the drafts' known per-token acceptance (the alpha_per_token an earlier evaluation measured); "
        "< 0 = unknown (optimistic prior).",
    )
    proposer: Literal["draft", "ngram", "draft+ngram"] = doc(
        "draft",
        "Who proposes: draft | ngram (prompt lookup, no draft) | draft+ngram (the tokens that followed an earlier "
        "occurrence of the context's suffix when there is one, else the draft). Lossless either way.",
    )
    ngram_max: int = doc(3, "ngram proposers: longest context suffix looked up.")
    ngram_tokens: int = doc(3, "ngram proposers: most tokens proposed from a match.")

    prefix = "decode."

    def validate(self) -> None:
        self.positive("gamma", "max_gamma", "ngram_max", "ngram_tokens")
        self.need(self.temperature >= 0, "temperature", "must be >= 0 (0 = greedy)")
        self.need(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        self.need(0 <= self.confidence_threshold < 1, "confidence_threshold", "must be in [0, 1)")
        self.need(self.prior_alpha <= 1, "prior_alpha", "must be in [0, 1] (or < 0: unknown)")


MODES = ("sampling", "greedy")  # decoding modes of an evaluation
BASELINES = ("prompt_lookup", "assisted")  # evaluate.baselines: transformers' own speculative paths


@dataclass
class EvaluateConfig(DecodeConfig):
    """Speculative-decoding evaluation of drafts against the target (decoding keys: ``DecodeConfig``)."""

    prefix = "evaluate."

    drafts: list = doc([], "Draft HF folders to evaluate.")
    tasks: list = doc(["summarization", "story", "instruction", "code"], "Task families.")
    prompts_per_task: int = doc(8, "Prompts per task family.")
    max_new_tokens: int = doc(64, "Tokens generated per prompt.")
    num_workers: int = doc(1, "Ray workers prompts are spread over (1 = run in this process, exact).")
    seed: int = doc(0, "Seed for prompt selection and sampling.")
    modes: list = doc(["sampling", "greedy"], "Decoding modes: sampling (at temperature/top_p) and/or greedy.")
    source: Literal["offline", "hub"] = doc(
        "offline", "Prompt source: offline (embedded stand-ins) or hub (CNN/DM, TinyStories, Dolly, HumanEval)."
    )
    max_article_tokens: int = doc(384, "Summarisation articles are truncated to this many tokens.")
    code_chat: bool = doc(False, "Wrap code prompts in the chat template (default: raw HumanEval completion).")
    cpus_per_worker: int = doc(0, "CPU cores (and torch threads) per worker; 0 = all cores / num_workers.")
    use_gpu: bool = doc(False, "Run each worker on one GPU.")
    gamma_select: list = doc(
        [],
        "Gammas to choose from per draft and mode on calibration prompts (held out, disjoint from the reported "
        "ones): the one of the highest expected speedup is also reported, its rows flagged selected; [] = gamma only.",
    )
    calibration_prompts_per_task: int = doc(2, "Calibration prompts per task family for gamma_select.")
    baselines: list = doc(
        [],
        "What a user would try instead, greedy, on the same prompts: prompt_lookup (transformers' prompt lookup "
        "decoding, no draft) and/or assisted (transformers' assisted generation with each draft), gamma tokens.",
    )
    endpoint: str = doc(
        "",
        "Evaluate through a running server (jobs/serve.py) at this URL instead of loading the models here: "
        "token ids and per-prompt seeds go over HTTP (API key: $FASTDRAFT_API_KEY); '' = in this process.",
    )

    def validate(self) -> None:
        super().validate()
        self.need(bool(self.modes) and set(self.modes) <= set(MODES), "modes", f"choose from {', '.join(MODES)}")
        self.need("sampling" not in self.modes or self.temperature > 0, "temperature",
                  "sampling mode needs evaluate.temperature > 0 (greedy is its own mode)")  # fmt: skip
        self.positive("num_workers", "max_new_tokens", "prompts_per_task", "max_article_tokens")
        self.positive("cpus_per_worker", "calibration_prompts_per_task", minimum=0)
        self.need(bool(self.tasks), "tasks", "is empty")
        self.need(_numbers(self.gamma_select, 1) and all(isinstance(g, int) for g in self.gamma_select),
                  "gamma_select", "must list gammas >= 1")  # fmt: skip
        unknown = sorted(set(self.baselines) - set(BASELINES))
        self.need(not unknown, "baselines", f"unknown {unknown}; choose from {', '.join(BASELINES)}")
        self.need(not self.baselines or ("greedy" in self.modes and not self.endpoint), "baselines",
                  "run in-process on the greedy mode: needs 'greedy' in evaluate.modes and no evaluate.endpoint")  # fmt: skip
        self.need(not (self.gamma_select and self.endpoint), "gamma_select",
                  "prices gammas with latencies measured in-process; with evaluate.endpoint set it to [] and name "
                  "the gamma (evaluate.gamma)")  # fmt: skip
        self.need(not self.gamma_select or self.calibration_prompts_per_task >= 1, "calibration_prompts_per_task",
                  "evaluate.gamma_select needs at least 1 calibration prompt per task")  # fmt: skip
        self.need(not (self.use_gpu and "int8" in (self.precision, self.draft_precision)), "precision",
                  "int8 (dynamic quantisation) runs on CPU only: use bf16 with use_gpu")  # fmt: skip


# What every search trial reports (search/objective.py): the keys search.metric and search.objectives may name.
SEARCH_TRAIN_KEYS = (
    "step",
    "train/loss",
    "val/loss",
    "train/proxy_acceptance",
    "train/proxy_top1",
    "train/predicted_speedup",
    "train/predicted_speedup_greedy",
    "train/predicted_gamma",
)
SEARCH_FINAL_KEYS = (
    "search/params",
    "search/non_embedding_params",
    "search/draft_step_ms",
    "search/c",
    "search/mbsu",
    "search/train_s",
    "search/measured_speedup",
    "search/measured_alpha_per_token",
    "search/measured_gamma",
)
SEARCH_MEASURED = (
    "speedup",
    "speedup_lo",
    "speedup_hi",
    "prompts",
    "alpha_per_token",
)  # per mode: search/<mode>/<key>


def search_reported_keys(modes: list[str]) -> list[str]:
    """Every metric key a search trial reports (the keys ``search.metric`` and ``search.objectives`` may name)."""
    return [*SEARCH_TRAIN_KEYS, *SEARCH_FINAL_KEYS, *(f"search/{m}/{k}" for m in modes for k in SEARCH_MEASURED)]


@dataclass
class SearchConfig(Section):
    """Ray Tune search over the draft's architecture (``fastdraft_ray.search``, ``jobs/search.py``): each trial
    trains one shape briefly through the training stack and is ranked by the speedup its proxy acceptance and its
    measured latency predict; the winner is written as a recipe."""

    layers: list = doc([1, 2, 3, 4, 6, 8], "Depths to try.")
    hidden_sizes: list = doc(
        [128, 192, 256, 384, 512, 768, 1024], "Widths to try (multiples of the target's head_dim)."
    )
    gqa_groups: list = doc([1, 2], "Query heads per KV head to try (must divide the head count).")
    intermediate_ratios: list = doc([2.0, 3.0], "MLP width / hidden width to try (rounded to a multiple of 64).")
    head_vocabs: list = doc(
        [4096, 8192, 16384, 0], "Output-head vocabularies to try (draft.head_vocab; 0 = full)."
    )
    inits: list = doc(["pca", "random"], "Initialisations to try (random, pca).")
    target_layers: list = doc(
        [], "init=layers sub-space: lists of target layer indices to copy (the target's widths), e.g. [[0, 29]]."
    )
    params_budget: float = doc(30e6, "Largest parameter count of a candidate (see budget_kind).")
    min_params: float = doc(0.0, "Smallest parameter count of a candidate.")
    budget_kind: Literal["total", "non_embedding"] = doc(
        "non_embedding",
        "What params_budget counts: non_embedding (any vocabulary: a 128k-token embedding is ~33M params at width "
        "256) or total.",
    )
    algorithm: Literal["random", "optuna"] = doc(
        "random",
        "random: num_samples distinct points spread over depth; optuna: Optuna TPE over the valid points "
        "(multi-objective when search.objectives is set).",
    )
    num_samples: int = doc(12, "Trials (architectures).")
    include_default: bool = doc(
        True, "The run's own draft shape is one of the trials (a baseline trained with the same budget)."
    )
    seed: int = doc(0, "Seed of the point sampling (and Optuna's sampler).")
    data: str = doc("data/cp", "Shards the trials train on (relative = inside the run directory).")
    token_budget_per_trial: int = doc(200_000, "Training tokens per trial (across its workers).")
    report_every: int = doc(
        10, "Optimizer steps between a trial's reports (proxy + predicted speedup, checkpoint)."
    )
    num_workers: int = doc(1, "Ray Train workers per trial.")
    cpus_per_worker: int = doc(2, "CPU cores (and torch threads) per trial worker.")
    max_concurrent_trials: int = doc(0, "Trials at once; 0 = the cluster's CPUs // one trial's CPUs.")
    scheduler: Literal["asha", "none"] = doc("asha", "asha: stop poor trials early on the metric; none: run all.")
    grace_steps: int = doc(10, "ASHA: optimizer steps every trial gets before it may be stopped.")
    reduction_factor: int = doc(2, "ASHA: the fraction 1/reduction_factor of trials kept at each rung.")
    metric: str = doc(
        "train/predicted_speedup",
        "What trials are ranked and stopped on (a key the trials report, e.g. train/predicted_speedup_greedy).",
    )
    objectives: list = doc(
        [],
        "optuna only: several keys to optimise at once (Pareto), e.g. [train/proxy_acceptance, search/draft_step_ms].",
    )
    threads: int = doc(1, "Torch threads the drafts are priced at (the evaluation's per-worker threads).")
    device_profile: str = doc(
        "", "A saved device profile (profile.json of an earlier search) to price drafts with instead of measuring."
    )
    latency_repeats: int = doc(
        25, "Timed repeats per draft latency measurement, after 2 warm-ups (a 3 ms step varies by +-40%)."
    )
    latency_context: int = doc(128, "Tokens in the KV cache when latencies are measured.")
    eval_prompts_per_task: int = doc(1, "Held-out prompts per family each trial's measured alpha uses.")
    eval_max_new_tokens: int = doc(32, "Tokens generated per prompt in a trial's measurement.")
    eval_modes: list = doc(["sampling"], "Modes of a trial's measurement (sampling and/or greedy).")

    prefix = "search."

    def validate(self) -> None:
        for key in ("layers", "hidden_sizes", "gqa_groups", "intermediate_ratios", "head_vocabs"):
            self.need(_numbers(getattr(self, key)), key, "must be a list of non-negative numbers")
        self.need(bool(self.inits or self.target_layers), "inits", "and search.target_layers are both empty")
        bad = sorted(set(self.inits) - {"random", "pca"})
        self.need(not bad, "inits", "choose from random, pca (target-layer drafts: search.target_layers)")
        self.need(bool(self.eval_modes) and set(self.eval_modes) <= set(MODES), "eval_modes",
                  f"choose from {', '.join(MODES)}")  # fmt: skip
        self.positive("num_samples", "token_budget_per_trial", "report_every", "num_workers", "cpus_per_worker")
        self.positive("grace_steps", "threads", "latency_repeats", "latency_context", "eval_prompts_per_task")
        self.positive("eval_max_new_tokens")
        self.positive("reduction_factor", minimum=2)
        self.positive("max_concurrent_trials", "min_params", minimum=0)
        self.need(
            self.params_budget > self.min_params, "params_budget", f"must exceed min_params={self.min_params}"
        )
        self.need(
            not self.objectives or self.algorithm == "optuna",
            "objectives",
            "several at once need algorithm=optuna",
        )
        known = search_reported_keys(self.eval_modes)
        for key in ("metric", "objectives"):
            wrong = [k for k in ([self.metric] if key == "metric" else self.objectives) if k not in known]
            self.need(not wrong, key, f"{wrong} is not a key any trial reports; choose from {', '.join(known)}")


@dataclass
class ServeConfig(DecodeConfig):
    """Ray Serve deployment of the target+draft pair behind an OpenAI-compatible API (``fastdraft_ray.serve``;
    decoding keys: ``DecodeConfig``; ``temperature``/``top_p`` are the defaults of requests that omit them)."""

    draft: str = doc("", "Draft HF folder to serve ('' = the target alone).")
    speculative: bool = doc(True, "Decode with the draft; false = the target alone (the baseline), same app.")
    model_name: str = doc("", "Model name in /v1/models and responses ('' = the target's folder or hub name).")
    host: str = doc("127.0.0.1", "HTTP host (0.0.0.0 exposes the API beyond this machine).")
    port: int = doc(8000, "HTTP port.")
    num_replicas: int = doc(1, "Decoder replicas (ignored when autoscaling is set).")
    cpus_per_replica: float = doc(1.0, "CPUs reserved per decoder replica.")
    gpus_per_replica: float = doc(0.0, "GPUs per decoder replica (> 0: the models run on cuda).")
    threads: int = doc(0, "Torch threads per decoder replica; 0 = cpus_per_replica (at least 1).")
    max_ongoing_requests: int = doc(
        4, "Requests one decoder replica holds at once; their decoding steps take turns on the model."
    )
    max_queued_requests: int = doc(
        128, "Requests waiting for a decoder replica beyond which new ones get 503 + Retry-After (-1 = no limit)."
    )
    retry_after_s: int = doc(2, "Retry-After seconds sent with a 503 (queue full).")
    autoscaling: dict = doc({}, "Ray Serve autoscaling_config of the decoder ({} = fixed num_replicas).")
    api_keys: list = doc(
        [],
        "Accepted API keys (Authorization: Bearer KEY), as strings (quote a key that looks numeric); [] = none.",
    )
    max_prompt_tokens: int = doc(2048, "Longest prompt accepted, in target tokens (longer: 400).")
    max_tokens_limit: int = doc(512, "Largest max_tokens a request may ask for (larger: 400).")
    max_request_bytes: int = doc(1_048_576, "Largest request body accepted (larger: 413).")
    prefill_chunk: int = doc(
        256,
        "Prompt tokens per prefill forward: a long prompt is prefilled in chunks, letting the other streams of its "
        "replica take their steps in between (0 = one forward).",
    )
    default_max_tokens: int = doc(128, "max_tokens of a request that omits it.")

    prefix = "serve."

    def validate(self) -> None:
        super().validate()
        self.need(1 <= self.port <= 65535, "port", "must be a TCP port, 1..65535")
        self.positive("num_replicas", "max_ongoing_requests", "max_prompt_tokens", "max_tokens_limit")
        self.positive("max_request_bytes")
        self.positive(
            "cpus_per_replica", "gpus_per_replica", "threads", "retry_after_s", "prefill_chunk", minimum=0
        )
        self.positive("max_queued_requests", minimum=-1)
        self.need(1 <= self.default_max_tokens <= self.max_tokens_limit, "default_max_tokens",
                  f"must be in 1..serve.max_tokens_limit ({self.max_tokens_limit})")  # fmt: skip
        self.need(all(isinstance(k, str) and k for k in self.api_keys), "api_keys",
                  "must be non-empty strings: quote a key that looks like a number (YAML reads 0123 as 83)")  # fmt: skip


@dataclass
class PipelineConfig(Section):
    """The whole run as one job (jobs/pipeline.py): prepare -> pt -> cp -> generate -> ft -> evaluate -> report."""

    prefix = "pipeline."

    stages: list = doc(
        ["prepare", "pt", "cp", "generate", "ft", "evaluate"],
        "Stages to run (always in the order prepare, search, pt, cp, generate, ft, evaluate; search is opt-in and PT then trains its best shape; without cp, FT starts from PT); finished ones are skipped.",
    )
    evaluate_drafts: list = doc(
        ["pt", "cp", "ft"],
        "Stage exports evaluated together against one shared target baseline (unfinished: left out).",
    )
    force: list = doc([], "Stages to re-run from scratch even when finished with the same settings and inputs.")
    preflight: bool = doc(
        True,
        "Check the target, every data and prompt source, the cluster's resources and the storage before the first "
        "stage (jobs/pipeline.py --check runs only the checks); a failed check stops the run.",
    )

    def validate(self) -> None:
        for key in ("stages", "force"):
            try:
                expand(getattr(self, key))
            except StageError as exc:
                raise ConfigError(f"pipeline.{key}: {exc}") from None
        wrong = [s for s in self.evaluate_drafts if s not in TRAINING]
        self.need(not wrong, "evaluate_drafts", f"{wrong} are not training stages ({', '.join(TRAINING)})")


@dataclass
class FastDraftConfig(Section):
    """A whole run: where it lives and every stage's settings (``stages``: per training stage overrides)."""

    run_name: str = doc("default", "Run directory name under storage.")
    storage: str = doc(
        "runs", "Root of run directories: a path every node sees (local for one node; NFS or a mounted bucket)."
    )
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "Target model."})
    draft: DraftConfig = field(default_factory=DraftConfig, metadata={"doc": "Draft shape."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "Corpora."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"doc": "Training."})
    generate: GenerateConfig = field(default_factory=GenerateConfig, metadata={"doc": "KD data generation."})
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig, metadata={"doc": "Evaluation."})
    search: SearchConfig = field(default_factory=SearchConfig, metadata={"doc": "Architecture search."})
    serve: ServeConfig = field(default_factory=ServeConfig, metadata={"doc": "Serving."})
    pipeline: PipelineConfig = field(default_factory=PipelineConfig, metadata={"doc": "The one-job pipeline."})
    stages: dict = doc({}, "Per-stage overrides: stage (pt, cp, ft) -> {dotted.key: value}; see stage_config().")

    def validate(self) -> None:
        self.need(bool(self.run_name) and "/" not in self.run_name, "run_name", "must be a folder name (no '/')")
        self.need(bool(self.storage), "storage", "must name the root of the run directories")
        self.need("://" not in self.storage, "storage", NOT_A_URL)
        wrong = sorted(set(self.stages) - set(TRAINING))
        self.need(not wrong, "stages", f"{wrong}: per-stage overrides exist for {', '.join(TRAINING)} only")


def _renamed(data: dict) -> dict:
    """``data`` with each deprecated key (``RENAMED``) moved to its new name, saying so once per key."""
    for old, new in RENAMED.items():
        section, key = old.split(".")
        if isinstance(data.get(section), dict) and key in data[section]:
            data[section][new.split(".")[1]] = data[section].pop(key)
            message = (
                f"config key {old} is deprecated: it is called {new} now (the old name goes in the next release)"
            )
            warnings.warn(message, DeprecationWarning, stacklevel=3)
            logging.getLogger(__name__).warning(message)
    return data


RENAMED = {"serve.max_new_tokens": "serve.max_tokens_limit"}  # old key -> new key, kept one release


def check_run(cfg: FastDraftConfig) -> FastDraftConfig:
    """The checks that span sections or per-stage settings (each section checks itself when built): every
    ``stages.<stage>`` applies, and on-policy KD rows have the soft FT loss they need."""
    for stage in cfg.stages:
        try:
            stage_config(cfg, stage)
        except ConfigError as exc:  # an unknown key, a wrong type or a bad value among the stage's overrides
            raise ConfigError(f"stages.{stage}: {exc}") from None
    g, ft_loss = cfg.generate, stage_config(cfg, "ft").train.kd_loss
    if g.onpolicy_fraction > 0 and (g.topk_logprobs <= 0 or ft_loss == "ce"):
        raise ConfigError(
            f"generate.onpolicy_fraction={g.onpolicy_fraction}: on-policy rows are learned from the target's scores "
            f"only (no CE on draft-written tokens), so set generate.topk_logprobs > 0 (now {g.topk_logprobs}) and a "
            f"soft FT loss, e.g. stages.ft.train.kd_loss=kl or ce_kl (now {ft_loss})"
        )
    return cfg


# ---------------------------------------------------------------------------------------------- loading


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass (``train.lr``, ...)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += valid_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a valid {tp}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(c) for c in choices)}")
        return value
    base = origin or tp
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if base is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if base is int and (isinstance(value, bool) or not isinstance(value, int)):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if base in (str, list, dict, float) and not isinstance(value, base):
        raise ConfigError(f"{key}: expected {base.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        valid = ", ".join(valid_keys(cls, prefix))
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + u for u in unknown)}; valid keys: {valid}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
    node[parts[-1]] = value


def _split_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.lr=3e-4", "draft.num_layers=2"]`` -> nested dict; values are parsed as YAML scalars.
    ``stages.<stage>.<dotted key>=value`` keeps the stage's key dotted, as stage sections are written."""
    tree: dict = {}
    for item in overrides:
        key, value = _split_override(item)
        parts = key.split(".", 2)
        if parts[0] == "stages" and len(parts) == 3:
            tree.setdefault("stages", {}).setdefault(parts[1], {})[parts[2]] = value
        else:
            _set_dotted(tree, key, value)
    return tree


def _drop_stage_keys(data: dict, overrides: list[str]) -> dict:
    """A command-line key wins over the recipe's per-stage value of the same key (``train.token_budget=...``
    applies to every stage)."""
    keys = [key for key, _ in map(_split_override, overrides) if key.split(".")[0] != "stages"]
    for stage_keys in (data.get("stages") or {}).values():
        if isinstance(stage_keys, dict):
            for name in [k for k in stage_keys if any(k == c or k.startswith(c + ".") for c in keys)]:
                del stage_keys[name]
    return data


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and value:
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_recipe(name_or_path: str) -> Path:
    """A shipped recipe name (``cpu_default``) or a YAML path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise ConfigError(f"no recipe {name_or_path!r}: give a YAML path or one of {', '.join(names)}")


def _read_recipe(recipe: str, seen: tuple[str, ...] = ()) -> dict:
    path = resolve_recipe(recipe)
    if str(path) in seen:
        raise ConfigError(f"recipe {recipe!r} extends itself: {' -> '.join(seen)}")
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of config keys")
    base = data.pop("extends", None)
    return _merge(_read_recipe(base, (*seen, str(path))), data) if base else data


def load_config(recipe: str | None = "cpu_default", overrides: list[str] | None = None) -> FastDraftConfig:
    """Load a recipe (shipped name or YAML path), apply ``key.sub=value`` overrides, validate strictly.

    A recipe may start with ``extends: <recipe>`` to change only some keys of another one. An override wins over
    the recipe everywhere, per-stage values of the same key included.
    """
    data = _read_recipe(recipe) if recipe else {}
    data = _drop_stage_keys(_merge(data, parse_overrides(overrides or [])), overrides or [])
    return check_run(_build(FastDraftConfig, _renamed(data)))


def stage_config(cfg: FastDraftConfig, stage: str) -> FastDraftConfig:
    """``cfg`` with ``cfg.stages[stage]`` applied (e.g. CP's code:text mixture and token budget)."""
    overrides = cfg.stages.get(stage, {})
    if not isinstance(overrides, dict):
        raise ConfigError(f"stages.{stage} must map dotted keys to values, got {overrides!r}")
    data = to_dict(cfg)
    for key, value in overrides.items():
        if key.split(".")[0] == "stages":
            raise ConfigError(f"stages.{stage}: {key} cannot be overridden per stage")
        _set_dotted(data, key, value)
    data["train"]["stage"] = stage
    return _build(FastDraftConfig, data)


def check_choices(section: Any, prefix: str = "") -> None:
    """Raise ``ConfigError`` for a choice field (a ``Literal``) of a config dataclass built directly in code
    (``load_config`` checks those of a loaded one), naming the valid values."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        if typing.get_origin(hints[f.name]) is Literal:
            _coerce(getattr(section, f.name), hints[f.name], prefix + f.name)


def config_from_dict(data: dict) -> FastDraftConfig:
    """A plain dict (``to_dict`` of a config, e.g. read back from DONE.json) as a ``FastDraftConfig``; each
    section checks itself. The per-stage checks of ``check_run`` are left out: a stage's record holds that stage's
    config, with its ``stages`` overrides already applied, where another stage's overrides need not apply."""
    return _build(FastDraftConfig, _renamed(data))


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config (JSON/YAML friendly)."""
    return dataclasses.asdict(cfg)


def describe(cls: type = FastDraftConfig, prefix: str = "") -> str:
    """One line per key: ``key = default  # doc``."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(describe(tp, f"{prefix}{f.name}."))
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        lines.append(f"{prefix}{f.name} = {default!r}  # {f.metadata.get('doc', '')}")
    return "\n".join(lines)


def section_settings(obj, section: str) -> dict:
    """A config section (dataclass or dict) as a dict without its speed-only keys (``stage_graph.SPEED_ONLY``)."""
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else dict(obj)
    return {k: v for k, v in data.items() if k not in SPEED_ONLY.get(section, ())}


def training_settings(cfg: FastDraftConfig) -> dict:
    """What a training stage's result depends on: model, draft, data and train settings (speed-only keys out)."""
    return {
        "model": to_dict(cfg.model),
        "draft": to_dict(cfg.draft),
        "data": section_settings(cfg.data, "data"),
        "train": section_settings(cfg.train, "train"),
    }
