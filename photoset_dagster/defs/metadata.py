"""Metadata helpers shared by the assets and jobs (what a person reads in the UI)."""

from collections.abc import Iterable
from typing import Any

import dagster as dg


def markdown_table(header: Iterable[str], rows: Iterable[Iterable[Any]], limit: int | None = None) -> dg.MetadataValue:
    """A Markdown table; ``limit`` rows at most, then a line saying how many more there were."""
    header = list(header)
    rows = list(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    shown = rows if limit is None else rows[:limit]
    lines += ["| " + " | ".join(str(cell).replace("|", "/").replace("\n", " ") for cell in row) + " |" for row in shown]
    if len(shown) < len(rows):
        lines.append(f"| … {len(rows) - len(shown)} more |" + " |" * (len(header) - 1))
    return dg.MetadataValue.md("\n".join(lines))
