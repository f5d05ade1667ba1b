"""Stage 3, sharded: one source's chunks embedded by parallel steps of one run, shown by Dagster as the one
`embeddings` asset (a graph-backed asset with dynamic fan-out).

    plan    (light)   splits each partition's chunks into shards by document id (quiver/shards.py)
    shard   (model)   embeds one shard, through the embedding cache; an unchanged shard reuses its output
    merge   (io)      one FileRef naming the partition's embedding shards, in shard order

The shard steps carry the `model` memory class, so the executor's memory-bound tag limits decide how many
run at once. They do not write Milvus: milvus_collection synchronizes the partition from the merged output.
Used in place of the one-step asset when QUIVER_EMBED_SHARD_ROWS is set (platform_defs/definitions.py).
"""

import os
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

from dagster import (
    AssetKey,
    Config,
    DynamicOut,
    DynamicOutput,
    MetadataValue,
    OpExecutionContext,
    Out,
    Output,
    graph_asset,
    op,
)
from pydantic import Field

from assets.common import (
    OWNERS,
    STORAGE_KIND,
    fail_fast_unless_transient,
    memory_class,
    partitioned_output,
    refs_by_partition,
    single_run_backfill,
    sources_partitions,
)
from assets.embed_pipeline import embed_partition_vectors
from assets.embeddings import EMBEDDINGS_DESCRIPTION, EmbeddingsConfig
from assets.reporting import PartitionResult, Report
from quiver.errors import ConfigError
from quiver.hashing import sha256_json
from quiver.names import check_source_name
from quiver.shards import shard_count, split_batches
from quiver.vectors import CHUNK_COLUMNS, embeddings_schema
from resources.embedding_cache import CacheStats, EmbeddingCache
from resources.fileref import FileRef, FileStore, shard_ref
from resources.model_pool import ModelPool

SHARD_ROWS_ENV = "QUIVER_EMBED_SHARD_ROWS"
EMBEDDINGS = AssetKey("embeddings")
CHUNK_SHARDS = ["embeddings", "_chunk_shards"]  # where each partition's chunk shards are written
SHARDS = ["embeddings", "_shards"]  # where its embedding shards are


def shard_rows_from_env() -> int:
    return int(os.environ.get(SHARD_ROWS_ENV) or 0)


class ShardPlanConfig(Config):
    shard_rows: int = Field(default=0, ge=0, description="Rows per shard on average (a power of two of shards "
                            "is chosen); 0: QUIVER_EMBED_SHARD_ROWS.")


def _op_args(memory: str) -> dict[str, Any]:
    args = memory_class(memory)
    return {"tags": args["op_tags"], "pool": args["pool"], "retry_policy": args["retry_policy"]}


def _code_version(context: OpExecutionContext) -> str:
    version = context.assets_def.code_versions_by_key.get(EMBEDDINGS)
    if not version:  # an empty version would let a shard's output outlive a code change
        raise ConfigError("embeddings has no code version: build the assets with assets.common.with_code_versions")
    return version


def _partitions(context: OpExecutionContext) -> list[str]:
    return [check_source_name(key, "partition key") for key in context.partition_keys]


@op(out=DynamicOut(), **_op_args("light"))
@fail_fast_unless_transient
def plan_embedding_shards(context: OpExecutionContext, config: ShardPlanConfig, chunks: Any,
                          store: FileStore) -> Iterator[DynamicOutput[dict[str, Any]]]:
    """Each partition's chunks, split into shard files by document id; one dynamic output per shard."""
    rows_per_shard = config.shard_rows or shard_rows_from_env()
    upstream = refs_by_partition(chunks, _partitions(context))
    for position, partition in enumerate(_partitions(context)):
        ref = upstream[partition]
        previous = store.read_latest(["embeddings"], partition)
        count = shard_count(ref.rows, rows_per_shard, len(previous.parts) if previous is not None else 0)
        schema = store.parquet_schema(ref)
        with ExitStack() as stack:  # a failure aborts every shard file: none is left that anything trusts
            opened = [stack.enter_context(store.parquet_writer(CHUNK_SHARDS, partition, schema, prune=False))
                      for _ in range(count)]
            for shard, batch in split_batches(store.iter_batches(ref, 8192), count):
                opened[shard].write_batch(batch)
        refs = [w.ref for w in opened]
        store.prune_shards(str(store.asset_dir(CHUNK_SHARDS, partition)), refs)
        context.log.info(f"embeddings[{partition}]: {ref.rows} chunks in {count} shard(s) of "
                         f"{[r.rows for r in refs]} rows")
        for shard, shard_chunks in enumerate(refs):
            yield DynamicOutput({"partition": partition, "shard": shard, "of": count,
                                 "chunks": shard_chunks.to_json(), "source_chunks": ref.sha256},
                                mapping_key=f"p{position}_{re.sub(r'[^A-Za-z0-9_]', '_', partition)}_{shard}")


class ShardConfig(EmbeddingsConfig):
    """The one-step asset's settings, for each shard step (write_milvus is not used: merge leaves Milvus to
    milvus_collection)."""


@op(**_op_args("model"))
@fail_fast_unless_transient
def embed_shard(context: OpExecutionContext, config: ShardConfig, shard: dict[str, Any], store: FileStore,
                model_pool: ModelPool, embedding_cache: EmbeddingCache) -> dict[str, Any]:
    """One shard's embeddings; the output of an unchanged shard (same chunks, code and model) is reused."""
    partition, chunks = shard["partition"], store.check(FileRef.from_json(shard["chunks"]))
    key = sha256_json({"code_version": _code_version(context), "chunks": chunks.sha256,
                       "model": model_pool.fingerprint(), "partition": partition})[:32]
    cached = None if config.force else store.cached_output(SHARDS, partition, key)
    if cached is not None:
        context.log.info(f"embeddings[{partition}] shard {shard['shard']}: cache hit, {cached[0].rows} rows")
        return {**shard, "ref": cached[0].to_json(), "cache_hit": True, "texts_encoded": 0, "cache_found": 0}
    started, before, stats = time.perf_counter(), model_pool.metrics(), CacheStats()
    schema = embeddings_schema(model_pool.dimension(), model_pool.fingerprint())
    with store.parquet_writer(SHARDS, partition, schema, prune=False) as writer:
        embed_partition_vectors(store.iter_batches(chunks, config.texts_per_batch, columns=CHUNK_COLUMNS),
                                partition, chunks.rows, pool=model_pool, cache=embedding_cache, stats=stats,
                                writer=writer, milvus=None, settings=config.pipeline())
    assert writer.ref is not None
    store.remember_fileref(SHARDS, partition, key, writer.ref, {"run_id": context.run.run_id})
    encoded = model_pool.metrics().minus(before).texts
    context.log.info(f"embeddings[{partition}] shard {shard['shard']}: {writer.ref.rows} rows, {encoded} encoded "
                     f"in {time.perf_counter() - started:.2f} s")
    return {**shard, "ref": writer.ref.to_json(), "cache_hit": False, "texts_encoded": encoded,
            "cache_found": stats.found()}


@op(out=Out(io_manager_key="fileref_io_manager"), **_op_args("io"))
@fail_fast_unless_transient
def merge_embedding_shards(context: OpExecutionContext, shards: list[dict[str, Any]],
                           store: FileStore) -> Output[Any]:
    """Each partition's shards as one FileRef, in shard order; its earlier shards that no output names go."""
    started, results = time.perf_counter(), {}
    for partition in _partitions(context):
        mine = sorted((s for s in shards if s["partition"] == partition), key=lambda s: s["shard"])
        refs = [FileRef.from_json(s["ref"]) for s in mine]
        merged = shard_ref(str(store.asset_dir(SHARDS, partition)), refs)
        previous = store.read_latest(["embeddings"], partition)
        store.prune_shards(merged.path, [merged, *([previous] if previous is not None and previous.parts else [])])
        encoded, hits = sum(s["texts_encoded"] for s in mine), sum(s["cache_hit"] for s in mine)
        rows = merged.rows
        found = sum(s["cache_found"] for s in mine)
        report = Report(metadata={
            "chunks": rows, "shards": len(mine), "shards_reused": hits, "texts_encoded": encoded,
            "embedding_cache_hit_rate": MetadataValue.float(round(found / rows, 4) if rows else 0.0),
            "milvus_deferred": "sharded: milvus_collection writes this source's vectors"},
            summary=[f"{len(mine)} shard(s) embedded by parallel steps, {hits} reused unchanged; "
                     f"{encoded:,} texts encoded",
                     "Milvus: written by milvus_collection from these shards"],
            details={"shards": [{"shard": s["shard"], "rows": FileRef.from_json(s["ref"]).rows,
                                 "cache_hit": s["cache_hit"], "texts_encoded": s["texts_encoded"]} for s in mine]})
        results[partition] = PartitionResult(merged, False, merged.sha256, report)
    return partitioned_output(started, results, noun="chunks")


@graph_asset(
    name="embeddings",
    partitions_def=sources_partitions,
    backfill_policy=single_run_backfill,
    group_name="ingest",
    kinds={"parquet", "pytorch", "huggingface"},
    owners=OWNERS,
    tags={STORAGE_KIND: "parquet"},
    description=EMBEDDINGS_DESCRIPTION + "\n\nSharded: each source's chunks are embedded by parallel shard steps "
                                         "(QUIVER_EMBED_SHARD_ROWS rows each) and merged into one FileRef.",
)
def sharded_embeddings(chunks: Any) -> Any:
    return merge_embedding_shards(plan_embedding_shards(chunks).map(embed_shard).collect())
