"""The vLLM backend's logic (rows, seeds, stop tokens, streaming writes, resume) on CPU, with the HF stand-in
behind the same processor interface; the vLLM engine itself runs only on a GPU (``-m gpu``)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from fastdraft_ray.distill.generate import read_kd, run_generation
from fastdraft_ray.distill.vllm_backend import hf_processor, row_seed, unit_rows
from tests.distill.conftest import gen_config, write_alpaca


def test_each_row_has_its_own_seed_the_stop_rule_and_the_length_cap():
    units = [
        {"temperature": 1.0, "seed": 7, "prompt_ids": [[1, 2], [3], [4, 5, 6]]},
        {"temperature": 0.0, "seed": 8, "prompt_ids": [[9]]},
    ]
    rows = unit_rows(units, max_tokens=12, stop_ids=[0, 2])
    assert [(r["unit"], r["row"]) for r in rows] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    seeds = [r["sampling_params"]["seed"] for r in rows]
    assert len(set(seeds)) == 4 and seeds == [row_seed(7, 0), row_seed(7, 1), row_seed(7, 2), row_seed(8, 0)]
    assert all(
        r["sampling_params"]["stop_token_ids"] == [0, 2] and r["sampling_params"]["max_tokens"] == 12 for r in rows
    )


def test_an_interrupted_vllm_run_keeps_finished_units_and_a_rerun_makes_each_row_exactly_once(
    tmp_path, tiny_target, ray_local
):
    """Answers are written unit by unit as they stream in: after a failure mid-stream the finished units are on
    disk (the whole temperature was lost before), and a re-run generates only the missing ones."""
    prompts = write_alpaca(tmp_path / "a.json", 20)
    cfg = gen_config(
        tiny_target, tmp_path, prompts, num_prompts=8, shard_prompts=2, max_new_tokens=6, backend="vllm"
    )
    out = tmp_path / "g" / "kd"
    with pytest.raises(Exception, match="planted interruption"):
        run_generation(cfg, processor=hf_processor(cfg, crash_after_rows=6))
    kept = {p: p.stat().st_mtime_ns for p in out.glob("responses/*/part-*.parquet")}
    assert 1 <= len(kept) < 8 and not (out / "DONE.json").exists()  # 8 units: 4 shards x 2 temperatures

    record = run_generation(cfg, processor=hf_processor(cfg))
    assert record["done"] and record["rows"] == 16
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished units were not generated again
    table = read_kd(out)
    pairs = sorted(
        zip(table.column("prompt_id").to_pylist(), table.column("temperature").to_pylist(), strict=True)
    )
    prompt_ids = pq.read_table(out / "prompts.parquet").column("prompt_id").to_pylist()
    assert pairs == sorted((p, t) for p in prompt_ids for t in (0.0, 1.0))
    # greedy rows end at the target's stop tokens or the cap, like the HF backend's
    assert all(len(r) <= 6 for r in table.column("response_ids").to_pylist())
