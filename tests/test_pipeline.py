"""End to end on real parts: Dagster materializations, the real model, FAISS and Milvus Lite."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from quiver.errors import FileRefError
from tests.helpers import add_source, index, ingest, metadata, scifact_docs, write_jsonl

QUERIES = [
    "cancer cell proliferation", "vitamin D deficiency", "neural development in infants",
    "antibiotic resistance bacteria", "heart disease risk", "gene expression regulation",
    "immune response to infection", "diabetes insulin", "brain imaging", "pregnancy outcomes",
]


@pytest.fixture
def two_sources(tmp_path: Path, instance: Any, resources: dict[str, Any]) -> dict[str, Any]:
    docs = scifact_docs(60)
    src_a = write_jsonl(tmp_path / "scifact_a.jsonl", docs[:40])
    notes = tmp_path / "notes"
    notes.mkdir()
    for d in docs[40:]:
        (notes / f"{d['id']}.md").write_text(f"# {d['title']}\n\n{d['text']}", encoding="utf-8")
    add_source(instance, resources, "papers", src_a)
    add_source(instance, resources, "notes", notes)
    return {"papers": src_a, "notes": notes, "docs": docs}


def _materialize_all(instance: Any, resources: dict[str, Any]) -> dict[str, dict[str, Any]]:
    meta: dict[str, dict[str, Any]] = {}
    for partition in ("papers", "notes"):
        result = ingest(instance, resources, partition)
        for asset in ("documents", "chunks", "embeddings"):
            meta[f"{asset}[{partition}]"] = metadata(result, asset)
    result = index(instance, resources)
    meta["faiss_index"] = metadata(result, "faiss_index")
    meta["milvus_collection"] = metadata(result, "milvus_collection")
    return meta


def test_end_to_end_cache_and_store_agreement(two_sources: dict[str, Any], instance: Any,
                                              resources: dict[str, Any]) -> None:
    first = _materialize_all(instance, resources)
    assert first["documents[papers]"]["rows"] == 40
    assert first["documents[notes]"]["rows"] == 20
    chunks_total = first["chunks[papers]"]["rows"] + first["chunks[notes]"]["rows"]
    assert chunks_total >= 60
    assert first["embeddings[papers]"]["texts_encoded"] == first["chunks[papers]"]["rows"]
    assert first["faiss_index"]["vectors"] == chunks_total
    # Each source's vectors went into Milvus as they were embedded; the collection step found nothing to do.
    for partition in ("papers", "notes"):
        assert first[f"embeddings[{partition}]"]["milvus_upserted"] == first[f"chunks[{partition}]"]["rows"]
        assert first[f"embeddings[{partition}]"]["milvus_deleted"] == 0
    assert first["milvus_collection"]["upserted"] == 0
    assert first["milvus_collection"]["unchanged"] == chunks_total
    assert first["milvus_collection"]["collection_count"] == chunks_total
    assert first["faiss_index"]["index_type"] == "flat"

    # The materialization's data version is the Parquet content hash.
    from dagster import AssetKey

    record = instance.get_latest_materialization_event(AssetKey("embeddings"))
    assert record is not None
    tags = record.asset_materialization.tags
    assert tags["dagster/data_version"] == record.asset_materialization.metadata["sha256"].value

    # Second run, nothing changed: every stage is a cache hit and nothing is embedded.
    second = _materialize_all(instance, resources)
    for name, meta in second.items():
        assert meta["cache_hit"] is True, name
        assert meta["cache_key"] == first[name]["cache_key"], name
    assert second["embeddings[papers]"]["texts_encoded"] == 0
    assert second["embeddings[notes]"]["texts_encoded"] == 0

    # FAISS and Milvus hold the same vectors under the same ids and rank identically.
    faiss_version = resources["faiss_store"].open_current()
    milvus = resources["milvus"]
    assert faiss_version.index.ntotal == milvus.count() == chunks_total
    pool = resources["model_pool"]
    vectors = pool.encode(QUERIES)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    faiss_hits = faiss_version.search(vectors, 10)
    milvus_hits = milvus.search(vectors, 10)
    for query, f_hits, m_hits in zip(QUERIES, faiss_hits, milvus_hits, strict=True):
        assert [h.vector_id for h in f_hits] == [h.vector_id for h in m_hits], query
        np.testing.assert_allclose([h.score for h in f_hits], [h.score for h in m_hits], atol=1e-4)
        assert len(f_hits) == 10


def test_changed_source_reembeds_only_that_partition_and_removal_drops_vectors(
    two_sources: dict[str, Any], instance: Any, resources: dict[str, Any]
) -> None:
    first = _materialize_all(instance, resources)
    docs = two_sources["docs"][:40]
    docs[0] = {**docs[0], "text": docs[0]["text"] + " An added closing sentence about mitochondria."}
    write_jsonl(two_sources["papers"], docs)

    papers = ingest(instance, resources, "papers")
    assert metadata(papers, "documents")["cache_hit"] is False
    embedded = metadata(papers, "embeddings")
    assert embedded["cache_hit"] is False
    assert 1 <= embedded["milvus_upserted"] <= 3  # only the edited document's chunks are rewritten
    assert embedded["milvus_unchanged"] == embedded["rows"] - embedded["milvus_upserted"]
    assert embedded["milvus_deleted"] == 0
    assert embedded["texts_encoded"] == embedded["milvus_upserted"]
    notes = ingest(instance, resources, "notes")
    assert metadata(notes, "embeddings")["cache_hit"] is True
    result = index(instance, resources)
    milvus_meta = metadata(result, "milvus_collection")
    assert (milvus_meta["upserted"], milvus_meta["deleted"]) == (0, 0)
    expected = metadata(papers, "chunks")["rows"] + metadata(notes, "chunks")["rows"]
    assert expected - first["milvus_collection"]["collection_count"] in (0, 1)  # the edit may add a chunk
    assert milvus_meta["collection_count"] == expected
    assert metadata(result, "faiss_index")["vectors"] == expected

    # Removing a source drops its partition and, on the next index run, its vectors.
    resources["sources"].remove("notes")
    instance.delete_dynamic_partition("sources", "notes")
    result = index(instance, resources)
    papers_chunks = metadata(papers, "chunks")["rows"]
    assert metadata(result, "faiss_index")["vectors"] == papers_chunks
    milvus_meta = metadata(result, "milvus_collection")
    assert milvus_meta["deleted"] == first["chunks[notes]"]["rows"]
    assert resources["milvus"].count() == papers_chunks
    hits = resources["faiss_store"].open_current().search(resources["model_pool"].encode(QUERIES), 50)
    assert {h.source for row in hits for h in row} == {"papers"}


def test_bad_source_fails_clearly_and_corrupts_nothing(
    two_sources: dict[str, Any], tmp_path: Path, instance: Any, resources: dict[str, Any]
) -> None:
    first = _materialize_all(instance, resources)
    before = resources["store"].read_latest(["documents"], "papers")
    lines = two_sources["papers"].read_text().splitlines()
    lines.insert(5, '{"id": "oops", "text": ')
    two_sources["papers"].write_text("\n".join(lines) + "\n")

    result = ingest(instance, resources, "papers", raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    error = failure.step_failure_data.user_failure_data
    assert error is not None
    assert error.description == (f"bad input in source 'papers': {two_sources['papers']}:6: "
                                 "malformed JSON (Expecting value at column 24)")
    # The last good output of the failed partition and the other partition are untouched.
    assert resources["store"].read_latest(["documents"], "papers") == before
    resources["store"].check(before)
    again = index(instance, resources)
    assert metadata(again, "faiss_index")["cache_hit"] is True
    assert metadata(again, "faiss_index")["vectors"] == first["faiss_index"]["vectors"]

    # With on_bad_record=skip the good records go through and the bad one is listed.
    skip = ingest(instance, resources, "papers",
                  run_config={"ops": {"documents": {"config": {"on_bad_record": "skip"}}}})
    meta = metadata(skip, "documents")
    assert meta["rows"] == 40
    assert meta["bad_records"] == 1
    assert meta["bad_record_examples"][0].startswith(f"{two_sources['papers']}:6: malformed JSON")


def _error_text(result: Any) -> str:
    failure = next(e for e in result.all_events if e.is_step_failure)
    error, parts = failure.step_failure_data.error, []
    while error is not None:
        parts.append(error.message)
        error = error.cause
    return "\n".join(parts)


def test_io_manager_rejects_tampered_and_foreign_filerefs(
    two_sources: dict[str, Any], tmp_path: Path, instance: Any, resources: dict[str, Any]
) -> None:
    from dagster import materialize

    from platform_defs.definitions import ALL_ASSETS

    ingest(instance, resources, "notes")
    store = resources["store"]
    ref = store.read_latest(["chunks"], "notes")
    Path(ref.path).write_bytes(Path(ref.path).read_bytes() + b"junk")

    only_embeddings = materialize(ALL_ASSETS, instance=instance, resources=resources, partition_key="notes",
                                  selection=["embeddings"], raise_on_error=False)
    assert not only_embeddings.success
    assert f"FileRef {ref.path} was modified" in _error_text(only_embeddings)

    # A full run notices the damaged cache entry, rewrites the same content and heals the reference.
    healed = ingest(instance, resources, "notes")
    assert metadata(healed, "chunks")["cache_hit"] is False
    assert metadata(healed, "chunks")["sha256"] == ref.sha256
    assert metadata(healed, "embeddings")["cache_hit"] is True
    store.check(ref)

    # A pointer to a file outside the storage root is refused.
    outside = tmp_path / "outside.parquet"
    outside.write_bytes(Path(ref.path).read_bytes())
    store.write_latest(["chunks"], "notes", type(ref)(str(outside), ref.sha256, ref.rows, ref.bytes, ref.schema))
    foreign = materialize(ALL_ASSETS, instance=instance, resources=resources, partition_key="notes",
                          selection=["embeddings"], raise_on_error=False)
    assert not foreign.success
    assert f"FileRef {outside} points outside the storage root" in _error_text(foreign)
    with pytest.raises(FileRefError):
        store.check(store.read_latest(["chunks"], "notes"))
