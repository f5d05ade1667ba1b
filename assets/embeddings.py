"""Stage 3: encode chunk texts with the shared model pool, through the embedding cache, and put each
source's vectors into Milvus as they are made (the embed-and-insert pipeline, assets/embed_pipeline.py)."""

import time
from typing import Any, Literal

from dagster import AssetExecutionContext, Config, Output
from pydantic import Field

from assets.common import (
    PartitionResult,
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
from quiver.encoding import metrics_metadata
from quiver.vectors import CHUNK_COLUMNS, embeddings_schema
from resources.embedding_cache import CacheStats, EmbeddingCache
from resources.fileref import FileRef, FileStore
from resources.milvus_store import MilvusStore
from resources.model_pool import ModelPool, loads_in_this_process


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
                    store: FileStore, model_pool: ModelPool, cache: EmbeddingCache, milvus: MilvusStore,
                    stats: CacheStats) -> PartitionResult:
    def progress(done: int, so_far: PartitionVectors) -> None:
        context.log.info(f"embeddings[{partition}]: {done}/{chunks.rows} chunks, "
                         f"{so_far.upserted} vectors upserted into Milvus")

    def compute() -> tuple[FileRef, dict[str, Any]]:
        schema = embeddings_schema(model_pool.dimension(), model_pool.fingerprint())
        with store.parquet_writer(["embeddings"], partition, schema) as writer:
            result = embed_partition_vectors(
                store.iter_batches(chunks, config.texts_per_batch, columns=CHUNK_COLUMNS), partition, chunks.rows,
                pool=model_pool, cache=cache, stats=stats, writer=writer,
                milvus=milvus if config.write_milvus else None, settings=config.pipeline(), on_progress=progress)
        assert writer.ref is not None
        context.log.info(f"embeddings[{partition}]: {result.rows} chunks; Milvus: {result.upserted} upserted, "
                         f"{result.deleted} deleted, {result.unchanged} unchanged ({config.mode})")
        return writer.ref, {"chunks": chunks.rows, **result.as_metadata()}

    return cached_partition(context, store, partition, {"chunks": chunks.sha256},
                            {"model": model_pool.fingerprint(), "source": partition}, config.force, compute)


@source_stage(
    memory="model",
    kinds={"parquet", "pytorch"},
    description="One L2-normalized float32 vector per chunk, with its deterministic vector id; each source's "
                "vectors are upserted into Milvus as they are made.",
)
def embeddings(
    context: AssetExecutionContext, config: EmbeddingsConfig, chunks: Any, store: FileStore,
    model_pool: ModelPool, embedding_cache: EmbeddingCache, milvus: MilvusStore,
) -> Output[Any]:
    started = time.perf_counter()
    loads_before = loads_in_this_process()
    before = model_pool.metrics()
    stats = CacheStats()
    upstream = refs_by_partition(chunks, partitions_in_run(context))
    results = {p: embed_partition(context, p, upstream[p], config, store, model_pool, embedding_cache, milvus, stats)
               for p in partitions_in_run(context)}
    delta = model_pool.metrics().minus(before)
    return partitioned_output(started, results, {
        **metrics_metadata(delta), **stats.as_metadata(), **model_pool.describe(),
        # 0 when the process already held the model: a forkserver preload, or an earlier step on a Celery worker
        "model_loads_this_step": loads_in_this_process() - loads_before,
    })
