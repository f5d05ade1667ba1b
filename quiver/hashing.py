"""Content hashes and ids derived from them; one place so every stage agrees."""

import hashlib
import json
from typing import Any

_VECTOR_ID_MASK = (1 << 63) - 1


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_json(value: Any) -> str:
    """Hash of a JSON-able value, independent of key order."""
    payload = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return sha256_text(payload)


def document_hash(title: str, text: str) -> str:
    return sha256_text(f"{title}\x00{text}")


def chunk_id(doc_id: str, position: int) -> str:
    """Stable id of the position-th chunk of a document: readable, and unique within a source."""
    return f"{doc_id}#{position}"


def vector_id(source: str, chunk: str) -> int:
    """Deterministic positive int64 id of a chunk's vector, shared by FAISS and Milvus.

    Derived from the source and chunk id, so a re-run upserts instead of duplicating.
    """
    digest = hashlib.sha256(f"{source}\x00{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & _VECTOR_ID_MASK


def vector_key(model_fingerprint: str, chunk_hash: str) -> str:
    """Identifies a vector's content: the model and the exact text encoded. A store whose vector under an
    id has another key holds a stale vector."""
    return sha256_text(f"{model_fingerprint}\x00{chunk_hash}")[:32]
