"""Quiver against the real Milvus server (the `milvus` package's standalone binary, Milvus 2.3): TLS and
authentication for real, a database other than default, compaction, consistency, and an outage in the middle
of a run that degrades the pipeline instead of stopping it."""

import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from quiver.errors import QuiverError
from resources.milvus_clients import close_milvus_clients
from resources.milvus_store import MilvusStore
from tests.helpers import (
    MilvusServer,
    add_source,
    check_results,
    chunk_rows,
    index,
    ingest,
    metadata,
    scifact_docs,
    write_jsonl,
)

DIM = 8


def _row(i: int, source: str = "s", key: str = "k") -> dict[str, Any]:
    vector = [0.0] * DIM
    vector[i % DIM] = 1.0
    return {"id": i, "vector": vector, "chunk_id": f"d{i}#0", "doc_id": f"d{i}", "source": source, "title": "",
            "text": f"text {i}", "vector_key": key}


def _certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate it signed for localhost, and another CA that signed nothing here."""
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=quiver-test-ca")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj",
            "/CN=localhost")
    (directory / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
            "server.pem", "-days", "2", "-extfile", "ext.cnf")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other.key", "-out", "other.pem", "-days",
            "2", "-subj", "/CN=someone-else")
    return {name: directory / f"{name}.{ext}" for name, ext in
            (("ca", "pem"), ("server", "pem"), ("server_key", "key"), ("other", "pem"))}


def test_tls_and_authentication_for_real(tmp_path: Path) -> None:
    certs = _certificates(tmp_path / "certs")
    certs["server_key"] = tmp_path / "certs" / "server.key"
    server = MilvusServer(tmp_path / "secure", tls_mode=1, server_pem_path=str(certs["server"]),
                          server_key_path=str(certs["server_key"]), ca_pem_path=str(certs["ca"]),
                          authorization_enabled=True).start()
    try:
        secure = {"uri": server.uri, "secure": True, "server_name": "localhost", "ca_pem_path": str(certs["ca"]),
                  "retry_attempts": 3, "retry_deadline_s": 10}
        admin = MilvusStore(token="root:Milvus", collection="tls_auth", **secure)
        admin.client().create_user("quiver", "a-long-secret")
        admin.client().grant_role("quiver", "admin")
        store = MilvusStore(token="quiver:a-long-secret", collection="tls_auth", **secure)
        store.ensure_collection(DIM)
        store.upsert_rows([_row(1), _row(2)])
        assert store.count() == 2 and store.search(np.array([_row(2)["vector"]], np.float32), 1)[0][0].vector_id == 2

        for wrong, expected in (({"token": "quiver:not-the-password"}, "UNAUTHENTICATED: auth check failure"),
                                ({"token": "quiver:a-long-secret", "ca_pem_path": str(certs["other"])},
                                 "CERTIFICATE_VERIFY_FAILED")):
            close_milvus_clients()
            started = time.monotonic()
            with pytest.raises(QuiverError) as refused:
                MilvusStore(collection="tls_auth", **{**secure, **wrong}).count()
            message = str(refused.value)
            assert expected in message and "a-long-secret" not in message, message
            assert "a permanent error: not retried" in message and time.monotonic() - started < 5
    finally:
        close_milvus_clients()
        server.kill()


def test_another_database_compaction_and_consistency(shared_milvus_server: MilvusServer,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUIVER_MILVUS_DB", "quiver_other")  # as a deployment sets it
    from platform_defs.resources import build_resources

    built = build_resources(resolve_env=True)["milvus"]
    assert built.db_name == "quiver_other"
    store = built.model_copy(update={"uri": shared_milvus_server.uri, "collection": "dbtest"})
    store.ensure_collection(DIM)
    from pymilvus import MilvusClient

    plain = MilvusClient(uri=shared_milvus_server.uri)
    assert "quiver_other" in plain.list_databases()  # created when missing
    assert "dbtest" not in plain.list_collections()  # not in the default database
    for i in range(12):
        store.upsert_rows([_row(i)])
        # Strong consistency, as Quiver creates the collection: a search right after an upsert sees it.
        assert store.search(np.array([_row(i)["vector"]], np.float32), 50)[0][0].vector_id in {
            j for j in range(i + 1) if j % DIM == i % DIM}
        assert store.count() == i + 1
    store.delete_ids(list(range(0, 12, 2)), sources={"s"})
    assert store.count() == 6
    assert store.compact() == "Completed"
    assert sorted(store.existing_keys()) == list(range(1, 12, 2))
    close_milvus_clients()


def test_an_outage_mid_run_degrades_the_pipeline_and_the_next_run_reconciles(
        quiver_home: Path, tmp_path: Path, instance: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from pymilvus import MilvusClient

    from platform_defs.resources import build_resources

    server = MilvusServer(tmp_path / "flaky").start()
    monkeypatch.setenv("QUIVER_MILVUS_URI", server.uri)
    resources = build_resources(resolve_env=True)
    resources = {**resources, "milvus": MilvusStore(retry_attempts=2, retry_max_wait_s=0.2, retry_deadline_s=2)}
    try:
        docs = scifact_docs(36)
        add_source(instance, resources, "papers", write_jsonl(tmp_path / "papers.jsonl", docs[:8]))
        ingest(instance, resources, "papers")
        index(instance, resources)
        write_jsonl(tmp_path / "papers.jsonl", docs[4:])  # four go, 28 come
        held = MilvusClient(uri=server.uri).query("quiver_chunks", filter="id >= 0", output_fields=["id"])
        before = len(held)

        # Milvus goes away while the embeddings step is upserting, a few vectors at a time.
        ran: dict[str, Any] = {}
        step = threading.Thread(target=lambda: ran.update(result=ingest(instance, resources, "papers", run_config={
            "ops": {"embeddings": {"config": {"insert_batch_size": 2, "texts_per_batch": 4}}}})))
        step.start()
        watcher = MilvusClient(uri=server.uri)
        deadline = time.monotonic() + 120
        while watcher.query("quiver_chunks", filter="id >= 0", output_fields=["id"],
                            consistency_level="Eventually").__len__() <= before:
            assert step.is_alive() and time.monotonic() < deadline, "the step never began upserting"
            time.sleep(0.02)
        server.kill()
        step.join(timeout=300)
        embedded = metadata(ran["result"], "embeddings")
        deferred = embedded["milvus_deferred"]
        assert deferred.startswith("Milvus unavailable after ") and int(deferred.split()[3]) > 0, deferred
        assert embedded["rows"] == len(chunk_rows(resources, "papers"))  # the Parquet output is whole all the same
        outage = index(instance, resources, raise_on_error=False)
        assert metadata(outage, "faiss_index")["cache_hit"] is False  # FAISS is fresh
        assert {h.doc_id for h in resources["faiss_store"].open_current().search(
            resources["model_pool"].encode([docs[10]["title"]]), 1)[0]} == {docs[10]["id"]}
        failures = {e.step_key: e for e in outage.all_events if e.is_step_failure}
        assert "milvus_collection" in failures  # after its retries, visibly
        assert any(e.event_type_value == "STEP_UP_FOR_RETRY" and e.step_key == "milvus_collection"
                   for e in outage.all_events)

        server.start()  # back, same port, same data
        close_milvus_clients()
        healed = index(instance, resources)
        assert metadata(healed, "milvus_collection")["synced_sources"] == ["papers"]
        assert all(e.passed for e in check_results(healed).values())
        from tests.helpers import assert_stores_exact

        assert_stores_exact(resources, {"papers": {d["id"]: d for d in docs[4:]}})
    finally:
        close_milvus_clients()
        server.kill()
