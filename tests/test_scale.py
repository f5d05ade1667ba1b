"""What keeps cost linear at scale, on real parts: Milvus key listings in pages, an embedding cache whose
misses do not list its directory, and one source embedded by parallel shard steps."""

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import resources.embedding_cache as ec
from resources.embedding_cache import pack_entry, text_sha
from resources.milvus_store import MilvusStore
from tests.helpers import (
    CHECKS,
    SMALL_CHUNKS,
    add_source,
    assert_stores_exact,
    check_results,
    chunk_rows,
    index,
    ingest,
    metadata,
    scifact_docs,
    write_jsonl,
)

DIM = 4


def _row(i: int, source: str = "s") -> dict[str, Any]:
    return {"id": i, "vector": [1.0, float(i % 7), 0.5, 0.25], "source": source, "doc_id": f"d{i}",
            "chunk_id": f"d{i}#0", "title": "", "text": f"text {i}", "vector_key": f"{i:032x}"}


def _corpus(n: int, start: int = 0, chars: int = 450) -> list[dict[str, Any]]:
    return [{**d, "text": d["text"][:chars]} for d in scifact_docs(n, start)]


def test_key_listings_come_in_pages_and_miss_nothing(quiver_home: Path) -> None:
    """A collection with many more keys than a page, written in several requests (several segments), with
    deletions: every listing is in pages of at most key_page_rows and holds exactly what the collection does."""
    store = MilvusStore(uri=str(quiver_home / "paged.db"), collection="paged", key_page_rows=7)
    store.ensure_collection(DIM)
    rng = np.random.default_rng(18)
    ids = [int(i) for i in rng.choice(10**12, size=60, replace=False)]
    for start in range(0, 60, 13):
        store.upsert_rows([_row(i, "a" if n % 3 else "b") for n, i in enumerate(ids[start:start + 13], start)])
    store.delete_ids(ids[:5], sources={"a", "b"})
    held = {i: ("a" if n % 3 else "b") for n, i in enumerate(ids) if n >= 5}
    pages = list(store.key_pages())
    assert all(1 <= len(page) <= 7 for page in pages) and len(pages) >= 55 // 7
    assert [vid for page in pages for vid, _, _ in page] == sorted(held)  # in id order, each once
    assert {vid: source for page in pages for vid, _, source in page} == held
    assert dict(store.iter_keys("b")) == {i: f"{i:032x}" for i, s in held.items() if s == "b"}
    assert store.keys_of([*ids[:8], 5], "a") == {i: f"{i:032x}" for i in ids[5:8] if held[i] == "a"}
    current = np.array(sorted(i for i, s in held.items() if s == "a")[3:], np.int64)
    gone = [vid for page in store.ids_not_in("a", current) for vid in page]
    assert sorted(gone) == sorted(i for i, s in held.items() if s == "a")[:3]


def test_embedding_a_source_never_lists_all_its_keys_at_once(tmp_path: Path, instance: Any,
                                                             resources: dict[str, Any],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The embeddings step compares each batch with what Milvus holds of that batch's ids, and finds the
    vectors to delete by paging: no dict of every key of the source, and Milvus stays exact."""
    resources["milvus"] = resources["milvus"].model_copy(update={"key_page_rows": 8})

    def whole_listing(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("the whole key listing was read into one dict")

    monkeypatch.setattr(MilvusStore, "existing_keys", whole_listing)
    docs = {d["id"]: d for d in _corpus(30)}
    file = tmp_path / "paged.jsonl"
    add_source(instance, resources, "paged", write_jsonl(file, list(docs.values())))
    first = metadata(ingest(instance, resources, "paged", run_config=SMALL_CHUNKS), "embeddings")
    assert first["milvus_upserted"] == first["rows"] > 8 * 4
    before = chunk_rows(resources, "paged")
    edited = sorted(docs)[:2]
    for doc_id in edited:
        docs[doc_id] = {**docs[doc_id], "text": docs[doc_id]["text"][:100] + " Edited for paging."}
    del docs[sorted(docs)[5]]
    write_jsonl(file, list(docs.values()))
    meta = metadata(ingest(instance, resources, "paged", run_config={
        "ops": {**SMALL_CHUNKS["ops"], "embeddings": {"config": {"texts_per_batch": 5}}}}), "embeddings")
    after = chunk_rows(resources, "paged")
    assert meta["milvus_deleted"] == len(set(before) - set(after)) > 0
    assert meta["milvus_upserted"] == sum(1 for vid, row in after.items() if before.get(vid) != row) > 0
    assert meta["milvus_unchanged"] == meta["rows"] - meta["milvus_upserted"]
    monkeypatch.undo()
    checks = check_results(index(instance, resources))
    assert all(checks[name].passed for name in CHECKS)
    assert_stores_exact(resources, {"paged": docs})


def test_a_cache_miss_does_not_list_the_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With segments seen at once (no refresh interval), many misses cost one listing of the disk level, not one
    each; a segment another process writes is still found at the next lookup, and this process's own
    writes need no listing."""
    from upath import UPath

    from quiver.segments import SegmentStore

    listed: list[str] = []
    for name in ("listdir", "scandir"):
        real = getattr(os, name)

        def counting(path: Any = ".", _real: Any = real) -> Any:
            if os.fspath(path).rstrip("/") == str(tmp_path):
                listed.append(os.fspath(path))
            return _real(path)

        monkeypatch.setattr(os, name, counting)

    def entries(n: int, start: int) -> tuple[list[bytes], list[bytes]]:
        shas = [text_sha(f"text {i}") for i in range(start, start + n)]
        return shas, [pack_entry(sha, np.full(4, i, np.float32)) for i, sha in zip(range(start, start + n), shas,
                                                                                  strict=True)]

    store = SegmentStore(UPath(str(tmp_path)), DIM, ec.entry_size(DIM), refresh_interval_s=0,
                         merge_at_segments=1000)  # no merge due: maintenance lists the directory once each time
    other = SegmentStore(UPath(str(tmp_path)), DIM, ec.entry_size(DIM), refresh_interval_s=0)
    store.put_many(*entries(3, 0))
    for i in range(40):
        assert store.get_many(entries(1, 1000 + i)[0]) == {}  # a miss
        store.put_many(*entries(1, 1000 + i))  # what the caller does after encoding it
        assert len(store.get_many(entries(1, 1000 + i)[0])) == 1
    assert len(listed) <= 1
    shas, raw = entries(2, 500)
    other.put_many(shas, raw)
    assert store.get_many(shas) == dict(enumerate(raw))  # another process's segment, seen at once
    assert len(listed) <= 2
    store.maintain()
    assert len(listed) <= 3 and store.listings == len(listed)


def test_shards_are_stable_under_small_edits_and_read_as_one_table(resources: dict[str, Any]) -> None:
    """Chunks go to shards by their document's id, so editing, adding or deleting a document changes only its
    own shard; a sharded output is one FileRef whose shards readers stream as one table, and whose check
    refuses a shard changed behind its back."""
    import pyarrow as pa

    from quiver.errors import FileRefError
    from quiver.shards import shard_count, split_batches
    from resources.fileref import FileRef, shard_ref

    assert [shard_count(n, 100) for n in (0, 100, 101, 200, 201, 1000)] == [1, 1, 2, 2, 4, 16]
    assert shard_count(10**6, 0) == 1
    # A source keeps its count from a quarter to twice its shards' rows: no reshuffle at a boundary.
    assert [shard_count(n, 100, 16) for n in (401, 1600, 1601, 3200, 3201, 400)] == [16, 16, 16, 16, 64, 4]
    assert shard_count(50, 100, 1) == 1 and shard_count(150, 100, 1) == 1 and shard_count(201, 100, 1) == 4

    def table(doc_ids: list[str]) -> pa.RecordBatch:
        return pa.RecordBatch.from_pydict({"doc_id": doc_ids, "chunk_id": [f"{d}#0" for d in doc_ids]})

    def shards_of(doc_ids: list[str]) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for shard, rows in split_batches([table(doc_ids[i:i + 7]) for i in range(0, len(doc_ids), 7)], 8):
            out.setdefault(shard, []).extend(rows.column("doc_id").to_pylist())
        return out

    docs = [f"doc-{i}" for i in range(400)]
    before = shards_of(docs)
    assert len(before) == 8 and all(30 <= len(v) <= 70 for v in before.values())
    assert sorted(d for v in before.values() for d in v) == sorted(docs)
    assert all(v == sorted(v, key=docs.index) for v in before.values())  # chunk order within a shard
    after = shards_of([d for d in docs if d != "doc-3"] + ["doc-new"])
    touched = {s for s in set(before) | set(after) if before.get(s) != after.get(s)}
    assert 1 <= len(touched) <= 2

    store = resources["store"]
    refs: list[FileRef] = []
    for _shard, ids in sorted(before.items()):
        with store.parquet_writer(["embeddings", "_shards"], "s", table(ids).schema, prune=False) as writer:
            writer.write_batch(table(ids))
        refs.append(writer.ref)
    merged = shard_ref(str(store.asset_dir(["embeddings", "_shards"], "s")), refs)
    assert merged.rows == 400 and store.check(merged) == merged
    assert FileRef.from_json(merged.to_json()) == merged
    store.write_latest(["embeddings"], "s", merged)
    assert store.read_latest(["embeddings"], "s") == merged
    streamed = [d for b in store.iter_batches(merged, 50, columns=["doc_id"]) for d in b.column("doc_id").to_pylist()]
    assert streamed == [d for _, v in sorted(before.items()) for d in v]
    assert store.read_table(merged).num_rows == 400 and store.parquet_schema(merged).names == ["doc_id", "chunk_id"]
    assert store.prune_shards(merged.path, [FileRef(**{**merged.as_dict(), "parts": merged.parts[:6]})]) == 2
    with pytest.raises(FileRefError, match="no longer exists"):
        store.check(merged)
    Path(refs[2].path).write_bytes(Path(refs[3].path).read_bytes())
    with pytest.raises(FileRefError, match="was modified"):
        store.check(shard_ref(merged.path, refs[:6]))


def _sharded_assets() -> list[Any]:
    from assets.chunks import chunks
    from assets.common import with_code_versions
    from assets.documents import documents
    from assets.embed_shards import sharded_embeddings
    from assets.faiss_index import faiss_index
    from assets.milvus_collection import milvus_collection
    from assets.retrieval_eval import retrieval_eval

    return with_code_versions([documents, chunks, sharded_embeddings, faiss_index, milvus_collection,
                               retrieval_eval])


def _embedding_rows(resources: dict[str, Any], source: str) -> dict[int, dict[str, Any]]:
    store = resources["store"]
    table = store.read_table(store.check(store.read_latest(["embeddings"], source)))
    return {row["vector_id"]: row for row in table.to_pylist()}


def test_a_sharded_source_equals_the_unsharded_one_and_a_small_change_touches_its_shards_only(
        tmp_path: Path, instance: Any, resources: dict[str, Any]) -> None:
    from dagster import materialize

    from platform_defs.definitions import ALL_CHECKS
    from platform_defs.jobs import INDEX_ASSETS, INGEST_ASSETS

    sharded = _sharded_assets()
    docs = {d["id"]: d for d in _corpus(48)}
    file = write_jsonl(tmp_path / "big.jsonl", list(docs.values()))
    add_source(instance, resources, "big.v2", file)
    plain = _embedding_rows(resources, "big.v2") if ingest(instance, resources, "big.v2", SMALL_CHUNKS) else None
    config = {"ops": {**SMALL_CHUNKS["ops"], "embeddings": {"ops": {
        "plan_embedding_shards": {"config": {"shard_rows": 10}}}}}}

    def ingest_sharded() -> Any:
        return materialize(sharded, instance=instance, resources=resources, partition_key="big.v2",
                           selection=list(INGEST_ASSETS), run_config=config)

    first = ingest_sharded()
    meta = metadata(first, "embeddings")
    ref = resources["store"].read_latest(["embeddings"], "big.v2")
    assert meta["shards"] == len(ref.parts) >= 8 and ref.rows == len(plain)
    assert sum(1 for e in first.all_events if e.is_step_success and e.step_key.startswith(
        "embeddings.embed_shard[")) == meta["shards"]
    rows = _embedding_rows(resources, "big.v2")
    assert set(rows) == set(plain)
    for vid, row in rows.items():  # the same vectors, ids, keys and payload as the one-step asset's
        assert {k: v for k, v in row.items() if k != "vector"} == {k: v for k, v in plain[vid].items()
                                                                    if k != "vector"}
        np.testing.assert_allclose(row["vector"], plain[vid]["vector"], atol=1e-6)

    again = metadata(ingest_sharded(), "embeddings")  # nothing changed: every shard reused, nothing encoded
    assert (again["shards_reused"], again["texts_encoded"]) == (meta["shards"], 0)
    edited = sorted(docs)[7]
    docs[edited] = {**docs[edited], "text": docs[edited]["text"][:200] + " A small edit."}
    write_jsonl(file, list(docs.values()))
    small = metadata(ingest_sharded(), "embeddings")
    assert small["shards"] == meta["shards"] and small["shards_reused"] == meta["shards"] - 1
    assert 0 < small["texts_encoded"] <= 4

    result = materialize([*sharded, *ALL_CHECKS], instance=instance, resources=resources,
                         selection=list(INDEX_ASSETS))
    checks = check_results(result)
    assert all(checks[name].passed for name in CHECKS)
    assert_stores_exact(resources, {"big.v2": docs})
    assert chunk_rows(resources, "big.v2").keys() == _embedding_rows(resources, "big.v2").keys()


def test_shard_steps_run_at_most_the_model_limit_at_once(tmp_path: Path, quiver_home: Path, instance: Any,
                                                         resources: dict[str, Any]) -> None:
    """A real multiprocess run of the sharded asset: the shard steps carry the `model` memory class, and the
    executor's memory-bound tag limit (2 here: 60% of a 3500 MiB budget over 1 GiB a step, with 8 cores and 6
    concurrent steps allowed) bounds how many run at once, as the run's event log shows."""
    import json
    import subprocess
    import sys

    from tests.conftest import PROJECT
    from tests.test_concurrency import _run_messages, _steps, max_overlap

    add_source(instance, resources, "wide", write_jsonl(tmp_path / "wide.jsonl", _corpus(40, chars=300)))
    env = {**os.environ, "DAGSTER_HOME": str(quiver_home), "PYTHONPATH": str(PROJECT),
           "QUIVER_EMBED_SHARD_ROWS": "8", "QUIVER_EXECUTION_MODE": "multiprocess",
           "QUIVER_MEMORY_NEED_MODEL": "1GiB", "QUIVER_MEMORY_BUDGET": "3500MiB", "QUIVER_CPU_COUNT": "8",
           "QUIVER_MEMORY_AVAILABLE": "16GiB", "QUIVER_MEMORY_NEED_IO": "64MiB", "QUIVER_MEMORY_NEED_LIGHT": "64MiB"}
    proc = subprocess.run([str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m",
                           "platform_defs", "--select", "documents,chunks,embeddings", "--partition", "wide",
                           "--config-json", json.dumps({"execution": {"config": {"max_concurrent": 6}}})],
                          cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = instance.get_runs(limit=1)[0].run_id
    assert any(m.startswith("memory limits: model 2 ") for m in _run_messages(instance, run_id))
    shards = {step: span for (_, step), span in _steps(instance, [run_id]).items()
              if step.startswith("embeddings.embed_shard[")}
    ref = resources["store"].read_latest(["embeddings"], "wide")
    assert len(shards) == len(ref.parts) >= 4
    assert 1 <= max_overlap(list(shards.values())) <= 2
    assert ref.rows == len(chunk_rows(resources, "wide"))
