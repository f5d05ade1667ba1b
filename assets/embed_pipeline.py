"""Embed-and-insert for one source partition, as overlapping stages with bounded queues between them.

    read     (reader thread)          chunk batches from the chunks Parquet
    prepare  (preprocess_workers)     embedding-cache lookup, tokenization of the texts still to encode
    encode   (embedding_workers)      forward passes, each on an instance acquired from the model pool; cache fill
    write    (one thread, in order)   the embeddings Parquet, Milvus rows of new or changed vectors
    insert   (one thread)             Milvus upserts in requests bounded by rows and bytes

so the model never waits for reading, tokenizing or the database. Sync mode runs the same stages one
batch at a time. Vector ids derive from chunk ids, so every write is an upsert; after the stages, the
partition's vectors whose chunk no longer exists are deleted. Only this source's vectors are read or
deleted: other partitions are never touched.
"""

import functools
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from quiver.encoding import TokenizedBatch
from quiver.hashing import KeyDigest
from quiver.retry import ServiceUnavailableError
from quiver.stages import PipelineReport, Stage, run_stages
from quiver.vectors import embeddings_batch, request_batches, row_bytes, rows_for_milvus
from resources.embedding_cache import CachedTexts, CacheStats, EmbeddingCache, look_up_texts, store_encoded
from resources.fileref import ParquetFileWriter
from resources.milvus_store import MilvusStore
from resources.model_pool import ModelPool


@dataclass(frozen=True)
class PipelineSettings:
    mode: Literal["async", "sync"] = "async"
    preprocess_workers: int = 1
    embedding_workers: int = 1
    queue_maxsize: int = 4
    insert_batch_size: int = 512


@dataclass
class _Prepared:
    batch: pa.RecordBatch
    looked_up: CachedTexts
    tokenized: list[TokenizedBatch]


@dataclass
class _Encoded:
    batch: pa.RecordBatch
    looked_up: CachedTexts
    fresh: np.ndarray


@dataclass
class PartitionVectors:
    """What embedding one partition did."""

    rows: int = 0
    upserted: int = 0
    unchanged: int = 0
    deleted: int = 0
    report: PipelineReport | None = None
    seen: list[np.ndarray] = field(default_factory=list)  # vector ids written, by batch (8 bytes a row)
    digest: KeyDigest = field(default_factory=KeyDigest)
    deferred: str = ""  # why Milvus was not written (milvus_collection writes it instead)


class _Writer:
    """The write stage: runs in one thread, in chunk order, so the Parquet file is deterministic."""

    def __init__(self, partition: str, fingerprint: str, dimension: int, writer: ParquetFileWriter,
                 held: Callable[[list[int]], dict[int, str]] | None, insert_rows: int, insert_bytes: int,
                 progress: Callable[[int], None], result: PartitionVectors) -> None:
        self.partition, self.fingerprint, self.dimension = partition, fingerprint, dimension
        self.writer, self.held = writer, held
        self.insert_rows, self.insert_bytes = insert_rows, insert_bytes
        self.progress, self.result = progress, result
        self.pending: list[dict[str, Any]] = []
        self.pending_bytes = 0

    def __call__(self, item: _Encoded) -> list[list[dict[str, Any]]]:
        vectors = item.looked_up.complete(item.fresh, self.dimension)
        batch = embeddings_batch(item.batch, vectors, self.partition, self.fingerprint, self.writer.schema)
        self.writer.write_batch(batch)
        self.result.rows += batch.num_rows
        self.progress(batch.num_rows)
        if self.held is None or self.result.deferred:
            return []
        ids = batch.column("vector_id").to_pylist()
        keys = batch.column("vector_key").to_pylist()
        self.result.seen.append(np.asarray(ids, dtype=np.int64))
        self.result.digest.update(zip(ids, keys, strict=True))
        try:
            held = self.held(ids)  # what Milvus holds of this batch's ids only: memory is one batch, not the source
        except ServiceUnavailableError as exc:  # Milvus went away mid-run: the rest is left to milvus_collection
            self.result.deferred = (f"Milvus unavailable after {self.result.upserted} upserts ({exc}): left to "
                                    "milvus_collection")
            return []
        changed = [i for i, (vid, key) in enumerate(zip(ids, keys, strict=True)) if held.get(vid) != key]
        self.result.unchanged += len(ids) - len(changed)
        if changed:
            for row in rows_for_milvus(batch.take(changed)):
                self.pending.append(row)
                self.pending_bytes += row_bytes(row)
        if len(self.pending) >= self.insert_rows or self.pending_bytes >= self.insert_bytes:
            return self.finish() or []
        return []

    def finish(self) -> list[list[dict[str, Any]]] | None:
        """Whatever rows wait, as insert requests."""
        if not self.pending:
            return None
        requests = list(request_batches(self.pending, self.insert_rows, self.insert_bytes))
        self.pending, self.pending_bytes = [], 0
        return requests


def embed_partition_vectors(
    chunk_batches: Iterable[pa.RecordBatch],
    partition: str,
    total_rows: int,
    *,
    pool: ModelPool,
    cache: EmbeddingCache | None,
    stats: CacheStats,
    writer: ParquetFileWriter,
    milvus: MilvusStore | None,
    settings: PipelineSettings,
    on_progress: Callable[[int, PartitionVectors], None] | None = None,
) -> PartitionVectors:
    """Embeds a partition's chunks into `writer` and, when milvus is given, makes the partition's vectors in
    Milvus exactly the current ones."""
    state = pool.state()
    fingerprint, dimension = state.fingerprint, state.dimension
    result = PartitionVectors()
    held: Callable[[list[int]], dict[int, str]] | None = None
    if milvus is not None and (busy := milvus.busy_reason()):
        # Another process has the embedded database: do not wait for it, milvus_collection writes these vectors.
        result.deferred, milvus = f"{busy}: left to milvus_collection", None
    if milvus is not None:
        try:
            milvus.ensure_collection(dimension)
            held = functools.partial(milvus.keys_of, source=partition)
        except ServiceUnavailableError as exc:  # degraded, not down: the Parquet and FAISS do not wait for Milvus
            result.deferred, milvus = f"Milvus unavailable ({exc}): left to milvus_collection", None
    stats_lock = threading.Lock()
    bar = tqdm(total=total_rows, desc=f"embeddings[{partition}]", unit="chunk", disable=not sys.stderr.isatty(),
               file=sys.stderr)

    def prepare(batch: pa.RecordBatch) -> _Prepared:
        own = CacheStats()
        looked_up = look_up_texts(cache, fingerprint, dimension, batch.column("text").to_pylist(), own)
        with stats_lock:
            stats.add(own)
        return _Prepared(batch, looked_up, pool.tokenize(looked_up.texts_to_encode()))

    def encode(item: _Prepared) -> _Encoded:
        fresh = pool.forward(item.tokenized, len(item.looked_up.to_encode))
        # Cached at once: if a later stage fails, the re-run finds these and encodes nothing twice.
        own = CacheStats()
        store_encoded(cache, fingerprint, dimension, item.looked_up, fresh, own)
        with stats_lock:
            stats.add(own)
        return _Encoded(item.batch, item.looked_up, fresh)

    def insert(requests: list[list[dict[str, Any]]]) -> int:
        assert milvus is not None
        if result.deferred:
            return 0
        try:
            written = sum(milvus.upsert_rows(rows) for rows in requests)
        except ServiceUnavailableError as exc:  # Milvus went away mid-run: the rest is left to milvus_collection
            result.deferred = f"Milvus unavailable after {result.upserted} upserts ({exc}): left to milvus_collection"
            return 0
        result.upserted += written
        return written

    write = _Writer(partition, fingerprint, dimension, writer, held, settings.insert_batch_size,
                    milvus.max_request_bytes if milvus else 0, bar.update, result)
    stages = [
        Stage("prepare", prepare, workers=settings.preprocess_workers),
        Stage("encode", encode, workers=settings.embedding_workers),
        Stage("write", write, ordered=True, finish=write.finish),
    ]
    if milvus is not None:
        stages.append(Stage("insert", insert))
    try:
        result.report = run_stages(
            chunk_batches, stages, mode=settings.mode, queue_maxsize=settings.queue_maxsize,
            on_progress=(lambda _items: on_progress(result.rows, result)) if on_progress else None,
            thread_prefix=f"quiver-embed-{partition}")
    finally:
        bar.close()
    if milvus is not None and held is not None and not result.deferred:
        try:
            # The source's vectors whose chunk is gone, found by paging its ids in Milvus against the sorted ids
            # written now.
            current = np.sort(np.concatenate(result.seen)) if result.seen else np.empty(0, np.int64)
            for gone in milvus.ids_not_in(partition, current):
                result.deleted += milvus.delete_ids(gone, sources={partition})
            milvus.mark_exact(partition, result.digest.hexdigest())  # verified: the source holds exactly these now
        except ServiceUnavailableError as exc:
            result.deferred = f"Milvus unavailable before its stale vectors were deleted ({exc}): left to " \
                              "milvus_collection"
    if milvus is not None:
        milvus.release()
    return result
