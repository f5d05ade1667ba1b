"""What a materialization shows a person: a short summary first, the figures people follow over time as
numbers with stable keys (what the UI plots), and the detail in one JSON entry.

A cache hit says it is one: it names the run whose output it reuses, carries that run's figures forward, and
gives no throughput (nothing was computed, so a rate would be a figure about nothing).
"""

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetRecordsFilter,
    BoolMetadataValue,
    FloatMetadataValue,
    IntMetadataValue,
    MetadataValue,
    TextMetadataValue,
)

from quiver.report import (
    count_text,
    json_safe,
    rate_text,
    rounded,
    run_text,
    seconds_text,
    summary_markdown,
    when_text,
)
from resources.fileref import FileRef

SUMMARY = "summary"  # the Markdown entry that leads every materialization
DETAILS = "details"  # the one JSON entry with everything else


@dataclass
class Report:
    """What a stage tells about its work: numbers and short texts (top-level entries), summary lines
    (Markdown), and the detail (one JSON entry)."""

    metadata: dict[str, Any] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Computed(Report):
    """One partition's freshly computed output, and its report."""

    ref: FileRef | None = None


@dataclass
class PartitionResult:
    """One partition's output of a stage: computed now, or reused (a cache hit) with how it was made."""

    ref: FileRef
    cache_hit: bool
    cache_key: str
    report: Report = field(default_factory=Report)
    made: dict[str, Any] = field(default_factory=dict)  # run_id, made_at, seconds, rows, summary, figures


def plain_values(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata as plain values: numbers, texts and booleans unwrapped from their MetadataValue; other
    MetadataValues (JSON, Markdown, paths, tables) left out."""
    plain = (FloatMetadataValue, IntMetadataValue, TextMetadataValue, BoolMetadataValue)
    return {k: (v.value if isinstance(v, plain) else v) for k, v in metadata.items()
            if isinstance(v, plain) or not isinstance(v, MetadataValue)}


def made_record(run_id: str, seconds: float, computed: Computed) -> dict[str, Any]:
    """What a cache entry keeps of the computation, for the hits that reuse it."""
    assert computed.ref is not None
    return {"run_id": run_id, "made_at": time.time(), "seconds": rounded(seconds), "rows": computed.ref.rows,
            "summary": list(computed.summary), "figures": json_safe(plain_values(computed.metadata))}


def run_link(run_id: str | None) -> dict[str, Any]:
    """The reused run as a link the UI opens."""
    return {"reused_run_id": MetadataValue.dagster_run(run_id)} if run_id else {}


def hit_lines(made: Mapping[str, Any], noun: str) -> list[str]:
    """Summary lines of a hit: which run made the output, when, and what that run reported."""
    lines = [f"Output of {run_text(made.get('run_id'))} reused, made {when_text(made.get('made_at'))}"
             + (f": {count_text(made['rows'])} {noun} in {seconds_text(made['seconds'])}"
                if "rows" in made and "seconds" in made else "")]
    lines += [f"That run: {line}" for line in made.get("summary", [])]
    return lines


def _fresh(partition: str, result: PartitionResult, seconds: float, noun: str, step: Report) -> dict[str, Any]:
    rows = result.ref.rows
    headline = f"Computed {count_text(rows)} {noun} of {partition} in {seconds_text(seconds)}"
    return {
        SUMMARY: MetadataValue.md(summary_markdown(headline, result.report.summary + step.summary)),
        "cache_hit": False, "cache_key": result.cache_key,
        "duration_seconds": MetadataValue.float(rounded(seconds)),
        "rows_per_second": MetadataValue.float(rounded(rows / seconds) if seconds > 0 else 0.0),
        **result.report.metadata, **step.metadata,
        DETAILS: MetadataValue.json({**result.report.details, **step.details}),
    }


def _hit(partition: str, result: PartitionResult, seconds: float, noun: str, step: Report) -> dict[str, Any]:
    made = result.made
    headline = f"Cache hit for {partition}: nothing recomputed ({seconds_text(seconds)})"
    lines = hit_lines(made, noun) + [f"Same code version, inputs and config: cache key `{result.cache_key}`"]
    return {
        SUMMARY: MetadataValue.md(summary_markdown(headline, lines + step.summary)),
        "cache_hit": True, "cache_key": result.cache_key, **run_link(made.get("run_id")),
        **({"reused_made_at": MetadataValue.timestamp(made["made_at"])} if made.get("made_at") else {}),
        **result.report.metadata, **step.metadata,
        "reused": MetadataValue.json({k: made[k] for k in ("run_id", "seconds", "rows", "figures") if k in made}),
        **({DETAILS: MetadataValue.json(step.details)} if step.details else {}),
    }


def _several(results: Mapping[str, PartitionResult], seconds: float, noun: str, step: Report) -> dict[str, Any]:
    computed = {p: r for p, r in results.items() if not r.cache_hit}
    lines = []
    for p, r in results.items():
        if r.cache_hit:
            lines.append(f"{p}: cache hit, output of {run_text(r.made.get('run_id'))} reused")
        else:
            lines.append(f"{p}: {count_text(r.ref.rows)} {noun} computed" + (
                f" ({'; '.join(r.report.summary)})" if r.report.summary else ""))
    rows = sum(r.ref.rows for r in computed.values())
    headline = (f"{len(results)} sources in {seconds_text(seconds)}: {len(computed)} computed, "
                f"{len(results) - len(computed)} cache hits")
    metadata: dict[str, Any] = {
        SUMMARY: MetadataValue.md(summary_markdown(headline, lines + step.summary)),
        "cache_hit": not computed, "partitions_computed": len(computed),
        "partitions_reused": len(results) - len(computed),
    }
    if computed:  # a rate only over what was computed
        metadata["duration_seconds"] = MetadataValue.float(rounded(seconds))
        metadata["rows_per_second"] = MetadataValue.float(rounded(rows / seconds) if seconds > 0 else 0.0)
    metadata.update(step.metadata)
    metadata["partitions"] = MetadataValue.json({
        p: {"rows": r.ref.rows, "sha256": r.ref.sha256, "cache_hit": r.cache_hit, "cache_key": r.cache_key,
            **({"reused_run_id": r.made.get("run_id")} if r.cache_hit else {}),
            **json_safe(plain_values(r.report.metadata))}
        for p, r in results.items()})
    metadata[DETAILS] = MetadataValue.json({
        **{p: r.report.details for p, r in computed.items() if r.report.details}, **step.details})
    return metadata


def partitions_metadata(results: Mapping[str, PartitionResult], seconds: float, noun: str,
                        step: Report | None = None) -> dict[str, Any]:
    """The metadata of a source stage's materialization: one partition computed or reused, or several."""
    step = step or Report()
    if len(results) == 1:
        [(partition, result)] = results.items()
        return (_hit if result.cache_hit else _fresh)(partition, result, seconds, noun, step)
    return _several(results, seconds, noun, step)


def rate_line(count: int, noun: str, seconds: float) -> str:
    return f"{count_text(count)} {noun} at {rate_text(count / seconds, noun)}" if seconds > 0 else \
        f"{count_text(count)} {noun}"


def unchanged_since(context: AssetExecutionContext, cache_key: str, limit: int = 50) -> dict[str, Any]:
    """How the content under this cache key was first recorded, for an asset whose output lives in a store
    rather than a file (Milvus): the run that wrote it, the run an earlier hit named, or else the first
    materialization that found it in place. Empty when none of the recent ones had this key."""
    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey(context.asset_key.path)), limit=limit).records
    oldest = None
    for record in records:
        materialization = record.event_log_entry.asset_materialization
        meta = materialization.metadata if materialization is not None else {}
        key = meta.get("cache_key")
        if key is None or key.value != cache_key:
            break  # the content changed before this one: nothing earlier counts
        if "cache_hit" in meta and meta["cache_hit"].value is False:
            return {"run_id": record.event_log_entry.run_id, "made_at": record.event_log_entry.timestamp}
        if "reused_run_id" in meta:
            return {"run_id": meta["reused_run_id"].value,
                    **({"made_at": meta["reused_made_at"].value} if "reused_made_at" in meta else {})}
        oldest = record.event_log_entry
    return {"run_id": oldest.run_id, "made_at": oldest.timestamp} if oldest is not None else {}
