"""Text tables for people: aligned columns on a terminal, or Markdown for the README and the UI."""

from collections.abc import Sequence
from typing import Any


def cell(value: Any) -> str:
    """A figure as a table shows it: floats rounded to what a reader compares, the rest as it is."""
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def _cells(headers: Sequence[Any], rows: Sequence[Sequence[Any]]) -> tuple[list[list[str]], list[int]]:
    cells = [[str(h) for h in headers]] + [[cell(c) for c in row] for row in rows]
    return cells, [max(len(r[i]) for r in cells) for i in range(len(headers))]


def aligned(headers: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """Columns separated by two spaces, for a terminal."""
    cells, widths = _cells(headers, rows)
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def markdown(headers: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table with padded columns."""
    cells, widths = _cells(headers, rows)
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
