"""The stage graph is defined once (``fastdraft_ray/stage_graph.py``): its rules, and an ``ast`` check that no other
module builds a tuple, list or set of stage names (``config.py``'s type and default declarations aside)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fastdraft_ray import stage_graph

ROOT = Path(__file__).resolve().parents[1]
NAMES = set(stage_graph.ORDER) | set(stage_graph.ENTRIES)


def _exempt(tree: ast.AST) -> set[int]:
    """ids of the nodes inside config.py's type annotations (``Literal[...]``) and field defaults (``doc(...)``)."""
    inside = set()
    for node in ast.walk(tree):
        is_default = isinstance(node, ast.Call) and getattr(node.func, "id", "") == "doc"
        if isinstance(node, ast.Subscript) or is_default:
            inside.update(id(child) for child in ast.walk(node))
    return inside


def stage_lists(path: Path, allow_declarations: bool = False) -> list[str]:
    """``file:line`` of every tuple, list or set literal in ``path`` that holds two or more stage names."""
    tree = ast.parse(path.read_text())
    exempt = _exempt(tree) if allow_declarations else set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and id(node) not in exempt:
            names = [e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in NAMES]
            if len(names) >= 2:
                found.append(f"{path.relative_to(path.parents[1])}:{node.lineno} {names}")
    return found


def test_no_module_but_the_stage_graph_spells_a_list_of_stages():
    files = [
        p for folder in ("fastdraft_ray", "jobs", "benchmarks") for p in sorted((ROOT / folder).rglob("*.py"))
    ]
    found = [
        hit
        for path in files
        if path.name != "stage_graph.py"
        for hit in stage_lists(path, allow_declarations=path.name == "config.py")
    ]
    assert found == []


def test_a_module_that_builds_a_stage_set_is_caught(tmp_path):
    bad = tmp_path / "pkg" / "bad.py"
    bad.parent.mkdir()
    bad.write_text(
        'TRAINED = {"pt", "cp", "ft"}\nfor s in ("prepare", "search"): pass\nMODES = ("greedy", "pt")\n'
    )
    assert stage_lists(bad) == ["pkg/bad.py:1 ['pt', 'cp', 'ft']", "pkg/bad.py:2 ['prepare', 'search']"]


def test_the_graph_says_where_a_draft_comes_from():
    assert stage_graph.TRAINING == ("pt", "cp", "ft")
    assert stage_graph.draft_source("pt", stage_graph.ORDER) is None
    assert stage_graph.draft_source("ft", ["pt", "cp", "ft"]) == "cp"
    assert stage_graph.draft_source("ft", ["prepare/pt", "pt", "generate", "ft"]) == "pt"  # no CP: from PT
    assert stage_graph.draft_source("ft", ["ft"]) == "cp"  # FT alone: its default upstream
    assert stage_graph.draft_source("cp", ["cp"]) == "pt"


def test_entries_expand_in_pipeline_order():
    assert stage_graph.expand(["evaluate", "prepare", "pt"]) == ["prepare/pt", "prepare/cp", "pt", "evaluate"]
    assert stage_graph.expand(["prepare/cp"]) == ["prepare/cp"]
    with pytest.raises(
        stage_graph.StageError, match="unknown pipeline stage 'bogus'; choose from prepare, search"
    ):
        stage_graph.expand(["bogus"])
