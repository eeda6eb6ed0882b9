"""cluster/: launcher YAMLs pass Ray's own schema, KubeRay manifests pass KubeRay's CRD schema (v1.5.1, kept in
tests/kuberay_crds/; unknown fields refused as `kubectl --validate=strict` does) and have what KubeRay needs, the
runtime_env is one Ray accepts, and every recipe these files name loads and fits the GPUs the file provides. Fast, offline."""

from __future__ import annotations

import copy
import functools
import gzip
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import ray
import yaml
from ray.runtime_env import RuntimeEnv, RuntimeEnvConfig

from fastdraft_ray.config import FastDraftConfig, load_config, stage_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER_FILES = sorted((CLUSTER / "aws").glob("*.yaml"))
KUBERAY_FILES = sorted((CLUSTER / "kuberay").glob("*.yaml"))
RECIPE_RE = re.compile(r"--config\s+([A-Za-z0-9_./-]+)")
GPU = "nvidia.com/gpu"
KUBERAY_CRDS = Path(__file__).parent / "kuberay_crds" / "v1.5.1"
MIN_RAY_FOR_TOKEN_AUTH = (2, 52)  # KubeRay refuses authOptions.mode=token below it


def _load(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path}: expected one YAML document, got {len(docs)}"
    return docs[0]


def _recipes_named(text: str) -> list[str]:
    return sorted(set(RECIPE_RE.findall(text)))


def _needed_gpus(cfg: FastDraftConfig) -> int:
    """GPUs the pipeline of ``cfg`` asks for at once: training workers, vLLM/HF generators, evaluators."""
    stages = [stage_config(cfg, s) for s in ("pt", "cp", "ft")]
    train = max(s.train.num_workers for s in stages) if cfg.train.use_gpu else 0
    generate = cfg.generate.num_actors if (cfg.generate.use_gpu or cfg.generate.backend == "vllm") else 0
    evaluate = cfg.evaluate.num_workers if cfg.evaluate.use_gpu else 0
    return max(train, generate, evaluate)


# ------------------------------------------------------------------------------------------ launcher YAML


def check_launcher(config: dict) -> int:
    """Validate a cluster-launcher config the way `ray up` does before touching a cloud; return its GPUs."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))  # merges the provider's defaults.yaml (offline)
    validate_config(prepared)  # jsonschema against ray/autoscaler/ray-schema.json + Ray's own extra checks
    types = config["available_node_types"]
    gpus = 0
    for name, node in types.items():
        count = 1 if name == config["head_node_type"] else node.get("min_workers", 0)
        gpus += count * node["resources"].get("GPU", 0)
    image = config["docker"]["image"]
    assert image == f"rayproject/ray:{ray.__version__}-py311-gpu", f"image {image} is not this Ray's GPU image"
    starts = config["head_start_ray_commands"] + config.get("worker_start_ray_commands", [])
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c), "token auth must stay on"
    assert "~/.ray/auth_token" in config["file_mounts"], "nodes need the auth token"
    return gpus


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_yaml_passes_rays_schema_and_fits_its_recipes(path):
    config = _load(path)
    gpus = check_launcher(config)
    assert gpus >= 8, f"{path.name}: {gpus} GPUs"
    for cmd in config["setup_commands"]:
        for script in re.findall(r"\S*cluster/\S+\.sh", cmd):
            assert (ROOT / "cluster" / Path(script).name).exists(), f"{path.name}: {script} missing"
    recipes = _recipes_named(path.read_text())
    assert recipes, f"{path.name} should say which recipe it is for (--config NAME)"
    for recipe in recipes:
        need = _needed_gpus(load_config(recipe))
        assert need <= gpus, f"{path.name} has {gpus} GPUs but {recipe} asks for {need}"


def test_launcher_check_fails_on_a_broken_config():
    import jsonschema

    good = _load(CLUSTER / "aws" / "multi-node.yaml")
    check_launcher(good)
    typo = {**copy.deepcopy(good), "max_worker": 8}  # unknown top-level key
    with pytest.raises(jsonschema.ValidationError):
        check_launcher(typo)
    no_resources = copy.deepcopy(good)
    del no_resources["available_node_types"]["gpu.worker"]["resources"]
    with pytest.raises(jsonschema.ValidationError):
        check_launcher(no_resources)
    too_few = copy.deepcopy(good)
    too_few["max_workers"] = 2  # below the GPU workers' min_workers
    with pytest.raises(ValueError, match="max_workers"):
        check_launcher(too_few)
    auth_off = copy.deepcopy(good)
    auth_off["worker_start_ray_commands"] = ["ray start --address=$RAY_HEAD_IP:6379"]
    with pytest.raises(AssertionError, match="token"):
        check_launcher(auth_off)


# ------------------------------------------------------------------------------------------------ KubeRay


def _containers(pod_template: dict) -> list[dict]:
    containers = pod_template["spec"]["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers), "containers need name+image"
    return containers


@functools.cache
def crd_schema(kind: str) -> dict:
    """The ``openAPIV3Schema`` of KubeRay's ``ray.io/v1`` ``kind`` (RayCluster, RayJob)."""
    crd = yaml.safe_load(gzip.open(KUBERAY_CRDS / f"ray.io_{kind.lower()}s.yaml.gz"))
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def unknown_fields(value, schema: dict, path: str = ""):
    """Paths of mapping keys the schema does not declare (the API server would drop them silently)."""
    if isinstance(value, dict) and not schema.get("x-kubernetes-preserve-unknown-fields"):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, item in value.items():
            if props is not None:
                if key not in props:
                    yield f"{path}.{key}"
                else:
                    yield from unknown_fields(item, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                yield from unknown_fields(item, extra, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from unknown_fields(item, schema["items"], f"{path}[{i}]")


def check_crd_schema(doc: dict) -> None:
    """Types, enums and required fields (jsonschema), and no undeclared field. CEL rules
    (``x-kubernetes-validations``) are the API server's and are not evaluated here."""
    import jsonschema

    schema = crd_schema(doc["kind"])
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "; ".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5])
    unknown = list(unknown_fields(doc, schema))
    assert not unknown, f"fields KubeRay v1.5.1 does not know: {unknown}"


def _check_auth(spec: dict, where: str) -> None:
    """Token authentication the KubeRay way: the operator makes the Secret and sets the env vars everywhere."""
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: authOptions.mode=token missing"
    major, minor = (int(x) for x in spec["rayVersion"].split(".")[:2])
    assert (major, minor) >= MIN_RAY_FOR_TOKEN_AUTH, f"{where}: token auth needs Ray >= 2.52"


def _no_manual_token(template: dict, where: str) -> None:
    names = {e["name"] for c in template["spec"]["containers"] for e in c.get("env", [])}
    assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, (
        f"{where}: RAY_AUTH_* set by hand (authOptions sets it)"
    )


def _check_pod(template: dict, where: str, claim: str) -> dict:
    container = _containers(template)[0]
    _no_manual_token(template, where)
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    assert "/mnt/shared" in mounts, f"{where}: the shared volume is not mounted at /mnt/shared"
    pvc = volumes[mounts["/mnt/shared"]].get("persistentVolumeClaim", {})
    assert pvc.get("claimName") == claim, f"{where}: /mnt/shared is not the PVC {claim}"
    return container


def check_ray_cluster_spec(spec: dict, claim: str) -> int:
    """Structure KubeRay needs in a RayClusterSpec; returns the GPUs its worker groups provide at start."""
    assert spec.get("rayVersion") == ray.__version__, f"rayVersion {spec.get('rayVersion')} != {ray.__version__}"
    _check_auth(spec, "rayClusterSpec")
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), "headGroupSpec.rayStartParams must be a mapping"
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams values are strings"
    head_container = _check_pod(head["template"], "head", claim)
    ports = {p["name"]: p["containerPort"] for p in head_container.get("ports", [])}
    assert ports.get("dashboard") == 8265 and ports.get("gcs-server") == 6379, f"head ports {ports}"
    images = {head_container["image"]}
    gpus = 0
    groups = spec["workerGroupSpecs"]
    assert groups, "no workerGroupSpecs"
    for group in groups:
        name = group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], f"{name}: replica bounds"
        assert isinstance(group["rayStartParams"], dict), f"{name}: rayStartParams must be a mapping"
        container = _check_pod(group["template"], name, claim)
        images.add(container["image"])
        res = container["resources"]
        assert str(res["limits"].get(GPU)) == str(res["requests"].get(GPU)), f"{name}: GPU requests != limits"
        gpus += group["replicas"] * int(res["limits"].get(GPU, 0))
    assert len(images) == 1, f"head and workers must run one image, got {images}"
    assert gpus >= 8, f"worker groups provide {gpus} GPUs"
    return gpus


def check_kuberay(doc: dict, claim: str) -> dict:
    """Check a RayCluster or RayJob; returns {gpus, entrypoint (RayJob), runtime_env (RayJob)}."""
    assert doc.get("apiVersion") == "ray.io/v1", f"apiVersion {doc.get('apiVersion')}"
    assert doc.get("metadata", {}).get("name"), "metadata.name missing"
    check_crd_schema(doc)
    kind, spec = doc.get("kind"), doc["spec"]
    if kind == "RayCluster":
        return {"gpus": check_ray_cluster_spec(spec, claim)}
    assert kind == "RayJob", f"unexpected kind {kind}"
    out = {"gpus": check_ray_cluster_spec(spec["rayClusterSpec"], claim), "entrypoint": spec["entrypoint"]}
    out["runtime_env"] = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
    _no_manual_token(spec["submitterPodTemplate"], "submitter")
    return out


def _pvc_name() -> str:
    pvc = _load(CLUSTER / "kuberay" / "pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["apiVersion"] == "v1"
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "every node writes the run directory: RWX"
    return pvc["metadata"]["name"]


def _check_entrypoint(entrypoint: str, gpus: int) -> FastDraftConfig:
    argv = shlex.split(entrypoint)
    assert argv[0] == "python" and argv[1].endswith("jobs/pipeline.py"), f"entrypoint {entrypoint!r}"
    rest = argv[2:]
    assert rest[0] == "--config", f"entrypoint must name a recipe: {entrypoint!r}"
    cfg = load_config(rest[1], rest[2:])  # raises ConfigError on an unknown key or bad value
    assert cfg.storage.startswith("/mnt/shared/"), f"storage {cfg.storage} is not on the shared volume"
    assert _needed_gpus(cfg) <= gpus, f"{rest[1]} needs {_needed_gpus(cfg)} GPUs, the cluster has {gpus}"
    return cfg


@pytest.mark.parametrize("path", [p for p in KUBERAY_FILES if p.name != "pvc.yaml"], ids=lambda p: p.name)
def test_kuberay_manifest_has_what_kuberay_needs(path):
    result = check_kuberay(_load(path), _pvc_name())
    if "entrypoint" in result:
        _check_entrypoint(result["entrypoint"], result["gpus"])
        env = result["runtime_env"]
        _check_runtime_env(env)
        shared = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())["env_vars"]
        for key, value in env.get("env_vars", {}).items():
            assert shared.get(key, value) == value, (
                f"{path.name}: {key}={value} but runtime_env.yaml says {shared[key]}"
            )


def test_kuberay_check_fails_on_broken_manifests():
    claim = _pvc_name()
    job = _load(CLUSTER / "kuberay" / "rayjob-8gpu.yaml")
    check_kuberay(job, claim)
    no_head = copy.deepcopy(job)
    del no_head["spec"]["rayClusterSpec"]["headGroupSpec"]
    with pytest.raises(AssertionError, match="'headGroupSpec' is a required property"):
        check_kuberay(no_head, claim)
    no_gpu = copy.deepcopy(job)
    for part in ("limits", "requests"):
        del no_gpu["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
            "resources"
        ][part][GPU]
    with pytest.raises(AssertionError, match="GPUs"):
        check_kuberay(no_gpu, claim)
    with pytest.raises(AssertionError, match="PVC"):
        check_kuberay(job, "some-other-claim")
    typo = copy.deepcopy(job)
    typo["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplica"] = 1
    with pytest.raises(AssertionError, match=r"does not know.*workerGroupSpecs\[0\]\.minReplica'"):
        check_kuberay(typo, claim)
    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["backoffLimit"] = "0"
    with pytest.raises(AssertionError, match="backoffLimit: '0' is not of type 'integer'"):
        check_kuberay(wrong_type, claim)
    bad_mode = copy.deepcopy(job)
    bad_mode["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "tokens"
    with pytest.raises(AssertionError, match="'tokens' is not one of"):
        check_kuberay(bad_mode, claim)
    manual = copy.deepcopy(job)
    manual["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "RAY_AUTH_TOKEN", "value": "x"}
    )
    with pytest.raises(AssertionError, match="set by hand"):
        check_kuberay(manual, claim)
    no_auth = copy.deepcopy(job)
    del no_auth["spec"]["rayClusterSpec"]["authOptions"]
    with pytest.raises(AssertionError, match="authOptions.mode=token missing"):
        check_kuberay(no_auth, claim)
    with pytest.raises(AssertionError, match="needs 64 GPUs"):
        _check_entrypoint("python jobs/pipeline.py --config phi3_mini_50m_64gpu storage=/mnt/shared/x", 8)
    with pytest.raises(ValueError, match="unknown config key"):
        _check_entrypoint("python jobs/pipeline.py --config phi3_mini_50m_8gpu train.num_worker=8", 8)


def test_pipeline_entry_point_exists():
    if not (ROOT / "jobs" / "pipeline.py").exists():
        pytest.skip("jobs/pipeline.py is not in this checkout yet")
    text = (ROOT / "jobs" / "pipeline.py").read_text()
    assert "parse_job_args" in text or "--config" in text, "jobs/pipeline.py must take --config RECIPE key=value"


# ---------------------------------------------------------------------------------------------- runtime_env


def _check_runtime_env(env: dict) -> RuntimeEnv:
    unknown = set(env) - set(RuntimeEnv.known_fields)
    assert not unknown, f"runtime_env keys Ray does not know: {sorted(unknown)}"
    RuntimeEnvConfig(**env.get("config", {}))  # TypeError on an unknown config key
    return RuntimeEnv(**env)  # TypeError on wrong types (env_vars must be str -> str, ...)


def test_runtime_env_is_one_ray_accepts():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    parsed = _check_runtime_env(env)
    assert (ROOT / env["working_dir"]).resolve() == ROOT, "working_dir should be the repository root"
    assert parsed["env_vars"]["HF_HOME"].startswith("/mnt/shared/")
    assert parsed["env_vars"]["HF_HUB_OFFLINE"] in ("0", "1")
    with pytest.raises(AssertionError, match="does not know"):
        _check_runtime_env({**env, "env_var": {"A": "1"}})
    with pytest.raises(TypeError):
        _check_runtime_env({**env, "env_vars": {"HF_HUB_OFFLINE": 1}})
    with pytest.raises(TypeError):
        _check_runtime_env({**env, "config": {"setup_timeout": 10}})


# ------------------------------------------------------------------------------------------ recipes + files


def test_every_recipe_named_under_cluster_loads():
    named = set()
    for path in CLUSTER.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".md", ".sh", ""):
            named |= set(_recipes_named(path.read_text()))
    assert {"phi3_mini_50m_8gpu", "phi3_mini_50m_64gpu"} <= named
    for recipe in sorted(named):
        cfg = load_config(recipe)
        for stage in cfg.stages:
            stage_config(cfg, stage)


@pytest.mark.parametrize("base", ["phi3_mini_50m", "phi3_mini_120m", "llama31_8b_150m"])
def test_scaled_recipes_keep_the_global_batch(base):
    """8 and 64 GPUs train the same rows per optimizer step as the paper recipe: same steps, same schedule."""

    def rows_per_step(recipe: str, stage: str) -> int:
        t = stage_config(load_config(recipe), stage).train
        return t.num_workers * t.micro_batch_size * t.grad_accum_steps

    for stage in ("pt", "cp"):
        want = rows_per_step(base, stage)
        assert rows_per_step(f"{base}_8gpu", stage) == want
        assert rows_per_step(f"{base}_64gpu", stage) == want
    assert rows_per_step(f"{base}_8gpu", "ft") == rows_per_step(f"{base}_64gpu", "ft")
    big = load_config(f"{base}_64gpu")
    assert big.train.num_workers == 64 and big.train.use_gpu and big.train.precision == "bf16"
    assert big.storage == "runs", "no recipe names the run directory: storage is given once, on the command line"


def test_node_setup_script_and_dockerfile_are_consistent():
    subprocess.run(["bash", "-n", str(CLUSTER / "setup_node.sh")], check=True)
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray.__version__}-py311-gpu" in dockerfile, "Dockerfile base is not this Ray version"
    assert "cluster/setup_node.sh" in dockerfile
    images = {image for path in KUBERAY_FILES for image in re.findall(r"image: (\S+)", path.read_text())}
    assert len(images) == 1, f"KubeRay manifests use several images: {images}"


def test_vllm_is_pinned_to_what_ray_data_llm_is_built_for():
    """vLLM comes through ray[llm] of the pinned Ray (which pins the vLLM its ray.data.llm expects, and that vLLM
    pins the project's torch), in the gpu extra and in the nodes' set-up: never an unpinned `vllm`."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["gpu"] == ["ray[llm]>=2.60,<2.61"]
    setup = (CLUSTER / "setup_node.sh").read_text()
    assert '"ray[llm]>=2.60,<2.61"' in setup
    bare = [
        line
        for line in setup.splitlines()
        if not line.lstrip().startswith("#") and re.search(r"[\s\"']vllm\b", line)
    ]
    assert bare == [], bare
