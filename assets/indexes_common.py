"""Reading every source partition's embeddings for the index stages."""

import hashlib
from collections.abc import Iterator, Mapping

import numpy as np
import pyarrow as pa

from resources.fileref import FileRef, FileStore
from resources.vector_stores import PAYLOAD_COLUMNS


def partitions_hashes(embeddings: Mapping[str, FileRef]) -> dict[str, str]:
    return {partition: ref.sha256 for partition, ref in sorted(embeddings.items())}


def iter_embedding_batches(store: FileStore, embeddings: Mapping[str, FileRef],
                           batch_size: int = 4096) -> Iterator[pa.RecordBatch]:
    for _, ref in sorted(embeddings.items()):
        yield from store.iter_batches(ref, batch_size)


def vectors_of(batch: pa.RecordBatch) -> np.ndarray:
    column = batch.column("vector")
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(batch.num_rows, dim)


def load_all(store: FileStore, embeddings: Mapping[str, FileRef]) -> tuple[np.ndarray, pa.Table]:
    """Every partition's vectors stacked, and their payload columns in the same order."""
    vectors: list[np.ndarray] = []
    payloads: list[pa.RecordBatch] = []
    for batch in iter_embedding_batches(store, embeddings):
        vectors.append(vectors_of(batch))
        payloads.append(batch.select(list(PAYLOAD_COLUMNS)))
    if not vectors:
        return np.zeros((0, 0), dtype=np.float32), pa.table({c: pa.array([], pa.string()) for c in PAYLOAD_COLUMNS})
    return np.ascontiguousarray(np.vstack(vectors), dtype=np.float32), pa.Table.from_batches(payloads)


def content_hash(ids: np.ndarray, keys: list[str]) -> str:
    """Order-independent identity of an index's content: which vector under which id."""
    digest = hashlib.sha256()
    for vid, key in sorted(zip(ids.tolist(), keys, strict=True)):
        digest.update(f"{vid}:{key}\n".encode())
    return digest.hexdigest()


def embedding_dimension(store: FileStore, embeddings: Mapping[str, FileRef]) -> int:
    """Vector width from the Parquet schema, without reading data; 0 when there are no partitions."""
    for _, ref in sorted(embeddings.items()):
        return store.parquet_schema(ref).field("vector").type.list_size
    return 0
