"""vLLM backend for KD generation (``generate.backend=vllm``) through ``ray.data.llm`` -- GPU only.

Needs the ``gpu`` extra (``pip install 'fastdraft-ray[gpu]'``) and GPUs in the cluster; imported lazily. Writes the
same unit files as the HF backend (so resume works the same way), one ``ray.data.llm`` processor per temperature.
Not covered by the CPU test suite. Top-k log-probs and on-policy units are HF-backend only for now.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa


def _check_available(cfg) -> None:
    try:
        import vllm  # noqa: F401
        from ray.data.llm import build_llm_processor, vLLMEngineProcessorConfig  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"generate.backend=vllm needs vLLM and ray.data.llm ({exc}); install the gpu extra, or use backend=hf"
        ) from None
    import ray

    if ray.cluster_resources().get("GPU", 0) < 1:
        raise RuntimeError("generate.backend=vllm needs GPUs in the Ray cluster; use backend=hf on CPU")
    if cfg.generate.topk_logprobs:
        raise RuntimeError(
            "top-k log-probs are produced by backend=hf only; set generate.topk_logprobs=0 for vllm"
        )


def run_vllm_units(cfg, units: list[dict]) -> None:
    """Generate the response units with vLLM engines (``generate.num_actors`` replicas, one GPU each)."""
    import ray
    from ray.data.llm import build_llm_processor, vLLMEngineProcessorConfig

    from fastdraft_ray.distill.actor import write_atomic
    from fastdraft_ray.models.target import resolve_target

    _check_available(cfg)
    if any(u["writer"] == "draft" for u in units):
        raise RuntimeError("on-policy units are produced by backend=hf only")
    g = cfg.generate
    model_source, gguf = resolve_target(cfg.model.target)
    if gguf:
        raise RuntimeError("backend=vllm needs an HF folder or hub id as model.target, not a .gguf file")
    for temp in sorted({u["temperature"] for u in units}):
        mine = [u for u in units if u["temperature"] == temp]
        rows = [
            {"unit": i, "row": j, "prompt_token_ids": ids}
            for i, u in enumerate(mine)
            for j, ids in enumerate(u["prompt_ids"])
        ]
        processor = build_llm_processor(
            vLLMEngineProcessorConfig(
                model_source=model_source,
                engine_kwargs={"dtype": cfg.model.dtype},
                concurrency=g.num_actors,
                batch_size=g.batch_size,
                apply_chat_template=False,
                tokenize=False,
                detokenize=False,
            ),
            preprocess=lambda r, t=temp: {
                **r,
                "prompt": "",
                "tokenized_prompt": r["prompt_token_ids"],
                "sampling_params": {
                    "temperature": t,
                    "top_p": g.top_p if t > 0 else 1.0,
                    "top_k": -1,
                    "max_tokens": g.max_new_tokens,
                    "seed": g.seed,
                },
            },
            postprocess=lambda r: {"unit": r["unit"], "row": r["row"], "tokens": list(r["generated_tokens"])},
        )
        done = processor(ray.data.from_items(rows)).take_all()
        for i, u in enumerate(mine):
            got = sorted((r for r in done if r["unit"] == i), key=lambda r: r["row"])
            responses = [list(r["tokens"]) for r in got]
            table = pa.table(
                {
                    "prompt_id": u["prompt_id"],
                    "source": u["source"],
                    "writer": ["target"] * len(got),
                    "temperature": pa.array([temp] * len(got), pa.float32()),
                    "prompt_ids": pa.array(u["prompt_ids"], pa.list_(pa.int32())),
                    "response_ids": pa.array(responses, pa.list_(pa.int32())),
                    "finished": [len(r) < g.max_new_tokens for r in responses],
                }
            )
            Path(u["path"]).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(table, u["path"])
