"""Stage 4b: the same vectors in a Milvus collection, synchronized exactly by deterministic ids."""

import time
from collections.abc import Mapping

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

from assets.common import memory_class, run_metadata, stage_cache_key, stage_code_version
from assets.indexes_common import (
    diff_index,
    embedding_dimension,
    expected_vectors,
    iter_rows,
    partitions_hashes,
    reconcile,
)
from resources.fileref import FileRef, FileStore
from resources.model_pool import ModelPool
from resources.vector_stores import MilvusStore, rows_for_milvus

CODE_VERSION = stage_code_version(__name__)


class MilvusCollectionConfig(Config):
    force: bool = False
    compact: bool = Field(default=False, description="Compact the collection after synchronizing it (the nightly "
                                                     "maintenance schedule asks for it).")


def sync_collection(milvus: MilvusStore, store: FileStore, embeddings: Mapping[str, FileRef],
                    dimension: int) -> tuple[dict[str, int], str]:
    """Upsert new or changed vectors, delete vectors of chunks that no longer exist, leave the rest.

    Reads the vectors of changed rows only. Returns the counts and the content hash of what the collection
    now holds.
    """
    milvus.ensure_collection(dimension)
    diff = diff_index(store, embeddings, milvus.existing_keys())
    upserted = 0
    for batch in iter_rows(store, embeddings, diff.to_write):
        upserted += milvus.upsert_rows(list(rows_for_milvus(batch)))
    deleted = milvus.delete_ids(diff.stale)
    counts = {"upserted": upserted, "deleted": deleted, "unchanged": diff.unchanged, "vectors": len(diff.desired)}
    return counts, diff.content_hash()


@asset(
    ins={"embeddings": AssetIn()},
    code_version=CODE_VERSION,
    # After sources are (re)ingested, by the inbox sensor or anyone, the automation daemon brings the index up
    # to date once no source is still being ingested.
    automation_condition=AutomationCondition.eager(),
    group_name="index",
    kinds={"milvus"},
    **memory_class("io"),
    description="Milvus collection (Milvus Lite by default) holding exactly one vector per current chunk.",
)
def milvus_collection(
    context: AssetExecutionContext, config: MilvusCollectionConfig, embeddings: dict[str, FileRef],
    store: FileStore, milvus: MilvusStore, model_pool: ModelPool,
) -> MaterializeResult:
    started = time.perf_counter()
    key = stage_cache_key("milvus_collection", None, CODE_VERSION, partitions_hashes(embeddings),
                          {"uri": milvus.uri, "db": milvus.db_name, "collection": milvus.collection,
                           "index_type": milvus.index_type})
    asset_path = context.asset_key.path
    expected = sum(ref.rows for ref in embeddings.values())
    cached = store.cache_get(asset_path, None, key)
    if cached and not (config.force or config.compact) and milvus.exists() and milvus.count() == expected:
        context.log.info(f"milvus_collection: cache hit {key}, {expected} vectors already in place")
        return MaterializeResult(data_version=DataVersion(cached["content_hash"]),
                                 metadata={"cache_hit": True, "cache_key": key, "vectors": expected})
    dimension = embedding_dimension(store, embeddings) or model_pool.dimension()
    counts, digest = sync_collection(milvus, store, embeddings, dimension)
    if config.compact:
        milvus.compact()
    total = milvus.count()
    store.cache_put(asset_path, None, key, {"content_hash": digest, "vectors": total})
    context.log.info(f"milvus_collection: {counts} -> {total} vectors in {milvus.collection!r}")
    return MaterializeResult(
        data_version=DataVersion(digest),
        metadata=run_metadata(started, counts["upserted"], {
            "cache_hit": False, "cache_key": key, **counts, "collection_count": total,
            "uri": milvus.uri if "://" in milvus.uri else MetadataValue.path(milvus.uri),
            "collection": milvus.collection,
        }),
    )


@asset_check(asset=milvus_collection, additional_ins={"chunks": AssetIn("chunks")}, blocking=True,
             **memory_class("io"),
             description="The Milvus collection holds exactly one vector per current chunk: none missing, none "
                         "stale or out of date, none twice.")
def milvus_collection_matches_chunks(chunks: dict[str, FileRef], store: FileStore, milvus: MilvusStore,
                                     model_pool: ModelPool) -> AssetCheckResult:
    expected = expected_vectors(store, chunks, model_pool.fingerprint())
    found = reconcile("Milvus", expected, milvus.iter_keys())
    # Rows the iterator collapsed (one primary key stored twice) still show in the collection's count.
    found.duplicates += max(0, (milvus.count() if milvus.exists() else 0) - found.held)
    return AssetCheckResult(passed=found.exact, description=found.describe(),
                            metadata={**found.metadata(), "collection": milvus.collection})
