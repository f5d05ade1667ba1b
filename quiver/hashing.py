"""Content hashes and ids derived from them; one place so every stage agrees."""

import hashlib
import json
from collections.abc import Iterable
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


class KeyDigest:
    """Order-independent digest of a set of (vector id, vector key) pairs: the sum of their hashes, so that a
    writer computes it as it streams and a reader from any listing, in any order, and both agree exactly
    when the two sets are the same."""

    _MODULUS = 1 << 128

    def __init__(self) -> None:
        self.count = 0
        self._total = 0

    def add(self, vid: int, key: str) -> None:
        value = int.from_bytes(hashlib.sha256(f"{vid}:{key}".encode()).digest()[:16], "big")
        self._total = (self._total + value) % self._MODULUS
        self.count += 1

    def update(self, pairs: Iterable[tuple[int, str]]) -> "KeyDigest":
        for vid, key in pairs:
            self.add(vid, key)
        return self

    def hexdigest(self) -> str:
        return f"{self.count}:{self._total:032x}"
