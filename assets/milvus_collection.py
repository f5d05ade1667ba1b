"""Stage 4b: the same vectors in a Milvus collection, synchronized exactly by deterministic ids."""

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from dagster import (
    AssetExecutionContext,
    Config,
    DataVersion,
    MaterializeResult,
    MetadataValue,
)
from pydantic import Field

from assets.common import run_metadata
from assets.indexes_common import (
    HeldVectors,
    diff_index,
    embedding_dimension,
    index_stage,
    iter_rows,
    partition_digest,
    reconciliation_check,
    skipped_metadata,
)
from assets.reporting import SUMMARY, run_link, unchanged_since
from quiver.hashing import sha256_json
from quiver.report import run_text, seconds_text, summary_markdown
from quiver.vectors import rows_for_milvus
from resources.fileref import FileRef, FileStore
from resources.fileref_io import PartitionRefs
from resources.milvus_store import MilvusStore
from resources.model_pool import ModelPool


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


@index_stage(kinds={"milvus"}, storage="milvus",
             description="Milvus collection (Milvus Lite by default) holding exactly one vector per current chunk. "
                         "Each source carries an exact mark (a digest of its ids and vector keys) that every write "
                         "clears and a completed sync sets: a source whose mark matches its embeddings is not "
                         "listed again.")
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
            made = unchanged_since(context, version.value)
            lines = ["Every source's exact mark matches its embeddings: the collection already holds exactly "
                     "these vectors (written by the embeddings steps or an earlier sync)",
                     f"Unchanged since {run_text(made.get('run_id'))}" if made else
                     "No earlier materialization of this content to name: the embeddings steps wrote it",
                     f"{expected:,} vectors in {milvus.collection!r} ({milvus.index_type}, inner product)"]
            return MaterializeResult(data_version=version, metadata={
                SUMMARY: MetadataValue.md(summary_markdown("In sync: nothing written", lines)),
                "cache_hit": True, "cache_key": version.value, **run_link(made.get("run_id")),
                **({"reused_made_at": MetadataValue.timestamp(made["made_at"])} if made.get("made_at") else {}),
                "vectors": expected, "index_type": milvus.index_type, "collection": milvus.collection,
                **skipped_metadata(embeddings, milvus.count() - expected)})
    milvus.ensure_collection(embedding_dimension(store, embeddings) or model_pool.dimension())
    report = sync_collection(milvus, store, embeddings, digests, config.force)
    if milvus.count(excluding=skipped) != expected:
        # A mark said exact but the count disagrees: something wrote behind Quiver's back. Compare everything.
        context.log.warning("milvus_collection: the collection's count disagrees with its exact marks; "
                            "comparing every source")
        report = sync_collection(milvus, store, embeddings, digests, force=True)
    compaction = milvus.compact() if config.compact else None
    if compaction not in (None, "Completed", "UndefiedState"):
        context.log.warning(f"milvus_collection: compaction did not complete in time (state {compaction}); Milvus "
                            "goes on with it in the background")
    total = milvus.count()
    context.log.info(f"milvus_collection: +{report.upserted} -{report.deleted} ={report.unchanged}, sources synced "
                     f"{report.synced_sources or 'none'}, removed {report.removed_sources or 'none'}; {total} "
                     f"vectors in {milvus.collection!r}")
    lines = [f"{report.upserted:,} vectors upserted, {report.deleted:,} deleted, {report.unchanged:,} unchanged",
             f"Sources synced: {', '.join(report.synced_sources) or 'none'}; removed: "
             f"{', '.join(report.removed_sources) or 'none'}",
             f"{total:,} vectors in {milvus.collection!r} ({milvus.index_type}, inner product)"]
    if embeddings.skipped:
        lines.append(f"{len(embeddings.skipped)} sources without a good output skipped: see `skipped_sources`")
    return MaterializeResult(
        data_version=version,
        metadata={SUMMARY: MetadataValue.md(summary_markdown(
            f"Synchronized Milvus in {seconds_text(time.perf_counter() - started)}", lines)),
            **run_metadata(started, report.upserted, {
            "cache_hit": False, "cache_key": version.value, "upserted": report.upserted, "deleted": report.deleted,
            "unchanged": report.unchanged,
            "vectors": expected, "collection_count": total,
            "synced_sources": MetadataValue.json(report.synced_sources),
            "removed_sources": MetadataValue.json(report.removed_sources),
            **skipped_metadata(embeddings, total - expected),
            "uri": milvus.uri if "://" in milvus.uri else MetadataValue.path(milvus.uri),
            "collection": milvus.collection,
            "index_type": milvus.index_type,
            **({"compaction": compaction} if compaction is not None else {}),
        })},
    )


def _milvus_held(milvus: MilvusStore, skipped: set[str]) -> HeldVectors:
    protected = {vid for vid, _, _ in milvus.key_rows(including=skipped)}
    return HeldVectors(milvus.iter_keys(), protected, count=milvus.count() if milvus.exists() else 0,
                       metadata={"collection": milvus.collection})


milvus_collection_matches_chunks = reconciliation_check(milvus_collection, "matches_chunks",
                                                        "Milvus", "milvus", _milvus_held,
                                                        holder="The Milvus collection")
