"""Exact incremental re-indexing on real parts: random edit cycles, a step killed mid-insert, a failing
encoder, and async against sync."""

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from dagster import DagsterInstance

from assets.embed_pipeline import PipelineSettings, embed_partition_vectors
from quiver.vectors import embeddings_schema
from resources.embedding_cache import CacheStats
from resources.milvus_clients import close_milvus_clients
from resources.model_pool import ModelPool
from tests.conftest import PROJECT
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
    milvus_rows,
    scifact_docs,
    write_jsonl,
)


def _corpus(n: int, start: int = 0, chars: int = 450) -> list[dict[str, Any]]:
    return [{**d, "text": d["text"][:chars]} for d in scifact_docs(n, start)]


def test_random_edit_cycles_keep_faiss_and_milvus_exact(tmp_path: Path, instance: Any,
                                                         store_target: dict[str, Any]) -> None:
    """On Milvus Lite and on the real Milvus server alike."""
    resources = store_target
    rng = random.Random(20261123)
    pool = _corpus(140)
    spare = iter(pool[60:])
    docs = {name: {d["id"]: d for d in pool[i * 20:(i + 1) * 20]} for i, name in enumerate(("alpha", "beta", "gamma"))}
    files = {name: tmp_path / f"{name}.jsonl" for name in docs}
    indexed: dict[str, dict[int, tuple[str, str, str]]] = {}  # what each source's vectors should be in Milvus

    def ingest_source(name: str) -> dict[str, Any]:
        write_jsonl(files[name], list(docs[name].values()))
        before = indexed.get(name, {})
        meta = metadata(ingest(instance, resources, name, run_config=SMALL_CHUNKS), "embeddings")
        after = indexed[name] = chunk_rows(resources, name)
        assert meta["milvus_deleted"] == len(set(before) - set(after)), name
        assert meta["milvus_upserted"] == sum(1 for vid, row in after.items() if before.get(vid) != row), name
        assert meta["milvus_upserted"] + meta["milvus_unchanged"] == meta["rows"] == len(after)
        return meta

    def index_and_check() -> dict[str, Any]:
        result = index(instance, resources, run_config={"ops": {"faiss_index": {"config": {
            "rebuild_after_fraction": 0.5}}}})
        checks = check_results(result)
        assert {name: checks[name].passed for name in CHECKS} == dict.fromkeys(CHECKS, True)
        assert_stores_exact(resources, docs)
        return metadata(result, "faiss_index")

    for name in docs:
        add_source(instance, resources, name, files[name])
        write_jsonl(files[name], list(docs[name].values()))
        ingest_source(name)
    modes = [index_and_check()["mode"]]

    for cycle in range(1, 5):
        if cycle == 3:  # a whole source disappears
            resources["sources"].remove("gamma")
            instance.delete_dynamic_partition("sources", "gamma")
            del docs["gamma"], indexed["gamma"]
            modes.append(index_and_check()["mode"])
            continue
        if cycle == 4:  # and comes back with other documents
            docs["gamma"] = {d["id"]: d for d in (next(spare) for _ in range(6))}
            add_source(instance, resources, "gamma", files["gamma"])
        changed_doc = None
        for name in sorted(docs):
            ids = sorted(docs[name])
            for doc_id in rng.sample(ids, 2):  # longer or shorter: the number of chunks changes
                doc = docs[name][doc_id]
                cut = rng.choice([len(doc["text"]) // 3, len(doc["text"])])
                docs[name][doc_id] = {**doc, "text": doc["text"][:cut] + f" Revision {cycle} of {doc_id}."}
                changed_doc = (name, doc_id)
            del docs[name][rng.choice(sorted(set(docs[name]) - {changed_doc[1]}))]
            new = next(spare)
            docs[name][new["id"]] = new
            meta = ingest_source(name)
            assert meta["cache_hit"] is False and meta["milvus_upserted"] >= 1
        modes.append(index_and_check()["mode"])

        # The stored vector of an edited document is the model's vector of its new text, in both stores.
        name, doc_id = changed_doc
        chunk = next(row for row in chunk_rows(resources, name).items() if row[1][1] == f"{doc_id}#0")
        text = resources["store"].read_table(resources["store"].read_latest(["chunks"], name),
                                             columns=["chunk_id", "text"]).to_pylist()
        chunk_text = next(r["text"] for r in text if r["chunk_id"] == f"{doc_id}#0")
        assert f"Revision {cycle}" in "".join(r["text"] for r in text if r["chunk_id"].startswith(f"{doc_id}#"))
        want = resources["model_pool"].encode([chunk_text])[0]
        np.testing.assert_allclose(milvus_rows(resources)[chunk[0]]["vector"], want, atol=1e-5)
        np.testing.assert_allclose(resources["faiss_store"].open_current().index.reconstruct(chunk[0]), want,
                                   atol=1e-5)
    assert modes[0] == "rebuild" and "incremental" in modes and modes.count("rebuild") >= 2


def test_store_drift_is_reported_then_repaired(tmp_path: Path, instance: Any, resources: dict[str, Any]) -> None:
    """The checks see what a store holds, not what the pipeline believes it wrote."""
    add_source(instance, resources, "drift", write_jsonl(tmp_path / "d.jsonl", _corpus(8)))
    ingest(instance, resources, "drift")
    index(instance, resources)
    milvus = resources["milvus"]
    some = sorted(milvus.existing_keys())[:3]
    milvus.delete_ids(some[:2])
    row = milvus.loaded_client().query(milvus.collection, filter=f"id == {some[2]}", output_fields=["*"])[0]
    milvus.upsert_rows([{**row, "vector_key": "0" * 32}])
    stray = {**row, "id": 12345, "doc_id": "ghost"}
    milvus.upsert_rows([stray])
    result = index(instance, resources, run_config={"ops": {"milvus_collection": {"config": {"force": True}}}},
                   raise_on_error=False)
    # The collection step repairs the drift; had it not, the blocking check would have failed the run.
    assert metadata(result, "milvus_collection")["upserted"] == 3
    assert metadata(result, "milvus_collection")["deleted"] == 1
    assert check_results(result)["milvus_collection:matches_chunks"].passed
    # Drift introduced after the last write is what the check reports, with the numbers.
    expected = milvus.count()
    milvus.delete_ids(some[:1])
    milvus.upsert_rows([stray])
    from dagster import AssetCheckKey, AssetKey, AssetSelection, materialize

    from platform_defs.definitions import ALL_ASSETS, ALL_CHECKS

    checks = materialize([*ALL_ASSETS, *ALL_CHECKS], instance=instance, resources=resources, raise_on_error=False,
                         selection=AssetSelection.checks(AssetCheckKey(AssetKey("milvus_collection"),
                                                                       "matches_chunks")))
    evaluation = check_results(checks)["milvus_collection:matches_chunks"]
    assert not evaluation.passed
    assert evaluation.description == (f"Milvus: 1 missing, 1 stale, 0 out of date, 0 duplicated "
                                      f"(holds {expected}, expected {expected})")
    assert evaluation.metadata["examples"].value["missing"] == [some[0]]
    assert evaluation.metadata["examples"].value["stale"] == [12345]


def _wal_bytes(milvus_db: Path, collection: str) -> int:
    wal = milvus_db / "collections" / collection / "wal"
    return sum(f.stat().st_size for f in wal.rglob("*") if f.is_file()) if wal.exists() else 0


def _step_processes(root: psutil.Process) -> list[psutil.Process]:
    """The processes a forkserver forked for steps (not the forkserver itself)."""
    found = []
    for proc in root.children(recursive=True):
        try:
            if "multiprocessing.forkserver" in " ".join(proc.parent().cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_step_killed_mid_insert_then_rerun_ends_exact(quiver_home: Path, tmp_path: Path, instance: Any,
                                                      store_target: dict[str, Any]) -> None:
    """kill -9 in the middle of the upserts, on Milvus Lite and on the real Milvus server alike."""
    resources = store_target
    first = _corpus(70, chars=600)
    source = write_jsonl(tmp_path / "big.jsonl", first)
    add_source(instance, resources, "big", source)
    ingest(instance, resources, "big", run_config=SMALL_CHUNKS)
    index(instance, resources)
    # Every document changes, some go, some come: the next run has many vectors to replace and delete.
    second = [{**d, "text": "Updated abstract. " + d["text"][::-1][:400]} for d in first[10:]] + _corpus(10, 200)
    write_jsonl(source, second)
    from dagster import materialize

    from platform_defs.definitions import ALL_ASSETS

    materialize(ALL_ASSETS, instance=instance, resources=resources, partition_key="big",
                selection=["documents", "chunks"], run_config=SMALL_CHUNKS)
    close_milvus_clients()  # Milvus Lite admits one process: the step's

    milvus = resources["milvus"]
    new_keys = {row[2] for row in chunk_rows(resources, "big").values()}

    def inserting() -> bool:
        """Whether the step has begun upserting (the test may not open a Lite database the step holds)."""
        if milvus.is_lite:
            return _wal_bytes(Path(milvus.uri), milvus.collection) > wal_before
        return bool(new_keys & set(milvus.existing_keys(source="big").values()))

    wal_before = _wal_bytes(Path(milvus.uri), milvus.collection) if milvus.is_lite else 0
    config = tmp_path / "kill.yaml"
    # Step retries off: the retry policy would rerun the killed step at once, and the state the kill left is
    # what this test looks at before re-running as a user would.
    config.write_text(json.dumps({"ops": {"embeddings": {"config": {"insert_batch_size": 4, "texts_per_batch": 8}}},
                                  "resources": {"embedding_cache": {"config": {"l3_enabled": False}}},
                                  "execution": {"config": {"retries": {"disabled": {}}, "mode": "multiprocess"}}}))
    command = [str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m", "platform_defs",
               "--select", "embeddings", "--partition", "big", "-c", str(config)]
    env = dict(os.environ)
    proc = subprocess.Popen(command, cwd=PROJECT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)
    reader.start()
    killed = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if inserting():
            steps = _step_processes(psutil.Process(proc.pid))
            if steps:
                killed = steps[0].pid
                os.kill(killed, 9)
                break
        time.sleep(0.02)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    assert killed is not None, "the step never started inserting:\n" + "".join(stderr)[-3000:]
    assert proc.returncode != 0

    # The kill left Milvus between the old and the new state: the check must say so.
    from platform_defs.resources import build_resources

    resources = build_resources(resolve_env=True)
    held = resources["milvus"].existing_keys(source="big")
    new_rows = chunk_rows(resources, "big")
    replaced = sum(1 for vid, row in new_rows.items() if held.get(vid) == row[2])
    assert 0 < replaced < len(new_rows), (replaced, len(new_rows))
    assert set(held) - set(new_rows), "the stale vectors were not deleted yet: the kill came mid-insert"
    close_milvus_clients()

    # Re-run as a user would, from the command line: the step and the index job end exact.
    rerun = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    done = subprocess.run([str(Path(sys.executable).parent / "dagster"), "job", "execute", "-m", "platform_defs",
                           "-j", "index_job"], cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with DagsterInstance.get() as inst:
        from dagster import AssetCheckKey, AssetKey

        for asset, check in (("faiss_index", "matches_chunks"), ("milvus_collection", "matches_chunks")):
            record = inst.event_log_storage.get_latest_asset_check_execution_by_key(
                [AssetCheckKey(AssetKey(asset), check)])[AssetCheckKey(AssetKey(asset), check)]
            assert record.evaluation.passed, check
    assert_stores_exact(resources, {"big": {d["id"]: d for d in second}})


def test_encoder_error_stops_the_inserter_and_surfaces(tmp_path: Path, resources: dict[str, Any],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pool: ModelPool = resources["model_pool"]
    store, milvus = resources["store"], resources["milvus"]
    texts = [f"document {i} about protein folding and cell biology" for i in range(200)]
    import pyarrow as pa

    chunks = pa.table({"chunk_id": [f"d{i}#0" for i in range(200)], "doc_id": [f"d{i}" for i in range(200)],
                       "title": [""] * 200, "text": texts, "chunk_hash": [str(i) for i in range(200)]})
    calls = {"n": 0}
    real_forward = ModelPool.forward

    class DeviceLost(RuntimeError):
        pass

    def failing_forward(self: ModelPool, batches: Any, rows: int) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 4:
            raise DeviceLost("the accelerator went away during batch 4")
        return real_forward(self, batches, rows)

    monkeypatch.setattr(ModelPool, "forward", failing_forward)
    with pytest.raises(DeviceLost, match="during batch 4"):
        with store.parquet_writer(["embeddings"], "failing", embeddings_schema(pool.dimension())) as writer:
            embed_partition_vectors(chunks.to_batches(max_chunksize=10), "failing", 200, pool=pool, cache=None,
                                    stats=CacheStats(), writer=writer, milvus=milvus,
                                    settings=PipelineSettings(insert_batch_size=5, queue_maxsize=2))
    assert calls["n"] == 4  # nothing was encoded after the failure
    assert [t.name for t in threading.enumerate() if t.name.startswith("quiver-embed-")] == []
    assert milvus.count() <= 30  # at most the three batches encoded before the error were inserted
    assert not list((Path(store.root) / "embeddings" / "failing").glob("*.parquet"))  # no half-written file


def test_async_and_sync_modes_write_identical_stores(
    tmp_path: Path, quiver_home: Path, instance: Any, resources: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    docs = _corpus(24, chars=700)
    source = write_jsonl(tmp_path / "same.jsonl", docs)
    stores = {}
    for mode in ("sync", "async"):
        home = tmp_path / f"home-{mode}"
        home.mkdir()
        (home / "dagster.yaml").write_text((quiver_home / "dagster.yaml").read_text())
        monkeypatch.setenv("DAGSTER_HOME", str(home))
        close_milvus_clients()
        from platform_defs.resources import build_resources

        res = build_resources(resolve_env=True)
        with DagsterInstance.get() as inst:
            add_source(inst, res, "same", source)
            config = {"ops": {"embeddings": {"config": {"mode": mode, "texts_per_batch": 16,
                                                        "preprocess_workers": 2, "insert_batch_size": 7}}},
                      "resources": {"embedding_cache": {"config": {"l1_enabled": False, "l3_enabled": False}}}}
            meta = metadata(ingest(inst, res, "same", run_config=config), "embeddings")
            assert meta["details"]["pipeline"]["pipeline_mode"] == mode and meta["texts_encoded"] == meta["rows"]
            index(inst, res)
        table = res["store"].read_table(res["store"].read_latest(["embeddings"], "same"))
        stores[mode] = {
            "parquet_sha": res["store"].read_latest(["embeddings"], "same").sha256,
            "parquet": table.to_pylist(),
            "milvus": sorted((vid, r["vector_key"], tuple(r["vector"])) for vid, r in milvus_rows(res).items()),
            "faiss": res["faiss_store"].open_current().manifest["content_hash"],
        }
    assert stores["sync"]["parquet"] == stores["async"]["parquet"]  # vectors too, bit for bit
    assert stores["sync"]["parquet_sha"] == stores["async"]["parquet_sha"]
    assert stores["sync"]["milvus"] == stores["async"]["milvus"]
    assert stores["sync"]["faiss"] == stores["async"]["faiss"]
    assert len(stores["sync"]["milvus"]) == len(stores["sync"]["parquet"]) >= 24


def test_an_interrupted_write_is_never_a_cache_hit_for_the_collection(tmp_path: Path, instance: Any,
                                                                      resources: dict[str, Any]) -> None:
    """A writer killed after some upserts leaves the count as it was; the collection step must not trust it."""
    add_source(instance, resources, "marks", write_jsonl(tmp_path / "m.jsonl", _corpus(6)))
    ingest(instance, resources, "marks")
    assert metadata(index(instance, resources), "milvus_collection")["cache_hit"] is True
    milvus = resources["milvus"]
    assert set(milvus.exact_marks()) == {"marks"}
    victim = sorted(milvus.existing_keys())[0]
    row = milvus.loaded_client().query(milvus.collection, filter=f"id == {victim}", output_fields=["*"])[0]
    milvus.upsert_rows([{**row, "vector_key": "f" * 32}])  # what a killed embeddings step leaves: same count
    assert milvus.exact_marks() == {}  # every write clears the mark of the source it touches first
    result = index(instance, resources)
    meta = metadata(result, "milvus_collection")
    assert meta["cache_hit"] is False and meta["synced_sources"] == ["marks"] and meta["upserted"] == 1
    assert check_results(result)["milvus_collection:matches_chunks"].passed
    assert milvus.existing_keys()[victim] == chunk_rows(resources, "marks")[victim][2]
    assert metadata(index(instance, resources), "milvus_collection")["cache_hit"] is True


def test_forced_rebuilds_never_disturb_a_reader_of_the_live_index(tmp_path: Path, instance: Any,
                                                                  resources: dict[str, Any]) -> None:
    from dagster import materialize

    from platform_defs.definitions import ALL_ASSETS

    add_source(instance, resources, "live", write_jsonl(tmp_path / "live.jsonl", _corpus(30)))
    ingest(instance, resources, "live")
    index(instance, resources)
    store = resources["faiss_store"]
    first = store.current_version()
    expected = store.open_current().index.ntotal
    errors: list[BaseException] = []
    reads = 0
    stop = threading.Event()

    def reader() -> None:
        nonlocal reads
        query = resources["model_pool"].encode(["cancer"])
        while not stop.is_set():
            try:
                version = store.open_current()
                assert version.index.ntotal == expected and len(version.search(query, 3)[0]) == 3
                reads += 1
            except BaseException as exc:  # noqa: BLE001 - asserted below
                errors.append(exc)
                return

    def rebuild(config: dict[str, Any]) -> dict[str, Any]:
        result = materialize(ALL_ASSETS, instance=instance, resources=resources, selection=["faiss_index"],
                             run_config={"ops": {"faiss_index": {"config": config}}})
        return metadata(result, "faiss_index")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        forced = [rebuild({"force": True, "rebuild": True}) for _ in range(3)]
    finally:
        stop.set()
        thread.join()
    assert errors == [] and reads > 0
    versions = [m["version"] for m in forced]
    assert len({first, *versions}) == 4 and store.current_version() == versions[-1]
    assert (Path(store.version_dir(first).path) / "manifest.json").exists()  # replaced, kept for its readers
    # rebuild alone rebuilds: never a cache hit, always a new version
    alone = rebuild({"rebuild": True})
    assert alone["cache_hit"] is False and alone["mode"] == "rebuild" and alone["version"] not in versions
