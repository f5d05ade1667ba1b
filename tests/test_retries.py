"""Transient service errors are retried with backoff, permanent ones fail at once; a failed run re-executed
from its failure reuses finished steps, embeds nothing twice and inserts nothing twice."""

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from quiver.retry import RetrySettings, ServiceRequestError, ServiceUnavailableError, call_with_retries, is_transient
from resources.embedding_cache import CacheStats, EmbeddingCache, SegmentStore, text_sha
from resources.milvus_clients import close_milvus_clients
from resources.milvus_store import MilvusStore
from tests.conftest import PROJECT
from tests.helpers import MilvusServer, add_source, free_port, scifact_docs, write_jsonl

FAST = RetrySettings(attempts=4, initial_s=0.05, max_wait_s=0.2, deadline_s=10)


def _redis_server(port: int) -> subprocess.Popen:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is required in CI (Debian package redis-server)")
        pytest.skip("redis-server is not installed")
    return subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_errors_are_classified_on_real_failures() -> None:
    import socket

    import redis
    from pymilvus import MilvusClient

    closed = free_port()
    with pytest.raises(ConnectionRefusedError) as refused:
        socket.create_connection(("127.0.0.1", closed), timeout=2)
    assert is_transient(refused.value)
    with pytest.raises(redis.ConnectionError) as no_redis:
        redis.Redis(port=closed, socket_connect_timeout=2).ping()
    assert is_transient(no_redis.value)
    with pytest.raises(redis.AuthenticationError) as bad_password:
        redis.Redis(port=6379, username="nobody", password="not-the-password").ping()
    assert not is_transient(bad_password.value)
    with pytest.raises(Exception) as no_milvus:  # noqa: B017 - pymilvus raises its own MilvusException
        MilvusClient(uri=f"http://127.0.0.1:{closed}", timeout=2)
    assert is_transient(no_milvus.value)
    client = MilvusClient(str(Path(os.environ.get("TMPDIR", "/tmp")) / f"classify-{closed}.db"))
    with pytest.raises(Exception) as missing:  # noqa: B017
        client.describe_collection("no_such_collection")
    assert not is_transient(missing.value)
    assert not is_transient(ValueError("schema mismatch"))
    import s3fs

    no_store = s3fs.S3FileSystem(key="k", secret="s", endpoint_url=f"http://127.0.0.1:{closed}",
                                 config_kwargs={"retries": {"max_attempts": 1}})
    with pytest.raises(Exception) as unreachable:  # noqa: B017 - botocore's EndpointConnectionError
        no_store.ls("bucket")
    assert is_transient(unreachable.value)
    assert is_transient(OSError(errno.EBUSY, "Please reduce your request rate"))  # s3fs's SlowDown and 503
    assert not is_transient(FileNotFoundError(errno.ENOENT, "no such key"))
    assert not is_transient(PermissionError(errno.EACCES, "access denied"))


def test_object_store_errors_are_classified_on_a_real_s3_server(s3_server: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(key="quiver", secret="quiver-secret", endpoint_url=s3_server)
    with pytest.raises(FileNotFoundError) as missing:
        fs.ls("no-such-bucket")
    assert not is_transient(missing.value)


def test_call_with_retries_backs_off_then_succeeds_or_gives_up() -> None:
    calls: list[float] = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionRefusedError("connection refused")
        return "done"

    assert call_with_retries("flaky service", flaky, FAST) == "done"
    assert len(calls) == 3 and calls[2] > calls[1] > calls[0]

    always: list[int] = []

    def down() -> None:
        always.append(1)
        raise TimeoutError("timed out")

    with pytest.raises(ServiceUnavailableError, match=r"^down service: still failing after 4 attempts \(TimeoutError"):
        call_with_retries("down service", down, FAST)
    assert len(always) == 4

    once: list[int] = []

    def refused_request() -> None:
        once.append(1)
        raise ValueError("vector dimension 8 does not match 384")

    with pytest.raises(ServiceRequestError, match=r"^bad request: ValueError: vector dimension 8 does not match 384 "
                                                  r"\(a permanent error: not retried\)$"):
        call_with_retries("bad request", refused_request, FAST)
    assert once == [1]


def test_redis_that_comes_up_late_is_retried(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    cache = EmbeddingCache(l1_enabled=False, l2_enabled=True, l3_enabled=False, redis_url=f"redis://127.0.0.1:{port}/0",
                           redis_prefix="quiver-retry-test:", retry_attempts=10, retry_deadline_s=30)
    server: list[subprocess.Popen] = []
    starter = threading.Timer(1.5, lambda: server.append(_redis_server(port)))
    starter.start()
    try:
        with caplog.at_level(logging.WARNING):
            found = cache.lookup("fp", 4, [text_sha("hello")], CacheStats())
        assert found == {}
        assert any("Redis get (redis://127.0.0.1" in r.message and "transient error on attempt 1" in r.message
                   for r in caplog.records)
    finally:
        starter.join()
        for proc in server:
            proc.kill()


def test_permanent_redis_error_fails_at_once_without_the_password(tmp_path: Path) -> None:
    cache = EmbeddingCache(l1_enabled=False, l2_enabled=True, l3_enabled=False,
                           redis_url="redis://user:s3cret@127.0.0.1:6379/0")
    started = time.monotonic()
    with pytest.raises(ServiceRequestError) as error:
        cache.lookup("fp", 4, [text_sha("hello")], CacheStats())
    assert time.monotonic() - started < 3  # no backoff
    assert str(error.value).startswith("Redis get (redis://user:***@127.0.0.1:6379/0): AuthenticationError")
    assert str(error.value).endswith("(a permanent error: not retried)") and "s3cret" not in str(error.value)


def test_milvus_server_that_comes_up_late_is_retried(tmp_path: Path) -> None:
    server = MilvusServer(tmp_path / "late")
    store = MilvusStore(uri=server.uri, collection="late", retry_attempts=12, retry_max_wait_s=2, retry_deadline_s=60)
    starter = threading.Timer(2.0, server.start, kwargs={"wait": False})
    starter.start()
    try:
        store.ensure_collection(8)
        store.upsert_rows([{"id": 1, "vector": [1.0] + [0.0] * 7, "chunk_id": "a#0", "doc_id": "a", "source": "s",
                            "title": "", "text": "x", "vector_key": "k"}])
        assert store.count() == 1
        # A permanent error is not retried: the collection holds 8-d vectors, not 16.
        started = time.monotonic()
        with pytest.raises(Exception, match="holds 8-d vectors but the model gives 16-d"):
            store.ensure_collection(16)
        assert time.monotonic() - started < 3
    finally:
        starter.join()
        close_milvus_clients()
        server.kill()


def _step_failure_text(instance: Any, run_id: str) -> str:
    from dagster import DagsterEventType

    texts = []
    for record in instance.all_logs(run_id, of_type=DagsterEventType.STEP_FAILURE):
        error = record.dagster_event.step_failure_data.error
        while error is not None:
            texts.append(error.message)
            error = error.cause
    return "\n".join(texts)


def _l3_entries(home: Path, fingerprint: str) -> int:
    directory = home / "artifacts" / "_embedding_cache" / fingerprint
    from resources.embedding_cache import entry_size

    return SegmentStore(__import__("upath").UPath(str(directory)), 384, entry_size(384)).distinct_keys()


def test_reexecution_from_failure_reuses_steps_and_does_nothing_twice(
    quiver_home: Path, tmp_path: Path, instance: Any, resources: dict[str, Any],
) -> None:
    import psutil

    docs = [{**d, "text": d["text"][:600]} for d in scifact_docs(80)]
    add_source(instance, resources, "re", write_jsonl(tmp_path / "re.jsonl", docs))
    config = tmp_path / "ingest.yaml"
    # Step retries off: the embeddings step is killed mid-run, and the run must fail for a re-execution to follow.
    config.write_text(json.dumps({
        "ops": {"embeddings": {"config": {"insert_batch_size": 4, "texts_per_batch": 8}},
                "chunks": {"config": {"chunk_tokens": 64, "overlap_tokens": 8}}},
        "execution": {"config": {"retries": {"disabled": {}}, "mode": "multiprocess"}}}))
    fingerprint = resources["model_pool"].fingerprint()
    segments = quiver_home / "artifacts" / "_embedding_cache" / fingerprint
    proc = subprocess.Popen([str(Path(sys.executable).parent / "dagster"), "job", "execute", "-m", "platform_defs",
                             "-j", "ingest_job", "--tags", json.dumps({"dagster/partition": "re"}), "-c", str(config)],
                            cwd=PROJECT, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 240
    killed = False
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(segments.glob("*.qvseg"))) >= 2:  # some texts are encoded (and cached), not all
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if "multiprocessing.forkserver" in " ".join(child.parent().cmdline()):
                        child.kill()  # the step process dies in the middle of its work
                        killed = True
                except psutil.Error:
                    continue
            if killed:
                break
        time.sleep(0.05)
    proc.communicate(timeout=240)
    assert killed and proc.returncode != 0, "the run should have failed once its step was killed"
    failed = instance.get_runs(limit=1)[0]
    assert failed.is_failure
    encoded_before = _l3_entries(quiver_home, fingerprint)
    chunks = resources["store"].read_latest(["chunks"], "re").rows
    assert 0 < encoded_before < chunks, (encoded_before, chunks)

    rerun = subprocess.run([str(Path(sys.executable).parent / "quiver"), "reexecute", failed.run_id], cwd=PROJECT,
                           env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.strip().endswith("succeeded; steps run: embeddings")  # documents and chunks reused
    child = instance.get_runs(limit=1)[0]
    assert child.parent_run_id == failed.run_id and child.tags["dagster/partition"] == "re"
    from dagster import AssetKey

    event = instance.get_latest_materialization_event(AssetKey("embeddings"))
    assert event.run_id == child.run_id
    meta = {k: v.value for k, v in event.asset_materialization.metadata.items()}
    assert meta["texts_encoded"] == chunks - encoded_before  # nothing embedded twice
    assert meta["details"]["embedding_cache"]["l3"]["hits"] == encoded_before
    done = subprocess.run([str(Path(sys.executable).parent / "dagster"), "job", "execute", "-m", "platform_defs", "-j",
                           "index_job"], cwd=PROJECT, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]  # its reconciliation checks passed: exactly one vector each
    milvus = resources["milvus"]
    assert milvus.count() == chunks == len(milvus.existing_keys())  # nothing inserted twice
    close_milvus_clients()


def test_settings_from_the_environment_survive_partial_run_config(monkeypatch: pytest.MonkeyPatch,
                                                                   milvus_server: MilvusServer) -> None:
    """Run config for some fields of a resource must not leave its environment settings unresolved."""
    from dagster import asset, materialize

    from platform_defs.resources import build_resources
    from resources.env import env_value

    monkeypatch.setenv("QUIVER_MILVUS_URI", milvus_server.uri)
    monkeypatch.setenv("QUIVER_MILVUS_TOKEN", "root:Milvus")
    monkeypatch.setenv("QUIVER_MILVUS_COLLECTION", "from_env")
    seen: dict[str, Any] = {}

    @asset
    def probe(milvus: MilvusStore) -> None:
        seen.update(uri=milvus.uri, token=env_value(milvus.token), collection=milvus.collection,
                    attempts=milvus.retry_attempts)
        milvus.ensure_collection(4)
        seen["exists"] = milvus.exists()

    resources = build_resources()  # as Definitions has them: the token stays an EnvVar
    materialize([probe], resources={"milvus": resources["milvus"]},
                run_config={"resources": {"milvus": {"config": {"retry_attempts": 2}}}})
    assert seen == {"uri": milvus_server.uri, "token": "root:Milvus", "collection": "from_env", "attempts": 2,
                    "exists": True}
    close_milvus_clients()


def _step_starts(result: Any, step: str) -> int:
    return sum(1 for e in result.all_events if e.event_type_value in ("STEP_START", "STEP_RESTARTED")
               and e.step_key == step)


def test_a_step_whose_service_is_down_is_retried_by_its_retry_policy_and_bad_input_is_not(
        quiver_home: Path, tmp_path: Path, instance: Any, resources: dict[str, Any]) -> None:
    from tests.helpers import ingest

    add_source(instance, resources, "late", write_jsonl(tmp_path / "late.jsonl", scifact_docs(3)))
    port = free_port()
    # One attempt per call: the first attempt of the step fails at once; the step's retry policy runs it again.
    cache = EmbeddingCache(l2_enabled=True, redis_url=f"redis://127.0.0.1:{port}/0", redis_prefix="quiver-step:",
                           retry_attempts=1)
    server: list[subprocess.Popen] = []
    done = threading.Event()

    def start_redis_once_the_step_failed() -> None:
        from dagster import DagsterEventType, EventRecordsFilter

        wanted = EventRecordsFilter(event_type=DagsterEventType.STEP_UP_FOR_RETRY)
        while not done.is_set() and not instance.get_event_records(wanted, limit=1):
            time.sleep(0.05)
        if not done.is_set():
            server.append(_redis_server(port))

    starter = threading.Thread(target=start_redis_once_the_step_failed)
    starter.start()
    try:
        result = ingest(instance, {**resources, "embedding_cache": cache}, "late")
    finally:
        done.set()
        starter.join()
        for proc in server:
            proc.kill()
    assert result.success
    assert _step_starts(result, "embeddings") >= 2  # failed on the service, then retried after a backoff
    assert any(e.event_type_value == "STEP_UP_FOR_RETRY" and e.step_key == "embeddings" for e in result.all_events)

    (tmp_path / "late.jsonl").write_text('{"id": "x", "text": \n', encoding="utf-8")
    bad = ingest(instance, resources, "late", raise_on_error=False)
    assert not bad.success and _step_starts(bad, "documents") == 1  # bad input: never retried
    failure = next(e for e in bad.all_events if e.is_step_failure)
    assert "late.jsonl:1: malformed JSON" in failure.step_failure_data.user_failure_data.description


def test_processes_take_turns_on_a_milvus_lite_database(quiver_home: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A second process waits for its turn, saying who holds it, for as long as the first works."""
    uri = str(tmp_path / "turns.db")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[2]);"
        "from resources.milvus_store import MilvusStore; from resources.milvus_clients import close_milvus_clients;"
        "m = MilvusStore(uri=sys.argv[1], collection='turns'); m.ensure_collection(4); print('holding', flush=True);"
        "time.sleep(4); close_milvus_clients()"), uri, str(PROJECT)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    store = MilvusStore(uri=uri, collection="turns")
    assert store.busy_reason() is not None and "held by another process (pid" in store.busy_reason()
    started = time.monotonic()
    with caplog.at_level(logging.INFO):
        assert store.exists()  # waits for the holder to finish, then opens the database
    waited = time.monotonic() - started
    holder.wait(timeout=30)
    assert 1 < waited < 30
    assert any("waiting for the Milvus Lite database" in r.message and f"pid {holder.pid}" in r.message
               for r in caplog.records)
    close_milvus_clients()


def test_a_wrong_dimension_fails_at_once_despite_the_retry_policy(quiver_home: Path, tmp_path: Path,
                                                                  instance: Any, resources: dict[str, Any]) -> None:
    from tests.helpers import ingest

    resources["milvus"].ensure_collection(8)  # a collection of another model's vectors
    close_milvus_clients()
    add_source(instance, resources, "dims", write_jsonl(tmp_path / "dims.jsonl", scifact_docs(2)))
    result = ingest(instance, resources, "dims", raise_on_error=False)
    assert not result.success and _step_starts(result, "embeddings") == 1
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "holds 8-d vectors but the model gives 384-d" in failure.step_failure_data.user_failure_data.description
