"""Stage 3: encode chunk texts with the shared model pool, through the embedding cache."""

import sys
import time
from typing import Any

import numpy as np
import pyarrow as pa
from dagster import AssetExecutionContext, Config, Output
from pydantic import Field
from tqdm import tqdm

from assets.common import (
    PartitionResult,
    partitioned_output,
    partitions_in_run,
    refs_by_partition,
    source_stage,
    stage_cache_key,
    stage_code_version,
)
from quiver.hashing import sha256_text, vector_id
from resources.embedding_cache import CacheStats, EmbeddingCache, encode_with_cache
from resources.fileref import FileRef, FileStore
from resources.model_pool import ModelPool, metrics_metadata

CODE_VERSION = stage_code_version(__name__)
CHUNK_COLUMNS = ["chunk_id", "doc_id", "title", "text", "chunk_hash"]


def embeddings_schema(dimension: int) -> pa.Schema:
    return pa.schema([
        ("vector_id", pa.int64()),
        ("chunk_id", pa.string()),
        ("doc_id", pa.string()),
        ("source", pa.string()),
        ("title", pa.string()),
        ("text", pa.string()),
        ("chunk_hash", pa.string()),
        ("vector_key", pa.string()),
        ("vector", pa.list_(pa.float32(), dimension)),
    ])


def vector_key(model_fingerprint: str, chunk_hash: str) -> str:
    """Identifies a vector's content: the model and the exact text encoded."""
    return sha256_text(f"{model_fingerprint}\x00{chunk_hash}")[:32]


def embeddings_batch(chunk_batch: pa.RecordBatch, vectors: np.ndarray, source: str, fingerprint: str,
                     schema: pa.Schema) -> pa.RecordBatch:
    chunk_ids = chunk_batch.column("chunk_id").to_pylist()
    hashes = chunk_batch.column("chunk_hash").to_pylist()
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    return pa.RecordBatch.from_arrays([
        pa.array([vector_id(source, c) for c in chunk_ids], pa.int64()),
        chunk_batch.column("chunk_id"),
        chunk_batch.column("doc_id"),
        pa.array([source] * len(chunk_ids), pa.string()),
        chunk_batch.column("title"),
        chunk_batch.column("text"),
        chunk_batch.column("chunk_hash"),
        pa.array([vector_key(fingerprint, h) for h in hashes], pa.string()),
        pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]),
    ], schema=schema)


class EmbeddingsConfig(Config):
    texts_per_batch: int = Field(default=2048, description="Chunks read, looked up and encoded per batch.")
    force: bool = False


def embed_partition(context: AssetExecutionContext, partition: str, chunks: FileRef, config: EmbeddingsConfig,
                    store: FileStore, model_pool: ModelPool, cache: EmbeddingCache,
                    stats: CacheStats) -> PartitionResult:
    fingerprint = model_pool.fingerprint()
    key = stage_cache_key("embeddings", partition, CODE_VERSION, {"chunks": chunks.sha256},
                          {"model": fingerprint, "source": partition})
    cached = None if config.force else store.cached_fileref(["embeddings"], partition, key)
    if cached is not None:
        context.log.info(f"embeddings[{partition}]: cache hit {key}, 0 texts encoded")
        return PartitionResult(cached, True, key)
    schema = embeddings_schema(model_pool.dimension())
    progress = tqdm(total=chunks.rows, desc=f"embeddings[{partition}]", unit="chunk",
                    disable=not sys.stderr.isatty(), file=sys.stderr)
    done = 0
    with store.parquet_writer(["embeddings"], partition, schema) as writer:
        for batch in store.iter_batches(chunks, config.texts_per_batch, columns=CHUNK_COLUMNS):
            vectors = encode_with_cache(model_pool, cache, batch.column("text").to_pylist(), stats)
            writer.write_batch(embeddings_batch(batch, vectors, partition, fingerprint, schema))
            done += batch.num_rows
            progress.update(batch.num_rows)
            context.log.info(f"embeddings[{partition}]: {done}/{chunks.rows} chunks")
    progress.close()
    assert writer.ref is not None
    store.remember_fileref(["embeddings"], partition, key, writer.ref)
    return PartitionResult(writer.ref, False, key, {"chunks": chunks.rows})


@source_stage(
    memory_class="model",
    kinds={"parquet", "pytorch"},
    description="One L2-normalized float32 vector per chunk, with its deterministic vector id.",
    code_version=CODE_VERSION,
)
def embeddings(
    context: AssetExecutionContext, config: EmbeddingsConfig, chunks: Any, store: FileStore,
    model_pool: ModelPool, embedding_cache: EmbeddingCache,
) -> Output[Any]:
    started = time.perf_counter()
    before = model_pool.metrics()
    stats = CacheStats()
    upstream = refs_by_partition(chunks, partitions_in_run(context))
    results = {p: embed_partition(context, p, upstream[p], config, store, model_pool, embedding_cache, stats)
               for p in partitions_in_run(context)}
    delta = model_pool.metrics().minus(before)
    return partitioned_output(started, results, {
        **metrics_metadata(delta), **stats.as_metadata(), **model_pool.describe(),
    })
