"""Stage 3: encode chunk texts with the shared model pool, through the embedding cache, and put each
source's vectors into Milvus as they are made (the embed-and-insert pipeline, assets/embed_pipeline.py)."""

import time
from typing import Any, Literal

from dagster import AssetExecutionContext, Config, MetadataValue, Output
from pydantic import Field

from assets.common import (
    Computed,
    PartitionResult,
    Report,
    cached_partition,
    partitioned_output,
    partitions_in_run,
    refs_by_partition,
    source_stage,
)
from assets.embed_pipeline import (
    PartitionVectors,
    PipelineSettings,
    embed_partition_vectors,
)
from assets.reporting import rate_line
from quiver.encoding import PoolMetrics, metrics_metadata
from quiver.report import count_text, percent_text, rate_text, rounded, seconds_text
from quiver.vectors import CHUNK_COLUMNS, embeddings_schema
from resources.embedding_cache import LEVELS, CacheStats, EmbeddingCache
from resources.fileref import FileRef, FileStore
from resources.milvus_store import MilvusStore
from resources.model_pool import ModelPool, loads_in_this_process

EMBEDDINGS_DESCRIPTION = """One L2-normalized float32 vector per chunk, with its deterministic vector id; each source's
vectors are upserted into Milvus as they are made.

The materialization leads with a summary: time, encoding rate, the embedding cache's hit rate, where the model
was loaded and how long that took, and what Milvus got. The embedding cache has three levels, looked up in
order; a hit at a lower level fills the levels above it:

- **L1**, in-process memory (an LRU of `l1_max_bytes`): texts this process already embedded.
- **L2**, Redis (only when `QUIVER_REDIS_URL` is set): shared by every machine.
- **L3**, segment files under the storage root (`_embedding_cache/`): survive restarts.

A cache hit of the whole step (same code, chunks, model and source) reuses the output of the run it names
and encodes nothing; its figures are that run's. The counters of each level are in `details`."""


class EmbeddingsConfig(Config):
    mode: Literal["async", "sync"] = Field(
        default="async", description="async: read, tokenize, encode and insert overlap; sync: one batch at a time.")
    texts_per_batch: int = Field(default=256, ge=1, description="Chunks per pipeline item (read, looked up, "
                                 "tokenized, encoded and written together).")
    preprocess_workers: int = Field(default=1, ge=1, description="Threads that look texts up and tokenize them.")
    embedding_workers: int = Field(default=1, ge=1, description="Threads running forward passes, each on its "
                                   "own model instance (up to model_pool.instances).")
    queue_maxsize: int = Field(default=4, ge=1, description="Items waiting between two stages at most: bounds "
                               "memory, and makes a slow stage hold back the ones before it.")
    insert_batch_size: int = Field(default=512, ge=1, description="Rows per Milvus upsert request (requests are "
                                   "also kept under milvus.max_request_bytes).")
    write_milvus: bool = Field(default=True, description="Upsert this source's vectors into Milvus as they are "
                               "made; off: only milvus_collection writes Milvus.")
    force: bool = False

    def pipeline(self) -> PipelineSettings:
        return PipelineSettings(mode=self.mode, preprocess_workers=self.preprocess_workers,
                                embedding_workers=self.embedding_workers, queue_maxsize=self.queue_maxsize,
                                insert_batch_size=self.insert_batch_size)


def embed_partition(context: AssetExecutionContext, partition: str, chunks: FileRef, config: EmbeddingsConfig,
                    store: FileStore, model_pool: ModelPool, cache: EmbeddingCache,
                    milvus: MilvusStore) -> PartitionResult:
    def progress(done: int, so_far: PartitionVectors) -> None:
        context.log.info(f"embeddings[{partition}]: {done}/{chunks.rows} chunks, "
                         f"{so_far.upserted} vectors upserted into Milvus")

    def compute() -> Computed:
        before, stats = model_pool.metrics(), CacheStats()
        schema = embeddings_schema(model_pool.dimension(), model_pool.fingerprint())
        with store.parquet_writer(["embeddings"], partition, schema) as writer:
            result = embed_partition_vectors(
                store.iter_batches(chunks, config.texts_per_batch, columns=CHUNK_COLUMNS), partition, chunks.rows,
                pool=model_pool, cache=cache, stats=stats, writer=writer,
                milvus=milvus if config.write_milvus else None, settings=config.pipeline(), on_progress=progress)
        assert writer.ref is not None
        context.log.info(f"embeddings[{partition}]: {result.rows} chunks; Milvus: {result.upserted} upserted, "
                         f"{result.deleted} deleted, {result.unchanged} unchanged ({config.mode})")
        report = embedding_report(result, model_pool.metrics().minus(before), stats, cache.levels_enabled())
        return Computed(ref=writer.ref, metadata={"chunks": chunks.rows, **report.metadata}, summary=report.summary,
                        details=report.details)

    # texts_encoded on a hit: nothing was embedded now (the run it reuses did the embedding)
    return cached_partition(context, store, partition, {"chunks": chunks.sha256},
                            {"model": model_pool.fingerprint(), "source": partition}, config.force, compute,
                            hit_metadata={"texts_encoded": 0})


def embedding_report(result: PartitionVectors, delta: PoolMetrics, stats: CacheStats,
                     levels: dict[str, bool]) -> Report:
    """One partition's figures: the encoding rate, the embedding cache's hit rate, what Milvus got."""
    encoding = metrics_metadata(delta)
    found, rows = stats.found(), result.rows
    milvus = ({"milvus_deferred": result.deferred} if result.deferred else {
        "milvus_upserted": result.upserted, "milvus_deleted": result.deleted, "milvus_unchanged": result.unchanged})
    metadata = {
        "texts_encoded": delta.texts, "tokens_encoded": delta.tokens,
        **({"texts_per_second": MetadataValue.float(rounded(delta.texts / delta.encode_seconds)),
            "tokens_per_second": MetadataValue.float(rounded(delta.tokens / delta.encode_seconds))}
           if delta.texts and delta.encode_seconds else {}),
        "embedding_cache_hit_rate": MetadataValue.float(round(found / rows, 4) if rows else 0.0), **milvus,
    }
    if delta.texts and delta.encode_seconds:
        encoded = (f"Encoded {rate_line(delta.texts, 'texts', delta.encode_seconds)}, "
                   f"{rate_text(delta.tokens / delta.encode_seconds, 'tokens')}")
    else:
        encoded = "Encoded no text: every vector came from the embedding cache" if rows else "No chunks to embed"
    by_level = ", ".join(f"{level.upper()} {stats.hits[level]}" for level in LEVELS if levels[level])
    summary = [
        encoded,
        f"Embedding cache: {percent_text(found / rows) if rows else 'no texts'} hit ({count_text(found)} of "
        f"{count_text(rows)} texts; {by_level or 'every level off'})",
        f"Milvus: deferred, {result.deferred}" if result.deferred else
        f"Milvus: {count_text(result.upserted)} vectors upserted, {count_text(result.deleted)} deleted, "
        f"{count_text(result.unchanged)} unchanged",
    ]
    details = {"encoding": {k: v for k, v in encoding.items() if k not in metadata},
               "embedding_cache": stats.as_details(levels),
               "pipeline": result.report.as_metadata() if result.report else {}}
    return Report(metadata, summary, details)


def model_report(model_pool: ModelPool, loads: int) -> Report:
    """Where the model this step used was loaded and how long that took (a preloaded model too)."""
    facts = model_pool.describe()
    if not facts["model_loaded"]:  # every text was in the embedding cache: nothing to encode, no load
        return Report(metadata={"model_loads_this_step": 0},
                      summary=[f"Model {facts['model']}: not loaded, every text was in the embedding cache"],
                      details={"model": facts})
    where, seconds = facts["model_loaded_in"], rounded(facts["model_load_seconds"])
    line = (f"Model {facts['model']} ({facts['model_backend']}, {facts['model_device']}): loaded in "
            f"{seconds_text(seconds)} " + (f"by {where}; inherited, no load in this step" if facts["model_inherited"]
                                           else f"in {where}"))
    return Report(
        metadata={"model_loads_this_step": loads, "model_load_seconds": MetadataValue.float(seconds),
                  "model_loaded_in": where},
        summary=[line], details={"model": facts})


@source_stage(
    memory="model",
    kinds={"parquet", "pytorch", "huggingface"},
    description=EMBEDDINGS_DESCRIPTION,
)
def embeddings(
    context: AssetExecutionContext, config: EmbeddingsConfig, chunks: Any, store: FileStore,
    model_pool: ModelPool, embedding_cache: EmbeddingCache, milvus: MilvusStore,
) -> Output[Any]:
    started = time.perf_counter()
    loads_before = loads_in_this_process()
    partitions = partitions_in_run(context)  # once: each call looks the partitions up in the instance
    upstream = refs_by_partition(chunks, partitions)
    results = {p: embed_partition(context, p, upstream[p], config, store, model_pool, embedding_cache, milvus)
               for p in partitions}
    # A step that only reused outputs neither loaded the model nor says anything about it.
    step = None if all(r.cache_hit for r in results.values()) else model_report(
        model_pool, loads_in_this_process() - loads_before)  # 0 when the weights were inherited (a preload)
    return partitioned_output(started, results, noun="chunks", step=step)
