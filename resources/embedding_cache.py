"""Three-level embedding cache keyed by the model fingerprint and the sha256 of the encoded text.

L1 is an in-process LRU bounded in bytes, L2 is Redis, L3 is immutable segment files under the
storage root. A hit at a lower level fills the levels above it. Every entry carries the text's hash,
its dimension and a CRC, and is checked on read: a corrupt, truncated, wrong-dimension or
other-text entry is discarded (and counted) and the text is re-encoded, never returned.
"""

import hashlib
import os
import re
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from dagster import ConfigurableResource, get_dagster_logger
from pydantic import Field
from upath import UPath

from quiver.retry import RetrySettings, call_with_retries
from quiver.segments import SegmentStore
from quiver.settings import default_storage_root
from resources.env import env_set, env_value, from_env

ENTRY_MAGIC = b"QVE1"
_ENTRY_HEADER = struct.Struct("<4sI")  # magic, dimension
LEVELS = ("l1", "l2", "l3")
LEVEL_NAMES = {"l1": "in-process memory", "l2": "Redis", "l3": "segment files under the storage root"}
T = TypeVar("T")


def entry_size(dimension: int) -> int:
    return _ENTRY_HEADER.size + 32 + 4 * dimension + 4


def pack_entry(text_sha: bytes, vector: np.ndarray) -> bytes:
    """magic | dim | sha256(text) | float32 LE vector | crc32 of all before."""
    body = _ENTRY_HEADER.pack(ENTRY_MAGIC, vector.shape[0]) + text_sha + vector.astype("<f4").tobytes()
    return body + struct.pack("<I", zlib.crc32(body))


def unpack_entry(data: bytes | None, text_sha: bytes, dimension: int) -> np.ndarray | None:
    """The vector if the entry is intact, for this text, of this dimension, and finite; else None."""
    if not data or len(data) != entry_size(dimension):
        return None
    magic, dim = _ENTRY_HEADER.unpack_from(data)
    if magic != ENTRY_MAGIC or dim != dimension:
        return None
    if struct.unpack_from("<I", data, len(data) - 4)[0] != zlib.crc32(data[:-4]):
        return None
    if data[_ENTRY_HEADER.size:_ENTRY_HEADER.size + 32] != text_sha:
        return None
    vector = np.frombuffer(data, dtype="<f4", count=dimension, offset=_ENTRY_HEADER.size + 32).astype(np.float32)
    return vector if np.isfinite(vector).all() else None


@dataclass
class CacheStats:
    hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LEVELS, 0))
    misses: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LEVELS, 0))
    fills: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LEVELS, 0))
    discarded: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LEVELS, 0))

    def add(self, other: "CacheStats") -> None:
        for name in ("hits", "misses", "fills", "discarded"):
            mine, theirs = getattr(self, name), getattr(other, name)
            for level in LEVELS:
                mine[level] += theirs[level]

    def as_metadata(self) -> dict[str, int]:
        return {f"cache_{level}_{kind}": getattr(self, kind)[level]
                for level in LEVELS for kind in ("hits", "misses", "fills", "discarded")}

    def found(self) -> int:
        """Texts whose vector came from any level (each text is counted at the level that had it)."""
        return sum(self.hits.values())

    def as_details(self, enabled: dict[str, bool]) -> dict[str, Any]:
        """Each level's counters under its name, "off" for a level that is not enabled (its zeros mean
        nothing): what the `details` entry of a materialization shows."""
        return {level: {"where": LEVEL_NAMES[level], **{kind: getattr(self, kind)[level]
                                                        for kind in ("hits", "misses", "fills", "discarded")}}
                if enabled[level] else f"off ({LEVEL_NAMES[level]})" for level in LEVELS}


class BytesLRU:
    """Byte-bounded LRU shared by every cache resource of the process."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._data: OrderedDict[tuple[str, bytes], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, bytes]) -> bytes | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: tuple[str, bytes], value: bytes) -> None:
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.bytes -= len(old)
            if len(value) > self.max_bytes:
                return
            self._data[key] = value
            self.bytes += len(value)
            while self.bytes > self.max_bytes:
                _, evicted = self._data.popitem(last=False)
                self.bytes -= len(evicted)

    def discard(self, key: tuple[str, bytes]) -> None:
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.bytes -= len(old)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._data)


_L1: dict[int, BytesLRU] = {}
_L1_LOCK = threading.Lock()


def l1_for(max_bytes: int) -> BytesLRU:
    with _L1_LOCK:
        lru = _L1.get(max_bytes)
        if lru is None:
            lru = _L1[max_bytes] = BytesLRU(max_bytes)
        return lru


def clear_l1() -> None:
    """Empty every in-process LRU (what a new process starts with)."""
    with _L1_LOCK:
        for lru in _L1.values():
            lru.clear()


_SEGMENTS: dict[tuple[str, int], SegmentStore] = {}
_SEGMENTS_LOCK = threading.Lock()


def forget_segments() -> None:
    """Drop this process's index of disk-cache segments (it is rebuilt from the directory when next used)."""
    with _SEGMENTS_LOCK:
        _SEGMENTS.clear()


def _check_level(
    level: str, pending: list[int], raws: Sequence[bytes | None], text_shas: Sequence[bytes], dimension: int,
    found: dict[int, np.ndarray], stats: CacheStats,
) -> tuple[list[int], list[int], list[int]]:
    """Verify one level's raw entries for the pending positions: (still missing, hits, discarded)."""
    still, hits, bad = [], [], []
    for i, raw in zip(pending, raws, strict=True):
        vector = unpack_entry(raw, text_shas[i], dimension) if raw is not None else None
        if vector is not None:
            found[i] = vector
            stats.hits[level] += 1
            hits.append(i)
            continue
        if raw is not None:
            stats.discarded[level] += 1
            bad.append(i)
        stats.misses[level] += 1
        still.append(i)
    return still, hits, bad


class EmbeddingCache(ConfigurableResource):
    """Where vectors already computed for the exact same text and model are found again."""

    l1_enabled: bool = True
    l1_max_bytes: int = Field(default=256 * 2**20, description="In-process LRU size in bytes.")
    l2_enabled: bool = Field(default_factory=env_set("QUIVER_REDIS_URL"),
                             description="Redis level; needs redis_url. On when QUIVER_REDIS_URL is set.")
    redis_url: str = Field(default_factory=from_env("QUIVER_REDIS_URL"),
                           description="redis://host:6379/0 (QUIVER_REDIS_URL, kept out of the UI).")
    redis_prefix: str = "quiver:emb:"
    redis_ttl_s: int = Field(default=30 * 86400, description="Expiry of Redis entries; 0 keeps them.")
    l3_enabled: bool = True
    l3_directory: str = Field(default_factory=lambda: f"{default_storage_root()}/_embedding_cache")
    l3_max_bytes: int = Field(default=8 * 2**30, ge=0, description="Disk level bound in bytes per model: the "
                              "oldest segments are evicted beyond it.")
    l3_refresh_interval_s: float = Field(default=5.0, ge=0, description="Longest time before segments another "
                                         "process wrote are seen (a miss meanwhile only re-encodes).")

    retry_attempts: int = Field(default=6, ge=1, description="Attempts of a Redis call that fails transiently.")
    retry_deadline_s: float = Field(default=60.0, description="No new attempt after this long.")

    def levels_enabled(self) -> dict[str, bool]:
        return {"l1": self.l1_enabled, "l2": self.l2_enabled, "l3": self.l3_enabled}

    def _redis_call(self, what: str, call: Callable[[Any], T]) -> T:
        """call(client), retried with backoff on transient errors (refused, reset, timeout); others fail at once."""
        settings = RetrySettings(attempts=self.retry_attempts, deadline_s=self.retry_deadline_s)
        url = env_value(self.redis_url)
        return call_with_retries(f"Redis {what} ({_redacted(url)})", lambda: call(_redis_client(url)), settings,
                                 log=get_dagster_logger())

    def disk_level(self, fingerprint: str, dimension: int) -> SegmentStore:
        """The L3 segments of one model in this process."""
        key = (f"{self.l3_directory}/{fingerprint}", dimension)
        with _SEGMENTS_LOCK:
            store = _SEGMENTS.get(key)
            if store is None:
                store = _SEGMENTS[key] = SegmentStore(UPath(key[0]), dimension, entry_size(dimension),
                                                      max_bytes=self.l3_max_bytes,
                                                      refresh_interval_s=self.l3_refresh_interval_s)
            return store

    def _redis_key(self, fingerprint: str, sha: bytes) -> str:
        return f"{self.redis_prefix}{fingerprint}:{sha.hex()}"

    def lookup(self, fingerprint: str, dimension: int, text_shas: Sequence[bytes],
               stats: CacheStats) -> dict[int, np.ndarray]:
        """Vectors found for the given text hashes, by position; fills upper levels on lower hits."""
        found: dict[int, np.ndarray] = {}
        pending = list(range(len(text_shas)))
        lru = l1_for(self.l1_max_bytes) if self.l1_enabled else None

        if lru is not None:
            raws = [lru.get((fingerprint, text_shas[i])) for i in pending]
            pending, _, bad = _check_level("l1", pending, raws, text_shas, dimension, found, stats)
            for i in bad:
                lru.discard((fingerprint, text_shas[i]))

        l2_hits: list[int] = []
        if self.l2_enabled and pending:
            keys = [self._redis_key(fingerprint, text_shas[i]) for i in pending]
            raws = self._redis_call("get", lambda r: r.mget(keys))
            pending, l2_hits, bad = _check_level("l2", pending, raws, text_shas, dimension, found, stats)
            if bad:
                stale = [self._redis_key(fingerprint, text_shas[i]) for i in bad]
                self._redis_call("delete", lambda r: r.delete(*stale))

        l3_hits: list[int] = []
        if self.l3_enabled and pending:
            try:
                by_position = self.disk_level(fingerprint, dimension).get_many([text_shas[i] for i in pending])
            except (OSError, ValueError) as exc:  # a cache is never worth failing a step: a miss re-encodes
                get_dagster_logger().warning(f"embedding cache disk level unreadable, treated as a miss: {exc}")
                by_position = {}
            raws = [by_position.get(j) for j in range(len(pending))]
            pending, l3_hits, _ = _check_level("l3", pending, raws, text_shas, dimension, found, stats)

        # Fill the levels above the one that hit.
        if lru is not None:
            for i in l2_hits + l3_hits:
                lru.put((fingerprint, text_shas[i]), pack_entry(text_shas[i], found[i]))
                stats.fills["l1"] += 1
        if self.l2_enabled and l3_hits:
            self._redis_put(fingerprint, [(text_shas[i], pack_entry(text_shas[i], found[i])) for i in l3_hits])
            stats.fills["l2"] += len(l3_hits)
        return found

    def store(self, fingerprint: str, dimension: int, text_shas: Sequence[bytes], vectors: np.ndarray,
              stats: CacheStats) -> None:
        """Write freshly computed vectors to every enabled level."""
        if not text_shas:
            return
        entries = [pack_entry(sha, vectors[i]) for i, sha in enumerate(text_shas)]
        if self.l1_enabled:
            lru = l1_for(self.l1_max_bytes)
            for sha, entry in zip(text_shas, entries, strict=True):
                lru.put((fingerprint, sha), entry)
            stats.fills["l1"] += len(entries)
        if self.l2_enabled:
            self._redis_put(fingerprint, list(zip(text_shas, entries, strict=True)))
            stats.fills["l2"] += len(entries)
        if self.l3_enabled:
            try:
                stats.fills["l3"] += self.disk_level(fingerprint, dimension).put_many(list(text_shas), entries)
            except (OSError, ValueError) as exc:
                get_dagster_logger().warning(f"embedding cache disk level not written ({exc}): the vectors are "
                                             "still in the output, only a later run may encode them again")

    def _redis_put(self, fingerprint: str, items: list[tuple[bytes, bytes]]) -> None:
        def put(client: Any) -> None:
            pipe = client.pipeline(transaction=False)
            for sha, entry in items:
                pipe.set(self._redis_key(fingerprint, sha), entry, ex=self.redis_ttl_s or None)
            pipe.execute()  # SETs are idempotent: a retried pipeline writes the same entries

        self._redis_call("put", put)


_REDIS: dict[str, tuple[int, Any]] = {}


def _redis_client(url: str) -> Any:
    """One client per URL and process: a connection pool must not cross a fork."""
    if not url:
        from quiver.errors import ConfigError

        raise ConfigError("the Redis cache level is enabled but no redis_url is set (QUIVER_REDIS_URL)")
    pid, client = _REDIS.get(url, (-1, None))
    if pid != os.getpid():
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30)
        _REDIS[url] = (os.getpid(), client)
    return client


def _redacted(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", url)


def text_sha(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


@dataclass
class CachedTexts:
    """What the cache knew of a list of texts: vectors found by position, and the texts left to encode."""

    texts: list[str]
    shas: list[bytes]
    found: dict[int, np.ndarray]
    to_encode: list[int]  # the first position of each distinct text that was not found

    def texts_to_encode(self) -> list[str]:
        return [self.texts[i] for i in self.to_encode]

    def complete(self, fresh: np.ndarray, dimension: int) -> np.ndarray:
        """Every text's vector, given the vectors of `texts_to_encode()` in that order."""
        out = np.empty((len(self.texts), dimension), dtype=np.float32)
        for i, vector in self.found.items():
            out[i] = vector
        row_of = {self.shas[i]: k for k, i in enumerate(self.to_encode)}
        for i, sha in enumerate(self.shas):
            if i not in self.found:
                out[i] = fresh[row_of[sha]]
        return out


def look_up_texts(cache: EmbeddingCache | None, fingerprint: str, dimension: int, texts: list[str],
                  stats: CacheStats) -> CachedTexts:
    """Looks texts up; identical texts that missed are to be encoded once."""
    shas = [text_sha(t) for t in texts]
    found = cache.lookup(fingerprint, dimension, shas, stats) if cache is not None else {}
    first_of: dict[bytes, int] = {}
    for i, sha in enumerate(shas):
        if i not in found:
            first_of.setdefault(sha, i)
    return CachedTexts(texts, shas, found, list(first_of.values()))


def store_encoded(cache: EmbeddingCache | None, fingerprint: str, dimension: int, looked_up: CachedTexts,
                  fresh: np.ndarray, stats: CacheStats) -> None:
    if cache is not None and looked_up.to_encode:
        cache.store(fingerprint, dimension, [looked_up.shas[i] for i in looked_up.to_encode], fresh, stats)


def encode_with_cache(pool: Any, cache: EmbeddingCache | None, texts: list[str], stats: CacheStats) -> np.ndarray:
    """Vectors for texts: cached ones looked up, the rest encoded once each (duplicates too) and stored."""
    state = pool.state()
    dimension, fingerprint = state.dimension, state.fingerprint
    looked_up = look_up_texts(cache, fingerprint, dimension, texts, stats)
    fresh = pool.encode(looked_up.texts_to_encode())
    store_encoded(cache, fingerprint, dimension, looked_up, fresh, stats)
    return looked_up.complete(fresh, dimension)
