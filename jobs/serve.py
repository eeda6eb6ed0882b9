"""Serve the target + draft pair behind an OpenAI-compatible HTTP API (Ray Serve; fastdraft_ray/serve/).

    python jobs/serve.py --config cpu_default serve.draft=runs/cpu_default/ft/export      # local Ray, blocks
    ray job submit --working-dir . -- python jobs/serve.py --config cpu_default serve.draft=$PWD/runs/cpu_default/ft/export
    serve run fastdraft_ray.serve.app:app_builder config=cpu_default serve.draft=runs/cpu_default/ft/export

Submitted to a cluster, the job deploys the app and exits: the app keeps serving (`serve shutdown -y` stops it).
Started without a cluster, it runs a local Ray and serves until Ctrl-C. `serve.speculative=false` serves the target
alone (the baseline); a request can also ask for it with `"speculative": false`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package from the working dir, installed or not

from fastdraft_ray.cli import parse_job_args, setup_logging  # noqa: E402
from fastdraft_ray.ray_runtime import init_ray, starts_local_ray  # noqa: E402

APP_NAME = "fastdraft"


def _arguments(parser) -> None:
    parser.add_argument("--block", action="store_true", help="keep serving in this process even on a cluster")


def main() -> None:
    cfg, args = parse_job_args(__doc__, add_arguments=_arguments)
    setup_logging()
    s = cfg.serve
    if s.draft and not (Path(s.draft) / "config.json").exists():
        raise SystemExit(
            f"serve.draft={s.draft!r} is not an HF model folder (no config.json): pass a stage export"
        )
    local = starts_local_ray()
    init_ray()
    from ray import serve

    from fastdraft_ray.serve.app import build_app

    serve.start(http_options={"host": s.host, "port": s.port})
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    url = f"http://{s.host}:{s.port}"
    print(f"serving {APP_NAME} at {url} (draft: {s.draft or 'none'}); try:")
    print(f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d "
          "'{\"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], \"max_tokens\": 32}'")  # fmt: skip
    if local or args.block:
        print("serving until Ctrl-C")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()


if __name__ == "__main__":
    main()
