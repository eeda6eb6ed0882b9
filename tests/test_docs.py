"""The manual stays honest: every job command in README.md's code blocks answers ``--help`` and loads its config,
every config key the docs name exists, every relative link resolves, and nothing points outside the repository
(documents that live elsewhere, a development machine's paths)."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from fastdraft_ray.config import FastDraftConfig, load_config, valid_keys
from tests.entry_points import run_as_main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    ROOT / "README.md",
    ROOT / "ARCHITECTURE.md",
    ROOT / "cluster" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
]
SECTIONS = {f.split(".")[0] for f in valid_keys(FastDraftConfig)}
JOB = re.compile(r"(?:^|\s)(?:python3?\s+)?(jobs/[\w./-]+\.py)\b(.*)")


def code_blocks(text: str, languages: tuple[str, ...] = ("bash", "sh", "")) -> list[str]:
    """The bodies of the fenced code blocks in ``languages`` ('' = no language given)."""
    return [body for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S) if lang in languages]


def job_commands(text: str) -> list[tuple[str, list[str]]]:
    """``(jobs/<name>.py, [its arguments])`` for every command of the shell code blocks that runs a job."""
    found = []
    for block in code_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;|\|", line):
                match = JOB.search(part)
                if match:
                    found.append((match.group(1), shlex.split(match.group(2), comments=True)))
    return found


def check_job_command(job: str, args: list[str], root: Path = ROOT) -> str | None:
    """Why a README job command is wrong, or None. The job must exist and accept the command: a job built on
    ``cli.parse_job_args`` parses its flags, recipe and overrides exactly as it would and stops there (a recipe
    file the user writes, or a run writes, is replaced by ``cpu_default``); any other job must answer ``--help``."""
    import fastdraft_ray.cli as cli

    path = root / job
    if not path.exists():
        return f"{job}: no such job"
    args = list(args)
    if "--config" in args:
        at = args.index("--config") + 1
        if args[at].endswith((".yaml", ".yml")) and not (root / args[at]).exists():
            args[at] = "cpu_default"
    real = cli.parse_job_args

    def parse_then_stop(*a, **kw):
        real(*a, **kw)  # exits 2 with the parser's message on a bad flag, key or value
        raise SystemExit(0)

    cli.parse_job_args = parse_then_stop
    try:
        status = run_as_main(path, args if "parse_job_args" in path.read_text() else ["--help"])
    finally:
        cli.parse_job_args = real
    if status == "returned":
        return f"{job} {' '.join(args)}: did not stop after parsing its arguments"
    return None if status in (0, None) else f"{job} {' '.join(args)}: exited with {status}"


def named_keys(text: str) -> set[str]:
    """Config keys the prose names in backticks (``train.lr``, ``evaluate.gamma_select=[...]``)."""
    keys = set()
    for span in re.findall(r"`([^`\n]+)`", text):
        for match in re.finditer(r"(?<![\w./$-])([a-z]+)\.([a-z_][\w.]*)(?![\w(])", span):
            section, rest = match.groups()
            if section in SECTIONS and section != "stages" and rest not in ("py", "yaml", "md", "sh", "json"):
                keys.add(f"{section}.{rest.rstrip('.')}")
    return keys


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors of a Markdown document."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def broken_links(doc: Path) -> list[str]:
    text = doc.read_text()
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            bad.append(f"{doc.relative_to(ROOT)}: {target} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            bad.append(f"{doc.relative_to(ROOT)}: {target}: no heading #{anchor}")
    return bad


# ----------------------------------------------------------------------------------------------------- tests


def test_every_readme_job_command_answers_help_and_loads_its_config():
    commands = job_commands((ROOT / "README.md").read_text())
    assert len(commands) >= 6, commands  # GPU node, serving, search, configuration
    problems = [p for job, args in commands if (p := check_job_command(job, args))]
    assert problems == []


def test_a_readme_naming_a_missing_job_or_key_fails(tmp_path):
    """The checks above fail on a README that names a job that does not exist, a key that does not exist, or a
    flag a job does not take."""
    text = (
        "```bash\npython jobs/does_not_exist.py --config cpu_quick\n"
        "python jobs/pipeline.py --config cpu_quick train.learning_rate=1e-3\n"
        "python jobs/pipeline.py --config cpu_quick --no-such-flag\n```\n"
    )
    problems = [check_job_command(job, args) for job, args in job_commands(text)]
    assert problems[0] == "jobs/does_not_exist.py: no such job"
    assert problems[1] == "jobs/pipeline.py --config cpu_quick train.learning_rate=1e-3: exited with 2"
    assert problems[2] == "jobs/pipeline.py --config cpu_quick --no-such-flag: exited with 2"


def test_recipes_in_the_docs_load(tmp_path):
    """A YAML block that extends a shipped recipe (the README's own-model example) is a valid recipe."""
    blocks = [b for doc in DOCS for b in code_blocks(doc.read_text(), ("yaml",)) if "extends:" in b]
    assert blocks
    for i, block in enumerate(blocks):
        path = tmp_path / f"recipe{i}.yaml"
        path.write_text(block)
        load_config(str(path))


def test_every_config_key_the_docs_name_exists():
    valid = set(valid_keys(FastDraftConfig))
    for doc in DOCS:
        missing = sorted(k for k in named_keys(doc.read_text()) if k not in valid)
        assert missing == [], f"{doc.relative_to(ROOT)} names keys that do not exist: {missing}"


def test_named_keys_finds_a_wrong_key():
    text = "set `train.lr=3e-4` or `evaluate.gamma_select`, see `jobs/train.py`, `search.py`, `model.generate(x)`"
    assert named_keys(text) == {
        "train.lr",
        "evaluate.gamma_select",
    }


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    assert broken_links(doc) == []


OUTSIDE = re.compile(r"DESIGN\.md|DATA\.md|STYLE\.md|(?<![\w/.-])shared/|/work/|/root/|/home/(?!ray/)")


def test_nothing_points_outside_the_repository():
    """No document outside the repo (the design and data notes live in docs/), no development-machine path.
    Dated records under benchmarks/results/ are what they are; /mnt/... paths are examples a user edits."""
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    offenders = []
    for name in files:
        if name.startswith("benchmarks/results/") or name == "tests/test_docs.py":
            continue
        path = ROOT / name
        if path.suffix not in (".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".cpp", "") or not path.is_file():
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{name}:{n}: {line.strip()[:100]}")
    assert offenders == []
