"""Data sources in object storage: a real S3-compatible server (moto in server mode, on loopback, started here)
holds the corpus; prepare reads it through fsspec/s3fs (the ``cloud`` extra) from Ray Data's read tasks and
writes the same shards as from a local copy of the same files."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from fastdraft_ray.config import DataConfig
from fastdraft_ray.data.prepare import prepare
from fastdraft_ray.data.sources import SourceError
from tests.data.test_prepare import TOKENIZER, read_rows, synthetic_jsonl
from tests.ray_jobs import free_port

BUCKET = "corpus"


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on 127.0.0.1 with one bucket; the AWS_* environment points s3fs (and the Ray workers
    started after it) at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield boto3.client("s3")
    finally:
        for k, v in before.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        server.stop()


@pytest.fixture(scope="module")
def ray_s3(s3_server):
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # workers get AWS_*
    yield s3_server
    ray.shutdown()


def test_prepare_reads_sources_from_s3_like_local_files(ray_s3, tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    synthetic_jsonl(local / "a.jsonl", 120, seed=1)
    with open(synthetic_jsonl(tmp_path / "b.jsonl", 80, seed=2), "rb") as fh:
        (local / "b.jsonl.gz").write_bytes(gzip.compress(fh.read()))
    for path in sorted(local.iterdir()):
        ray_s3.upload_file(str(path), BUCKET, f"web/{path.name}")

    def run(location: str, out: str) -> tuple[dict, np.ndarray]:
        data = DataConfig(sources={"web": location}, token_budget=20_000, seq_len=64, rows_per_shard=64)
        prepare(data, TOKENIZER, out, progress=False)
        return read_rows(out)

    remote_manifest, remote = run(f"s3://{BUCKET}/web/*", str(tmp_path / "from_s3"))
    local_manifest, from_disk = run(f"{local}/*", str(tmp_path / "from_disk"))
    assert remote_manifest["rows"] == local_manifest["rows"] and len(remote) > 0
    assert np.array_equal(remote, from_disk)
    assert json.dumps(remote_manifest["config"]["sources"]) == json.dumps({"web": f"s3://{BUCKET}/web/*"})

    with pytest.raises(SourceError, match="no-such-bucket|NoSuchBucket|matches no file|not found|cannot read"):
        run("s3://no-such-bucket/web/*.jsonl", str(tmp_path / "missing"))
