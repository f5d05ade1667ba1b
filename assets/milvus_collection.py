"""Stage 4b: the same vectors in a Milvus collection, synchronized exactly by deterministic ids."""

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    AssetIn,
    AutomationCondition,
    Config,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)
from pydantic import Field

from assets.common import fail_fast_unless_transient, memory_class, run_metadata
from assets.indexes_common import (
    compared_sources,
    diff_index,
    embedding_dimension,
    expected_vectors,
    iter_rows,
    partition_digest,
    reconcile,
    skipped_metadata,
)
from quiver.hashing import sha256_json
from resources.fileref import SKIP_MISSING_PARTITIONS, FileRef, FileStore, PartitionRefs
from resources.model_pool import ModelPool
from resources.vector_stores import MilvusStore, rows_for_milvus


class MilvusCollectionConfig(Config):
    force: bool = Field(default=False, description="Compare every source with the collection, even those whose "
                                                   "exact mark matches.")
    compact: bool = Field(default=False, description="Compact the collection after synchronizing it (the nightly "
                                                     "maintenance schedule asks for it).")


@dataclass
class SyncReport:
    upserted: int = 0
    deleted: int = 0
    unchanged: int = 0
    synced_sources: list[str] = field(default_factory=list)
    removed_sources: list[str] = field(default_factory=list)


def sync_source(milvus: MilvusStore, store: FileStore, source: str, ref: FileRef, digest: str,
                report: SyncReport) -> None:
    """Make one source's vectors exactly its embeddings: upsert new or changed ones (reading the vectors of
    those rows only), delete those whose chunk is gone, then mark the source exact."""
    one = {source: ref}
    diff = diff_index(store, one, milvus.existing_keys(source=source))
    for batch in iter_rows(store, one, diff.to_write):
        report.upserted += milvus.upsert_rows(list(rows_for_milvus(batch)))
    report.deleted += milvus.delete_ids(diff.stale, sources={source})
    report.unchanged += diff.unchanged
    report.synced_sources.append(source)
    milvus.mark_exact(source, digest)


def sync_collection(milvus: MilvusStore, store: FileStore, embeddings: PartitionRefs, digests: Mapping[str, str],
                    force: bool) -> SyncReport:
    """Bring every source with a good output up to date (those whose exact mark matches are skipped unless
    forced), delete the vectors of sources that no longer exist, and leave skipped sources as they are."""
    report = SyncReport()
    marks = {} if force else milvus.exact_marks()
    for source in sorted(embeddings):
        if marks.get(source) != digests[source]:
            sync_source(milvus, store, source, embeddings[source], digests[source], report)
    keep = set(embeddings) | set(embeddings.skipped)
    removed = [(vid, source) for vid, _, source in milvus.key_rows(excluding=keep)]
    if removed:
        report.removed_sources = sorted({source for _, source in removed})
        report.deleted += milvus.delete_ids([vid for vid, _ in removed], sources=set(report.removed_sources))
    return report


@asset(
    ins={"embeddings": AssetIn(metadata={SKIP_MISSING_PARTITIONS: True})},
    # After sources are (re)ingested, by the inbox sensor or anyone, the automation daemon brings the index up
    # to date once no source is still being ingested.
    automation_condition=AutomationCondition.eager(),
    group_name="index",
    kinds={"milvus"},
    **memory_class("io"),
    description="Milvus collection (Milvus Lite by default) holding exactly one vector per current chunk. Each "
                "source carries an exact mark (a digest of its ids and vector keys) that every write clears and "
                "a completed sync sets: a source whose mark matches its embeddings is not listed again.",
)
@fail_fast_unless_transient
def milvus_collection(
    context: AssetExecutionContext, config: MilvusCollectionConfig, embeddings: PartitionRefs,
    store: FileStore, milvus: MilvusStore, model_pool: ModelPool,
) -> MaterializeResult:
    started = time.perf_counter()
    digests = {p: partition_digest(store, ref) for p, ref in sorted(embeddings.items())}
    expected = sum(ref.rows for ref in embeddings.values())
    version = DataVersion(sha256_json(digests))
    skipped = set(embeddings.skipped)
    if not (config.force or config.compact) and milvus.exists():
        marks = milvus.exact_marks()
        in_sync = all(marks.get(p) == d for p, d in digests.items())
        if in_sync and milvus.count(excluding=skipped) == expected:
            context.log.info(f"milvus_collection: every source's exact mark matches, {expected} vectors in place")
            return MaterializeResult(data_version=version, metadata={
                "cache_hit": True, "cache_key": version.value, "vectors": expected, "collection": milvus.collection,
                **skipped_metadata(embeddings, milvus.count() - expected)})
    milvus.ensure_collection(embedding_dimension(store, embeddings) or model_pool.dimension())
    report = sync_collection(milvus, store, embeddings, digests, config.force)
    if milvus.count(excluding=skipped) != expected:
        # A mark said exact but the count disagrees: something wrote behind Quiver's back. Compare everything.
        context.log.warning("milvus_collection: the collection's count disagrees with its exact marks; "
                            "comparing every source")
        report = sync_collection(milvus, store, embeddings, digests, force=True)
    if config.compact:
        milvus.compact()
    total = milvus.count()
    context.log.info(f"milvus_collection: +{report.upserted} -{report.deleted} ={report.unchanged}, sources synced "
                     f"{report.synced_sources or 'none'}, removed {report.removed_sources or 'none'}; {total} "
                     f"vectors in {milvus.collection!r}")
    return MaterializeResult(
        data_version=version,
        metadata=run_metadata(started, report.upserted, {
            "cache_hit": False, "cache_key": version.value, "upserted": report.upserted, "deleted": report.deleted,
            "unchanged": report.unchanged,
            "vectors": expected, "collection_count": total,
            "synced_sources": MetadataValue.json(report.synced_sources),
            "removed_sources": MetadataValue.json(report.removed_sources),
            **skipped_metadata(embeddings, total - expected),
            "uri": milvus.uri if "://" in milvus.uri else MetadataValue.path(milvus.uri),
            "collection": milvus.collection,
        }),
    )


@asset_check(asset=milvus_collection, blocking=True, **memory_class("io"),
             additional_ins={"chunks": AssetIn("chunks", metadata={SKIP_MISSING_PARTITIONS: True}),
                             "embeddings": AssetIn("embeddings", metadata={SKIP_MISSING_PARTITIONS: True})},
             description="The Milvus collection holds exactly one vector per current chunk: none missing, none "
                         "stale or out of date, none twice.")
@fail_fast_unless_transient
def milvus_collection_matches_chunks(chunks: PartitionRefs, embeddings: PartitionRefs, store: FileStore,
                                     milvus: MilvusStore, model_pool: ModelPool) -> AssetCheckResult:
    compared, skipped = compared_sources(chunks, embeddings)
    expected = expected_vectors(store, compared, model_pool.fingerprint())
    protected = {vid for vid, _, _ in milvus.key_rows(including=set(skipped))}
    found = reconcile("Milvus", expected, milvus.iter_keys(), protected)
    found.skipped = skipped
    # Rows the iterator collapsed (one primary key stored twice) still show in the collection's count.
    held = (milvus.count() if milvus.exists() else 0) - found.left_as_they_are
    found.duplicates += max(0, held - found.held)
    return AssetCheckResult(passed=found.exact, description=found.describe(),
                            metadata={**found.metadata(), "collection": milvus.collection})
