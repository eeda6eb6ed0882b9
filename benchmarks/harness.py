"""What every benchmark shares: the repository on ``sys.path``, offline hub settings (before any model library
loads), the machine header, one date format for result files, and the package's Markdown table writer (the
reports use the same one). A benchmark starts with ``import harness`` and an ``# isort: split`` line."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fastdraft_ray.markdown import table  # noqa: E402  (one writer for reports and benchmarks)

__all__ = ["ROOT", "RESULTS", "machine", "now", "result_path", "table", "today"]


def today() -> str:
    """The date result files are named with: ``YYYY-MM-DD``."""
    return datetime.date.today().isoformat()


def now() -> str:
    """The time a result header shows: ``YYYY-MM-DD HH:MM``."""
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M")


def result_path(name: str, suffix: str = ".md") -> Path:
    """``benchmarks/results/<name>_<date><suffix>``."""
    return RESULTS / f"{name}_{today()}{suffix}"


def machine() -> str:
    """One line a result file records: CPU, cores, library versions, threads, and the load average now."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"{cpu}; {os.cpu_count()} logical cores; torch {torch.__version__} with {torch.get_num_threads()} "
        f"threads; transformers {transformers.__version__}; load average {load}"
    )
