"""The three-level embedding cache on real parts: in-process LRU, the real Redis, segment files."""

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from resources import embedding_cache as ec
from resources.embedding_cache import CacheStats, EmbeddingCache, encode_with_cache, pack_entry, text_sha
from resources.model_pool import ModelPool
from resources.process import reset_process_state
from tests.helpers import add_source, ingest, metadata, scifact_docs, write_jsonl

REDIS_URL = os.environ.get("QUIVER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TEXTS = ["alpha particles", "beta decay", "gamma rays", "delta waves"]


@pytest.fixture
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Redis is required in CI and is not reachable at {REDIS_URL}: {exc}")
        pytest.skip(f"Redis not reachable at {REDIS_URL}")
    return REDIS_URL


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    import redis

    value = f"quiver-test:{uuid.uuid4().hex}:"
    yield value
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{value}*"))
    if keys:
        client.delete(*keys)


@pytest.fixture
def pool() -> ModelPool:
    return ModelPool()


def _new_process() -> None:
    """What a fresh process starts with: empty L1 and no L3 index in memory."""
    reset_process_state()


def _cache(tmp_path: Path, l1: bool = True, l2: bool = False, l3: bool = False, url: str = "",
           prefix: str = "quiver:emb:") -> EmbeddingCache:
    return EmbeddingCache(l1_enabled=l1, l2_enabled=l2, l3_enabled=l3, redis_url=url, redis_prefix=prefix,
                          l3_directory=str(tmp_path / "l3"))


def test_l1_misses_fills_then_hits(tmp_path: Path, pool: ModelPool) -> None:
    _new_process()
    cache = _cache(tmp_path)
    first = CacheStats()
    vectors = encode_with_cache(pool, cache, TEXTS, first)
    assert (first.misses["l1"], first.fills["l1"], first.hits["l1"]) == (4, 4, 0)
    second = CacheStats()
    again = encode_with_cache(pool, cache, TEXTS, second)
    assert (second.hits["l1"], second.misses["l1"]) == (4, 0)
    np.testing.assert_array_equal(again, vectors)
    np.testing.assert_allclose(vectors, pool.encode(TEXTS), atol=1e-6)


def test_l1_is_bounded_in_bytes() -> None:
    lru = ec.BytesLRU(max_bytes=3 * ec.entry_size(4))
    for i in range(5):
        lru.put(("fp", bytes([i]) * 32), pack_entry(bytes([i]) * 32, np.ones(4, np.float32)))
    assert len(lru) == 3 and lru.bytes <= 3 * ec.entry_size(4)
    assert lru.get(("fp", bytes([0]) * 32)) is None and lru.get(("fp", bytes([4]) * 32)) is not None


def test_redis_level_hits_and_fills_l1(tmp_path: Path, pool: ModelPool, redis_url: str, prefix: str) -> None:
    _new_process()
    cache = _cache(tmp_path, l2=True, url=redis_url, prefix=prefix)
    stored = CacheStats()
    vectors = encode_with_cache(pool, cache, TEXTS, stored)
    assert stored.fills["l2"] == 4 and stored.misses["l2"] == 4
    import redis

    assert len(list(redis.Redis.from_url(redis_url).scan_iter(f"{prefix}*"))) == 4
    _new_process()
    from_redis = CacheStats()
    np.testing.assert_array_equal(encode_with_cache(pool, cache, TEXTS, from_redis), vectors)
    assert (from_redis.misses["l1"], from_redis.hits["l2"], from_redis.fills["l1"]) == (4, 4, 4)
    from_l1 = CacheStats()
    encode_with_cache(pool, cache, TEXTS, from_l1)
    assert (from_l1.hits["l1"], from_l1.hits["l2"]) == (4, 0)


def test_disk_level_hits_and_fills_redis_and_l1(tmp_path: Path, pool: ModelPool, redis_url: str,
                                                prefix: str) -> None:
    import redis

    _new_process()
    cache = _cache(tmp_path, l2=True, l3=True, url=redis_url, prefix=prefix)
    vectors = encode_with_cache(pool, cache, TEXTS, CacheStats())
    assert len(list((tmp_path / "l3").rglob("*.qvseg"))) == 1
    client = redis.Redis.from_url(redis_url)
    client.delete(*client.scan_iter(f"{prefix}*"))
    _new_process()
    from_disk = CacheStats()
    np.testing.assert_array_equal(encode_with_cache(pool, cache, TEXTS, from_disk), vectors)
    assert (from_disk.misses["l1"], from_disk.misses["l2"], from_disk.hits["l3"]) == (4, 4, 4)
    assert (from_disk.fills["l1"], from_disk.fills["l2"], from_disk.fills["l3"]) == (4, 4, 0)
    ec.clear_l1()
    refilled = CacheStats()
    encode_with_cache(pool, cache, TEXTS, refilled)
    assert (refilled.hits["l2"], refilled.hits["l3"]) == (4, 0)


def test_corrupt_disk_entry_is_discarded_and_recomputed(tmp_path: Path, pool: ModelPool) -> None:
    _new_process()
    cache = _cache(tmp_path, l1=False, l3=True)
    vectors = encode_with_cache(pool, cache, TEXTS, CacheStats())
    [segment] = (tmp_path / "l3").rglob("*.qvseg")
    data = bytearray(segment.read_bytes())
    data[-10] ^= 0x55  # inside the last entry's vector
    segment.write_bytes(bytes(data))
    _new_process()
    stats = CacheStats()
    again = encode_with_cache(pool, cache, TEXTS, stats)
    assert (stats.hits["l3"], stats.discarded["l3"], stats.misses["l3"]) == (3, 1, 1)
    np.testing.assert_allclose(again, vectors, atol=1e-6)


def test_wrong_dimension_and_other_text_entries_are_never_returned(
    tmp_path: Path, pool: ModelPool, redis_url: str, prefix: str
) -> None:
    import redis

    _new_process()
    cache = _cache(tmp_path, l1=False, l2=True, url=redis_url, prefix=prefix)
    fingerprint = pool.fingerprint()
    client = redis.Redis.from_url(redis_url)
    a, b = text_sha(TEXTS[0]), text_sha(TEXTS[1])
    client.set(f"{prefix}{fingerprint}:{a.hex()}", pack_entry(a, np.ones(128, np.float32)))  # wrong dimension
    client.set(f"{prefix}{fingerprint}:{b.hex()}", pack_entry(a, pool.encode([TEXTS[0]])[0]))  # another text's
    stats = CacheStats()
    vectors = encode_with_cache(pool, cache, TEXTS[:2], stats)
    assert (stats.discarded["l2"], stats.hits["l2"]) == (2, 0)
    np.testing.assert_allclose(vectors, pool.encode(TEXTS[:2]), atol=1e-6)
    # The bad entries were replaced by good ones.
    fresh = CacheStats()
    encode_with_cache(pool, cache, TEXTS[:2], fresh)
    assert fresh.hits["l2"] == 2 and fresh.discarded["l2"] == 0


def test_duplicate_texts_are_encoded_once(tmp_path: Path, pool: ModelPool) -> None:
    _new_process()
    before = pool.metrics().texts
    vectors = encode_with_cache(pool, _cache(tmp_path, l1=False), ["same", "same", "other", "same"], CacheStats())
    assert pool.metrics().texts - before == 2
    np.testing.assert_array_equal(vectors[0], vectors[3])


def test_one_percent_change_reencodes_only_changed_chunks(
    tmp_path: Path, instance: Any, resources: dict[str, Any]
) -> None:
    _new_process()
    docs = scifact_docs(200)
    source = write_jsonl(tmp_path / "corpus.jsonl", docs)
    add_source(instance, resources, "corpus", source)
    first = metadata(ingest(instance, resources, "corpus"), "embeddings")
    old_ref = resources["store"].read_latest(["chunks"], "corpus")
    old_hashes = set(pq.read_table(old_ref.path, columns=["chunk_hash"]).column("chunk_hash").to_pylist())
    assert first["texts_encoded"] == first["rows"]

    for i in (3, 150):  # 1% of 200 documents
        docs[i] = {**docs[i], "text": docs[i]["text"] + " This sentence was added in the revision."}
    write_jsonl(source, docs)
    second = metadata(ingest(instance, resources, "corpus"), "embeddings")
    new_ref = resources["store"].read_latest(["chunks"], "corpus")
    new_hashes = pq.read_table(new_ref.path, columns=["chunk_hash"]).column("chunk_hash").to_pylist()
    changed = [h for h in new_hashes if h not in old_hashes]
    assert 2 <= len(changed) <= 6
    assert second["cache_hit"] is False
    assert second["texts_encoded"] == len(changed)
    assert second["details"]["embedding_cache"]["l1"]["hits"] == len(new_hashes) - len(changed)
    assert second["details"]["embedding_cache"]["l1"]["misses"] == len(changed)


def _segment_store(directory: Path, **kwargs: Any) -> Any:
    from upath import UPath

    from quiver.segments import SegmentStore

    return SegmentStore(UPath(str(directory)), 4, ec.entry_size(4), **kwargs)


def _entries(n: int, start: int = 0) -> tuple[list[bytes], list[bytes]]:
    shas = [text_sha(f"text {i}") for i in range(start, start + n)]
    return shas, [pack_entry(sha, np.full(4, i, np.float32)) for i, sha in zip(range(start, start + n), shas,
                                                                              strict=True)]


def test_temporary_segments_are_never_read_and_stale_ones_are_removed(tmp_path: Path, pool: ModelPool) -> None:
    _new_process()
    cache = _cache(tmp_path, l1=False, l3=True)
    fingerprint, dimension = pool.fingerprint(), pool.dimension()
    directory = tmp_path / "l3" / fingerprint
    # A writer died after writing a whole, valid-looking segment under its temp name: it must never be read.
    from upath import UPath

    from quiver.segments import SegmentStore

    writer = SegmentStore(UPath(str(directory)), dimension, ec.entry_size(dimension))
    writer.put_many([text_sha(TEXTS[0])], [pack_entry(text_sha(TEXTS[0]), np.ones(dimension, np.float32))])
    [segment] = directory.glob("*.qvseg")
    name = segment.name
    segment.rename(directory / f".tmp-{name}")
    stats = CacheStats()
    vectors = encode_with_cache(pool, cache, TEXTS[:1], stats)
    assert (stats.hits["l3"], stats.misses["l3"]) == (0, 1)
    np.testing.assert_allclose(vectors, pool.encode(TEXTS[:1]), atol=1e-6)
    # Maintenance removes temporaries old enough to be abandoned, and only those.
    os.utime(directory / f".tmp-{name}", (1, 1))
    (directory / ".tmp-in-progress.qvseg").write_bytes(b"being written")
    store = cache.disk_level(fingerprint, dimension)
    assert store.maintain().removed_temporaries == 1
    assert sorted(p.name for p in directory.glob(".tmp-*")) == [".tmp-in-progress.qvseg"]


def test_disk_level_is_bounded_merges_small_segments_and_lists_rarely(tmp_path: Path) -> None:
    entry = ec.entry_size(4) + 32
    store = _segment_store(tmp_path, max_bytes=40 * entry + 5 * 16, merge_at_segments=4, small_segment_entries=100,
                           refresh_interval_s=3600)
    for batch in range(3):
        store.put_many(*_entries(10, 10 * batch))
    assert len(list(tmp_path.glob("*.qvseg"))) == 3
    store.put_many(*_entries(10, 30))  # the fourth small segment: merged into one
    [merged] = list(tmp_path.glob("*.qvseg"))
    shas, entries = _entries(40)
    assert store.get_many(shas) == dict(enumerate(entries))
    # Past the bound, the oldest segments go (the merged one is the oldest now).
    for batch in range(4, 8):
        store.put_many(*_entries(10, 10 * batch))
    assert store.total_bytes() <= store.max_bytes and not (tmp_path / merged.name).exists()
    newest_shas, newest_entries = _entries(10, 70)
    assert store.get_many(newest_shas) == dict(enumerate(newest_entries))
    assert store.get_many(_entries(10)[0]) == {}  # evicted: a miss, re-encoded by the caller
    # Another process's segment: no directory listing on a miss until the refresh interval passes.
    other = _segment_store(tmp_path)
    other.put_many(*_entries(5, 100))
    assert store.get_many(_entries(5, 100)[0]) == {}
    store.refresh(force=True)
    assert len(store.get_many(_entries(5, 100)[0])) == 5
