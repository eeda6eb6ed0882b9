"""Imports go downward only (ARCHITECTURE.md), checked statically with ``ast``: every
``import`` / ``from ... import`` in ``fastdraft_ray/``, lazy imports inside functions and ``TYPE_CHECKING`` blocks
included. A module may import its own package and packages of LOWER levels, never a sibling of its level nor a
later stage, and never a private (``_name``) name of another module."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "fastdraft_ray"

# config/assets -> models -> data, specdec -> train -> distill -> evaluate -> search, serve -> pipeline -> jobs
# the base modules may import each other
BASE = ("stage_graph", "config", "assets", "layout", "ray_runtime", "markdown", "jit_ops")
LEVELS = (
    ("base", BASE),
    ("models", ("models",)),
    ("data", ("data",)),
    ("specdec", ("specdec",)),
    ("train", ("train",)),
    ("distill", ("distill",)),
    ("evaluate", ("evaluate",)),
    ("search", ("search",)),
    ("serve", ("serve",)),
    ("pipeline", ("pipeline",)),
    ("cli", ("cli",)),  # what jobs/ share
)
RANK = {"base": 0, "models": 1, "data": 2, "specdec": 2, "train": 3, "distill": 4, "evaluate": 5}
RANK |= {"search": 6, "serve": 6, "pipeline": 7, "cli": 8}
GROUP = {member: group for group, members in LEVELS for member in members}


def _component(module: str) -> str | None:
    """``fastdraft_ray.train.run`` -> its group (``train``); None for the package itself or an unknown part."""
    parts = module.split(".")
    return GROUP.get(parts[1]) if len(parts) > 1 and parts[0] == PACKAGE else None


def _imports(tree: ast.AST, module: str):
    """``(line, imported module, imported names)`` of every import of ``fastdraft_ray`` in ``tree``."""
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:  # relative import: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([target] if target else [])])
            if target.split(".")[0] != PACKAGE:
                continue
            names = [a.name for a in node.names]
            if target == PACKAGE or not _component(target):  # `from fastdraft_ray import assets`
                for name in names:
                    yield node.lineno, f"{target}.{name}", []
            else:
                yield node.lineno, target, names


def violations(root: Path) -> list[str]:
    """Every import in ``root/fastdraft_ray`` against the order above, or of another module's private name."""
    out = []
    for path in sorted((root / PACKAGE).rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        mine = _component(module)
        for line, target, names in _imports(ast.parse(path.read_text(), str(path)), module):
            where = f"{path.relative_to(root)}:{line}"
            theirs = _component(target)
            if mine is None or theirs is None:
                if target.split(".")[1:2] and target.split(".")[1] not in GROUP:
                    out.append(
                        f"{where}: {target} belongs to no level (add it to LEVELS in tests/test_imports.py)"
                    )
                continue
            if theirs != mine and RANK[theirs] >= RANK[mine]:
                kind = "a sibling of the same level" if RANK[theirs] == RANK[mine] else "a later stage"
                out.append(f"{where}: {mine} imports {target}, {kind}")
            for name in names:
                if name.startswith("_") and not name.startswith("__") and target != module:
                    out.append(f"{where}: imports the private name {name} of {target}")
            if any(part.startswith("_") and not part.startswith("__") for part in target.split(".")):
                out.append(f"{where}: imports the private module {target}")
    return out


def test_package_imports_go_downward_only():
    assert violations(ROOT) == []


def test_a_wrong_import_is_caught(tmp_path):
    """A synthetic package with each kind of wrong import (lazy ones included): every one is reported."""
    pkg = tmp_path / PACKAGE
    for sub in ("train", "data", "evaluate", "specdec"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "train" / "bad.py").write_text(
        "from fastdraft_ray.config import FastDraftConfig\n"  # fine: downward
        "from fastdraft_ray.train import loop\n"  # fine: own package
        "def later():\n"
        "    from fastdraft_ray.evaluate.run import evaluate\n"  # upward, lazily
        "    from fastdraft_ray.data.sources import _open\n"  # private name
        "    import fastdraft_ray.pipeline.stages\n"  # upward, plain import
    )
    (pkg / "data" / "sideways.py").write_text("from ..specdec.decode import collect\n")  # sibling, relative
    found = violations(tmp_path)
    assert len(found) == 4, found
    assert any("train imports fastdraft_ray.evaluate.run, a later stage" in v for v in found)
    assert any("private name _open" in v for v in found)
    assert any("fastdraft_ray.pipeline.stages, a later stage" in v for v in found)
    assert any("data imports fastdraft_ray.specdec.decode, a sibling of the same level" in v for v in found)


def test_benchmarks_and_jobs_do_not_import_tests_or_private_names():
    bad = []
    for folder in ("benchmarks", "jobs"):
        for path in sorted((ROOT / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [a.name for a in node.names]
                    if node.module.split(".")[0] == "tests":
                        bad.append(f"{path.name}: imports {node.module}")
                    if node.module.startswith(PACKAGE):
                        bad += [f"{path.name}: imports private {n}" for n in names if n.startswith("_")]
    assert bad == []
