"""Figures for people: rounded values, durations and rates with units, and the short summaries that lead a
materialization's metadata (read in five seconds; the detail goes in one JSON entry beside them)."""

import math
import time
from collections.abc import Mapping
from typing import Any


def rounded(value: float) -> float:
    """A figure as a reader compares it (and a plot shows it): three significant digits below 1000, whole
    numbers above; 0.000770294999995258 becomes 0.00077, 139.93 becomes 140.0."""
    if not math.isfinite(value) or value == 0:
        return float(value)
    if abs(value) >= 1000:
        return float(round(value))
    return float(f"{value:.3g}")


def seconds_text(seconds: float) -> str:
    """A duration with its unit: '0.03 s', '7.0 s', '2 min 05 s'."""
    if seconds < 0.01:
        return "<0.01 s"
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def count_text(n: int | float) -> str:
    """An integer with thousands separators: 4,538."""
    return f"{int(n):,}"


def rate_text(per_second: float, unit: str) -> str:
    """'7.4 texts/s', '133 tokens/s', '4,538 rows/s'."""
    return f"{rounded(per_second):,g} {unit}/s" if per_second < 1000 else f"{round(per_second):,} {unit}/s"


def percent_text(fraction: float) -> str:
    return f"{fraction:.0%}" if fraction in (0, 1) or fraction >= 0.1 else f"{fraction:.1%}"


def when_text(epoch: float | None) -> str:
    """A moment in UTC, to the minute; 'an unrecorded time' for an entry written before moments were kept."""
    if not epoch:
        return "an unrecorded time"
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch))


def run_text(run_id: str | None) -> str:
    """A Dagster run as the UI abbreviates it ('run `1a2b3c4d`', its first 8 characters); an output made before
    runs were recorded says so."""
    return f"run `{run_id[:8]}`" if run_id else "an earlier run (its id was not recorded)"


def summary_markdown(headline: str, lines: list[str]) -> str:
    """A bold headline and a few bullet points: what the UI shows inline (it folds Markdown of 1,000
    characters or more behind a button, so the lines are cut to stay under that)."""
    text = f"**{headline}**"
    for line in lines:
        candidate = f"{text}\n- {line}"
        if len(candidate) > 980:
            return f"{text}\n- … (more in `details`)"
        text = candidate
    return text


def json_safe(values: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a mapping that JSON can hold as they are (numbers, text, booleans, lists and dicts of
    them), floats rounded; anything else (Dagster metadata values) is left out."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, bool | int | str) or value is None:
            out[key] = value
        elif isinstance(value, float):
            out[key] = rounded(value)
        elif isinstance(value, Mapping):
            out[key] = json_safe(value)
        elif isinstance(value, list | tuple) and all(isinstance(v, bool | int | float | str) for v in value):
            out[key] = list(value)
    return out
