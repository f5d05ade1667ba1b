"""Stage 3: encode chunk texts with the shared model pool into normalized float32 vectors."""

import sys
import time

import numpy as np
import pyarrow as pa
from dagster import AssetExecutionContext, Config, DataVersion, MetadataValue, Output, asset
from pydantic import Field
from tqdm import tqdm

from assets.common import (
    MEMORY_TAG,
    partition_of,
    run_metadata,
    sources_partitions,
    stage_cache_key,
    stage_code_version,
)
from quiver.hashing import sha256_text, vector_id
from resources.fileref import FileRef, FileStore
from resources.model_pool import ModelPool

CODE_VERSION = stage_code_version(__name__)


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
    texts_per_batch: int = Field(default=2048, description="Chunks read and encoded per batch.")
    force: bool = False


@asset(
    partitions_def=sources_partitions,
    code_version=CODE_VERSION,
    io_manager_key="fileref_io_manager",
    group_name="ingest",
    kinds={"parquet", "pytorch"},
    op_tags={MEMORY_TAG: "model"},
    description="One L2-normalized float32 vector per chunk, with its deterministic vector id.",
)
def embeddings(
    context: AssetExecutionContext, config: EmbeddingsConfig, chunks: FileRef, store: FileStore,
    model_pool: ModelPool,
) -> Output[FileRef]:
    started = time.perf_counter()
    partition = partition_of(context)
    source = partition or "stdlib"
    fingerprint = model_pool.fingerprint()
    key = stage_cache_key(context, CODE_VERSION, {"chunks": chunks.sha256},
                          {"model": fingerprint, "source": source})
    asset_path = context.asset_key.path
    cached = None if config.force else store.cached_fileref(asset_path, partition, key)
    if cached is not None:
        context.log.info(f"embeddings[{partition}]: cache hit {key}, 0 texts encoded")
        return Output(cached, data_version=DataVersion(cached.sha256),
                      metadata={"cache_hit": True, "cache_key": key, "texts_encoded": 0})

    loaded = model_pool.loaded()
    schema = embeddings_schema(loaded.dimension)
    encode_seconds = 0.0
    encoded = 0
    progress = tqdm(total=chunks.rows, desc=f"embeddings[{source}]", unit="chunk",
                    disable=not sys.stderr.isatty(), file=sys.stderr)
    with store.parquet_writer(asset_path, partition, schema) as writer:
        for batch in store.iter_batches(chunks, config.texts_per_batch,
                                        columns=["chunk_id", "doc_id", "title", "text", "chunk_hash"]):
            t0 = time.perf_counter()
            vectors = model_pool.encode(batch.column("text").to_pylist())
            encode_seconds += time.perf_counter() - t0
            encoded += batch.num_rows
            writer.write_batch(embeddings_batch(batch, vectors, source, fingerprint, schema))
            progress.update(batch.num_rows)
            context.log.info(f"embeddings[{source}]: {encoded}/{chunks.rows} chunks encoded")
    progress.close()
    ref = writer.ref
    assert ref is not None
    store.cache_put(asset_path, partition, key, {"fileref": ref.as_dict()})
    return Output(ref, data_version=DataVersion(ref.sha256), metadata=run_metadata(started, ref.rows, {
        "cache_hit": False,
        "cache_key": key,
        "texts_encoded": encoded,
        "encode_seconds": MetadataValue.float(round(encode_seconds, 3)),
        "texts_per_second": MetadataValue.float(round(encoded / encode_seconds, 1) if encode_seconds else 0.0),
        "model": model_pool.model,
        "model_fingerprint": fingerprint,
        "dimension": loaded.dimension,
        "model_load_seconds": MetadataValue.float(round(loaded.load_seconds, 3)),
    }))
