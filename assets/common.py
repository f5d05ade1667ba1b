"""What every stage shares: the sources partitioning, code versions, cache keys and run metadata.

The document-level stages have a single-run backfill policy: one run may materialize many source
partitions (one model load for all of them), so each stage computes a result per partition.
"""

import resource
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetsDefinition,
    BackfillPolicy,
    BetaWarning,
    DataVersion,
    DynamicPartitionsDefinition,
    MetadataValue,
    Output,
    PreviewWarning,
    asset,
)

from quiver.codeversion import stage_version
from quiver.hashing import sha256_json
from quiver.memory import MEMORY_TAG, pool_name
from resources.fileref import FileRef

# Output(data_version=...) is how a materialization carries its content hash; it is beta in 1.13.
warnings.filterwarnings("ignore", category=BetaWarning)
# Asset checks partitioned like their asset (one verdict per source) are a preview feature in 1.13.
warnings.filterwarnings("ignore", category=PreviewWarning)

sources_partitions = DynamicPartitionsDefinition(name="sources")
# A backfill over many sources runs once, so the model is loaded once for all of them.
single_run_backfill = BackfillPolicy.single_run()

# With the Celery executor, a step goes to the queue named by this tag: one queue per memory class, served by
# the workers that have the memory (or GPU) for it.
CELERY_QUEUE_TAG = "dagster-celery/queue"


def memory_class(name: str) -> dict[str, Any]:
    """@asset arguments of a step of a memory class: the op tag (limits within a run), its concurrency pool
    (the same limit across runs) and, on Celery, its queue."""
    return {"op_tags": {MEMORY_TAG: name, CELERY_QUEUE_TAG: name}, "pool": pool_name(name)}


# Which stage reads which: a stage's code version includes its upstream stages' versions, so the UI
# marks a stage and everything downstream of it stale when its code changes.
STAGE_UPSTREAM: dict[str, tuple[str, ...]] = {
    "assets.documents": (),
    "assets.chunks": ("assets.documents",),
    "assets.embeddings": ("assets.chunks",),
    "assets.faiss_index": ("assets.embeddings",),
    "assets.milvus_collection": ("assets.embeddings",),
    "assets.retrieval_eval": ("assets.faiss_index", "assets.milvus_collection"),
}


def stage_code_version(module: str) -> str:
    return stage_version(module, STAGE_UPSTREAM)


def source_stage(*, memory: str, kinds: set[str], description: str, code_version: str):  # noqa: ANN201
    """@asset for a document-level stage: partitioned by source, single-run backfills, FileRef outputs."""

    def decorate(fn) -> AssetsDefinition:  # noqa: ANN001
        return asset(
            partitions_def=sources_partitions,
            backfill_policy=single_run_backfill,
            code_version=code_version,
            io_manager_key="fileref_io_manager",
            group_name="ingest",
            kinds=kinds,
            description=description,
            **memory_class(memory),
        )(fn)

    return decorate


def partitions_in_run(context: AssetExecutionContext) -> list[str]:
    """The source partitions this run materializes: one, or a range in a single-run backfill."""
    return list(context.partition_keys)


def refs_by_partition(value: FileRef | Mapping[str, FileRef], partitions: list[str]) -> dict[str, FileRef]:
    """An upstream input as {partition: FileRef}, whether one partition or many were loaded."""
    if isinstance(value, FileRef):
        return {partitions[0]: value}
    return dict(value)


def stage_cache_key(
    asset: str,
    partition: str | None,
    code_version_: str,
    inputs: Mapping[str, Any],
    config: Mapping[str, Any],
) -> str:
    """Same code, same upstream data versions, same config, same partition -> same key."""
    return sha256_json({
        "asset": asset,
        "partition": partition,
        "code_version": code_version_,
        "inputs": inputs,
        "config": config,
    })[:32]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_metadata(started: float, rows: int, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    seconds = time.perf_counter() - started
    return {
        "duration_seconds": MetadataValue.float(round(seconds, 3)),
        "rows_per_second": MetadataValue.float(round(rows / seconds, 1) if seconds > 0 else 0.0),
        "peak_rss_mb": MetadataValue.float(round(peak_rss_mb(), 1)),
        **(extra or {}),
    }


@dataclass
class PartitionResult:
    """One partition's output of a stage, and what happened computing it."""

    ref: FileRef
    cache_hit: bool
    cache_key: str
    metadata: dict[str, Any] = field(default_factory=dict)


def partitioned_output(started: float, results: Mapping[str, PartitionResult],
                       totals: Mapping[str, Any] | None = None) -> Output[Any]:
    """One partition: its FileRef, with its content hash as the data version. Several (a single-run
    backfill): {partition: FileRef}; Output takes one data version for all partitions, so Dagster records
    its logical version (code version + inputs) and each partition's content hash is in the metadata."""
    rows = sum(r.ref.rows for r in results.values())
    metadata = run_metadata(started, rows, {
        "cache_hit": all(r.cache_hit for r in results.values()),
        "cache_hits": sum(r.cache_hit for r in results.values()),
        **(totals or {}),
    })
    if len(results) == 1:
        [result] = results.values()
        metadata.update({"cache_key": result.cache_key, **result.metadata})
        return Output(result.ref, data_version=DataVersion(result.ref.sha256), metadata=metadata)
    metadata["partitions"] = MetadataValue.json({
        p: {"rows": r.ref.rows, "sha256": r.ref.sha256, "cache_hit": r.cache_hit, "cache_key": r.cache_key,
            **{k: v for k, v in r.metadata.items() if isinstance(v, int | float | str | bool)}}
        for p, r in results.items()
    })
    return Output({p: r.ref for p, r in results.items()}, metadata=metadata)
