"""The vector and its payload, defined once: the embeddings Parquet, the FAISS payload, Milvus rows and
search hits all come from the fields below.

Both stores hold one vector per current chunk under the same deterministic int64 id, with the chunk's
document id, source, title and text beside it (so a search prints results without another lookup) and its
vector key (which model made it from which exact text).
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pyarrow as pa

from quiver.hashing import vector_id, vector_key

MILVUS_MAX_REQUEST_BYTES = 64 * 2**20  # gRPC message limit of a Milvus server
MILVUS_MAX_TOPK = 16384
MILVUS_MAX_VARCHAR = 65535


SNIPPET_CHARS = 2000  # what Milvus keeps of a title or a text: enough to show a result


@dataclass(frozen=True)
class PayloadField:
    """A column kept beside each vector; `max_bytes` is its bound in Milvus (None: an int64)."""

    name: str
    max_bytes: int | None
    snippet: bool = False  # Milvus keeps its first SNIPPET_CHARS only (text that only serves to show a result)


PAYLOAD = (
    PayloadField("vector_id", None),
    PayloadField("chunk_id", MILVUS_MAX_VARCHAR),
    PayloadField("doc_id", MILVUS_MAX_VARCHAR),
    PayloadField("source", 512),
    PayloadField("title", 8192, snippet=True),  # 2000 characters are at most 8000 bytes
    PayloadField("text", MILVUS_MAX_VARCHAR, snippet=True),
    PayloadField("vector_key", 64),
)
PAYLOAD_COLUMNS = tuple(f.name for f in PAYLOAD)
KEY_COLUMNS = ["vector_id", "vector_key"]
CHUNK_COLUMNS = ["chunk_id", "doc_id", "title", "text", "chunk_hash"]  # what embedding reads of the chunks


def payload_schema() -> pa.Schema:
    return pa.schema([(f.name, pa.int64() if f.max_bytes is None else pa.string()) for f in PAYLOAD])


# Schema metadata of an embeddings Parquet: the fingerprint of the model that made its vectors, which the FAISS
# manifest records, so that a query is only ever encoded by the model its index was made with (`quiver serve`).
MODEL_FINGERPRINT_KEY = b"quiver.model_fingerprint"


def embeddings_schema(dimension: int, model_fingerprint: str = "") -> pa.Schema:
    """The embeddings Parquet: the payload, the chunk's hash, and the vector (and the model's fingerprint)."""
    fields = list(payload_schema())
    fields.insert(len(fields) - 1, pa.field("chunk_hash", pa.string()))
    schema = pa.schema([*fields, pa.field("vector", pa.list_(pa.float32(), dimension))])
    return schema.with_metadata({MODEL_FINGERPRINT_KEY: model_fingerprint.encode()}) if model_fingerprint else schema


def model_fingerprint_of(schema: pa.Schema) -> str:
    """The fingerprint of the model an embeddings Parquet's vectors came from ("" when it does not say)."""
    return (schema.metadata or {}).get(MODEL_FINGERPRINT_KEY, b"").decode()


def embeddings_batch(chunk_batch: pa.RecordBatch, vectors: np.ndarray, source: str, fingerprint: str,
                     schema: pa.Schema) -> pa.RecordBatch:
    """Embedding rows of a batch of chunks, with their vector ids and keys."""
    chunk_ids = chunk_batch.column("chunk_id").to_pylist()
    hashes = chunk_batch.column("chunk_hash").to_pylist()
    columns = {
        "vector_id": pa.array([vector_id(source, c) for c in chunk_ids], pa.int64()),
        "source": pa.array([source] * len(chunk_ids), pa.string()),
        "vector_key": pa.array([vector_key(fingerprint, h) for h in hashes], pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()),
                                                    vectors.shape[1]),
    }
    return pa.RecordBatch.from_arrays([columns[name] if name in columns else chunk_batch.column(name)
                                       for name in schema.names], schema=schema)


def key_pairs(batch: pa.RecordBatch | pa.Table) -> Iterator[tuple[int, str]]:
    """(vector id, vector key) of each row."""
    return zip(batch.column("vector_id").to_pylist(), batch.column("vector_key").to_pylist(), strict=True)


def vectors_of(batch: pa.RecordBatch | pa.Table) -> np.ndarray:
    """The float32 vectors of embedding rows, one per row, contiguous."""
    column = batch.column("vector")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    return np.ascontiguousarray(column.flatten().to_numpy(zero_copy_only=False).reshape(len(batch), dim),
                                dtype=np.float32)


def with_vectors(payload: pa.RecordBatch, vectors: np.ndarray) -> pa.RecordBatch:
    """Payload rows with their vectors beside them (the shape embedding rows have)."""
    flat = pa.array(vectors.reshape(-1), pa.float32())
    return payload.append_column("vector", pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]))


def empty_payload() -> pa.Table:
    return payload_schema().empty_table()


@dataclass(frozen=True)
class SearchHit:
    score: float
    vector_id: int
    chunk_id: str
    doc_id: str
    source: str
    title: str
    text: str

    def snippet(self, chars: int = 200) -> str:
        """The chunk's body on one line, without the title prefix it was embedded with."""
        body = self.text[len(self.title) + 1:] if self.title and self.text.startswith(self.title + "\n") else self.text
        return " ".join(body.split())[:chars]


# What a search hit carries besides its score and id (the payload a store returns with it).
HIT_FIELDS = tuple(f.name for f in fields(SearchHit) if f.name not in ("score", "vector_id"))


def rows_for_milvus(batch: pa.RecordBatch) -> Iterator[dict[str, Any]]:
    """Milvus rows of embedding rows: the payload (snippet fields cut to what Milvus keeps) and the vector."""
    vectors = vectors_of(batch)
    columns = {f.name: batch.column(f.name).to_pylist() for f in PAYLOAD}
    for i in range(batch.num_rows):
        row: dict[str, Any] = {"id": columns["vector_id"][i], "vector": vectors[i].tolist()}
        for f in PAYLOAD[1:]:
            value = columns[f.name][i]
            row[f.name] = value[:SNIPPET_CHARS] if f.snippet else value
        yield row


def row_bytes(row: dict[str, Any]) -> int:
    """What a row weighs in a request: 4 bytes a float, UTF-8 strings, and a little framing per field."""
    size = 0
    for value in row.values():
        if isinstance(value, str):
            size += len(value.encode("utf-8")) + 8
        elif isinstance(value, list | tuple):
            size += 4 * len(value) + 8
        else:
            size += 16
    return size


def request_batches(rows: Iterable[dict[str, Any]], max_rows: int, max_bytes: int) -> Iterator[list[dict[str, Any]]]:
    """Consecutive slices of rows, each within both limits (a single oversized row goes alone)."""
    batch: list[dict[str, Any]] = []
    size = 0
    for row in rows:
        weight = row_bytes(row)
        if batch and (len(batch) >= max_rows or size + weight > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(row)
        size += weight
    if batch:
        yield batch


# Milvus boolean expressions over the source field.
def quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def source_filter(source: str | None = None, including: Iterable[str] | None = None,
                  excluding: Iterable[str] | None = None) -> str:
    """Rows of one source, of the included sources, or of every source but the excluded ones ("" is all)."""
    if source is not None:
        return f"source == {quoted(source)}"
    if including is not None:
        return f"source in [{', '.join(quoted(s) for s in sorted(including))}]"
    if excluding:
        return f"source not in [{', '.join(quoted(s) for s in sorted(excluding))}]"
    return ""
