"""Stage 4b: the same vectors in a Milvus collection, synchronized exactly by deterministic ids."""

import time
from collections.abc import Mapping

import numpy as np
from dagster import (
    AssetExecutionContext,
    AssetIn,
    Config,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    asset,
)

from assets.common import MEMORY_TAG, run_metadata, stage_cache_key, stage_code_version
from assets.indexes_common import content_hash, embedding_dimension, iter_embedding_batches, partitions_hashes
from resources.fileref import FileRef, FileStore
from resources.model_pool import ModelPool
from resources.vector_stores import MilvusStore, rows_for_milvus

CODE_VERSION = stage_code_version(__name__)


class MilvusCollectionConfig(Config):
    force: bool = False


def sync_collection(milvus: MilvusStore, store: FileStore, embeddings: Mapping[str, FileRef],
                    dimension: int) -> tuple[dict[str, int], str]:
    """Upsert new or changed vectors, delete vectors of chunks that no longer exist, leave the rest.

    Returns the counts and the content hash of what the collection now holds, from the same single read.
    """
    milvus.ensure_collection(dimension)
    existing = milvus.existing_keys()
    desired: set[int] = set()
    all_ids: list[int] = []
    all_keys: list[str] = []
    pending = []
    upserted = 0
    for batch in iter_embedding_batches(store, embeddings):
        ids = batch.column("vector_id").to_pylist()
        keys = batch.column("vector_key").to_pylist()
        desired.update(ids)
        all_ids.extend(ids)
        all_keys.extend(keys)
        changed = [i for i, (vid, k) in enumerate(zip(ids, keys, strict=True)) if existing.get(vid) != k]
        if changed:
            pending.extend(rows_for_milvus(batch.take(changed)))
        if len(pending) >= milvus.insert_batch_size:
            upserted += milvus.upsert_rows(pending)
            pending = []
    upserted += milvus.upsert_rows(pending)
    stale = [vid for vid in existing if vid not in desired]
    deleted = milvus.delete_ids(stale)
    counts = {"upserted": upserted, "deleted": deleted, "unchanged": len(desired) - upserted,
              "vectors": len(desired)}
    return counts, content_hash(np.asarray(all_ids, dtype=np.int64), all_keys)


@asset(
    ins={"embeddings": AssetIn()},
    code_version=CODE_VERSION,
    group_name="index",
    kinds={"milvus"},
    op_tags={MEMORY_TAG: "io"},
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
    if cached and not config.force and milvus.exists() and milvus.count() == expected:
        context.log.info(f"milvus_collection: cache hit {key}, {expected} vectors already in place")
        return MaterializeResult(data_version=DataVersion(cached["content_hash"]),
                                 metadata={"cache_hit": True, "cache_key": key, "vectors": expected})
    dimension = embedding_dimension(store, embeddings) or model_pool.dimension()
    counts, digest = sync_collection(milvus, store, embeddings, dimension)
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
