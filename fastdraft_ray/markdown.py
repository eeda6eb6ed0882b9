"""The one Markdown table writer: the evaluation, pipeline and search reports and every benchmark use it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def table(header: Sequence[str], rows: Iterable[Sequence], align: str = "") -> str:
    """A GitHub-flavoured Markdown table. ``align`` has one letter per column, ``l`` (left) or ``r`` (right);
    columns it does not cover are left-aligned. Cells are written with ``str`` (format numbers before)."""
    marks = [":---" if a == "l" else "---:" for a in align.ljust(len(header), "l")]
    # GitHub reads '|---|' and '|:---|' alike; plain '---' keeps left columns as the reports always wrote them
    marks = ["---" if m == ":---" else m for m in marks]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
