"""End to end on real parts: Dagster materializations, the real model, FAISS and Milvus Lite."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from quiver.errors import FileRefError
from tests.helpers import add_source, check_results, index, ingest, metadata, scifact_docs, write_jsonl

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
    # Each source's vectors went into Milvus as they were embedded, and each source was marked exact: the
    # collection step compared the marks with the embeddings and had nothing to list or write.
    for partition in ("papers", "notes"):
        assert first[f"embeddings[{partition}]"]["milvus_upserted"] == first[f"chunks[{partition}]"]["rows"]
        assert first[f"embeddings[{partition}]"]["milvus_deleted"] == 0
    assert first["milvus_collection"]["cache_hit"] is True
    assert first["milvus_collection"]["vectors"] == chunks_total == resources["milvus"].count()
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
    assert milvus_meta["cache_hit"] is True  # the embeddings step left both sources marked exact
    expected = metadata(papers, "chunks")["rows"] + metadata(notes, "chunks")["rows"]
    assert expected - first["milvus_collection"]["vectors"] in (0, 1)  # the edit may add a chunk
    assert milvus_meta["vectors"] == expected == resources["milvus"].count()
    assert metadata(result, "faiss_index")["vectors"] == expected

    # Removing a source drops its partition and, on the next index run, its vectors.
    resources["sources"].remove("notes")
    instance.delete_dynamic_partition("sources", "notes")
    result = index(instance, resources)
    papers_chunks = metadata(papers, "chunks")["rows"]
    assert metadata(result, "faiss_index")["vectors"] == papers_chunks
    milvus_meta = metadata(result, "milvus_collection")
    assert milvus_meta["deleted"] == first["chunks[notes]"]["rows"]
    assert (milvus_meta["removed_sources"], milvus_meta["synced_sources"]) == (["notes"], [])
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


def test_a_source_without_a_good_output_never_blocks_the_indexes(
    two_sources: dict[str, Any], tmp_path: Path, instance: Any, resources: dict[str, Any]
) -> None:
    first = _materialize_all(instance, resources)
    # A new source whose first run fails on bad input, and another good new source.
    bad = write_jsonl(tmp_path / "bad.jsonl", scifact_docs(3, start=70))
    bad.write_text(bad.read_text() + '{"id": "broken", "text": \n', encoding="utf-8")
    add_source(instance, resources, "bad", bad)
    good_docs = scifact_docs(5, start=80)
    add_source(instance, resources, "good", write_jsonl(tmp_path / "good.jsonl", good_docs))
    assert not ingest(instance, resources, "bad", raise_on_error=False).success
    ingest(instance, resources, "good")
    result = index(instance, resources)
    for asset in ("faiss_index", "milvus_collection"):
        meta = metadata(result, asset)
        assert list(meta["skipped_sources"]) == ["bad"], asset
        assert "has not been materialized yet" in meta["skipped_sources"]["bad"]
    assert all(e.passed for e in check_results(result).values())
    papers_and_notes = first["faiss_index"]["vectors"]
    assert metadata(result, "faiss_index")["vectors"] > papers_and_notes
    vectors = resources["model_pool"].encode([good_docs[0]["title"]])
    assert resources["faiss_store"].open_current().search(vectors, 1)[0][0].doc_id == good_docs[0]["id"]
    assert resources["milvus"].search(vectors, 1)[0][0].doc_id == good_docs[0]["id"]

    # A source whose output vanishes behind Quiver's back is skipped too, and its vectors are left as they are,
    # through an incremental update and a rebuild alike.
    notes = resources["store"].read_latest(["embeddings"], "notes")
    Path(notes.path).unlink()
    for config in ({}, {"ops": {"faiss_index": {"config": {"rebuild": True}}}}):
        again = index(instance, resources, run_config=config)
        assert set(metadata(again, "faiss_index")["skipped_sources"]) == {"bad", "notes"}
        assert metadata(again, "faiss_index")["vectors_left_as_they_are"] == first["chunks[notes]"]["rows"]
        held = resources["faiss_store"].open_current().payload.column("source").to_pylist()
        assert held.count("notes") == first["chunks[notes]"]["rows"]
        assert resources["milvus"].count(source="notes") == first["chunks[notes]"]["rows"]


def test_partition_keys_that_are_not_source_names_are_refused(instance: Any, resources: dict[str, Any],
                                                              quiver_home: Path) -> None:
    from dagster import materialize

    from platform_defs.definitions import ALL_ASSETS

    for key in ("../../escape", "a/b", ".hidden"):
        instance.add_dynamic_partitions("sources", [key])  # what the UI or GraphQL may add
        result = materialize(ALL_ASSETS, instance=instance, resources=resources, partition_key=key,
                             selection=["documents"], raise_on_error=False)
        assert not result.success
        failure = next(e for e in result.all_events if e.is_step_failure)
        assert f"partition key {key!r} is not allowed" in failure.step_failure_data.user_failure_data.description
    root = Path(resources["store"].root)
    outside = [p for p in quiver_home.parent.rglob("*") if root not in p.parents and p != root
               and quiver_home not in p.parents and p != quiver_home]
    assert outside == []  # nothing was written anywhere but inside the home
    with pytest.raises(Exception, match="is not allowed"):
        resources["store"].asset_dir(["documents"], "../../escape")
    # Nor do such keys block the indexes of the good sources.
    add_source(instance, resources, "good", write_jsonl(quiver_home / "good.jsonl", scifact_docs(2)))
    ingest(instance, resources, "good")
    indexed = index(instance, resources)
    skipped = metadata(indexed, "faiss_index")["skipped_sources"]
    assert sorted(skipped) == sorted(["../../escape", "a/b", ".hidden"])
    assert all("is not allowed" in why for why in skipped.values())
    assert all(e.passed for e in check_results(indexed).values())


def test_a_moved_home_keeps_every_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            quiver_home: Path) -> None:
    import shutil

    from dagster import DagsterInstance

    from platform_defs.resources import build_resources
    from resources.milvus_clients import close_milvus_clients

    inbox = quiver_home / "inbox"
    inbox.mkdir()
    write_jsonl(inbox / "papers.jsonl", scifact_docs(6))

    def run_everything(first: bool) -> dict[str, dict[str, Any]]:
        resources = build_resources(resolve_env=True)
        with DagsterInstance.get() as instance:
            if first:  # the second time, the source is found as registered, relative to the home
                add_source(instance, resources, "papers", inbox / "papers.jsonl")
            assert resources["sources"].get("papers").path == str(inbox / "papers.jsonl")
            meta = {a: metadata(r, a) for r in (ingest(instance, resources, "papers"),)
                    for a in ("documents", "chunks", "embeddings")}
            indexed = index(instance, resources)
            meta.update({a: metadata(indexed, a) for a in ("faiss_index", "milvus_collection")})
            assert all(e.passed for e in check_results(indexed).values())
        close_milvus_clients()
        return meta

    run_everything(first=True)
    moved = tmp_path / "restored-elsewhere"
    shutil.move(str(quiver_home), str(moved))
    monkeypatch.setenv("DAGSTER_HOME", str(moved))
    inbox = moved / "inbox"
    again = run_everything(first=False)
    assert {a: m["cache_hit"] for a, m in again.items()} == dict.fromkeys(again, True)
    assert again["embeddings"]["texts_encoded"] == 0


def test_a_source_that_suddenly_reads_empty_is_refused_not_emptied(tmp_path: Path, instance: Any,
                                                                   resources: dict[str, Any]) -> None:
    notes = tmp_path / "mounted"
    notes.mkdir()
    (notes / "a.md").write_text("# A\n\nSome text about cells.", encoding="utf-8")
    add_source(instance, resources, "mounted", notes)
    ingest(instance, resources, "mounted")
    before = resources["store"].read_latest(["documents"], "mounted")
    (notes / "a.md").unlink()  # what a mount that vanished below the source directory looks like
    result = ingest(instance, resources, "mounted", raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "no document read, where the last output had 1" in failure.step_failure_data.user_failure_data.description
    assert resources["store"].read_latest(["documents"], "mounted") == before
    emptied = ingest(instance, resources, "mounted", {"ops": {"documents": {"config": {"allow_empty": True}}}})
    assert metadata(emptied, "documents")["rows"] == 0
