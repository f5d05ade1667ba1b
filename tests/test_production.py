"""Production mode on real services: the Postgres instance, the run queue's limits, Celery workers routed by
memory class, FileRefs on an object store, a Milvus server."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg2

from tests.conftest import PROJECT
from tests.helpers import MilvusServer, scifact_docs, write_jsonl

BIN = Path(sys.executable).parent
REDIS_BACKEND = "redis://127.0.0.1:6379/3"


def _run(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def libpq(url: str) -> str:
    """The SQLAlchemy URL as libpq takes it (no driver name)."""
    return url.replace("postgresql+psycopg2://", "postgresql://")


def _events_in_postgres(url: str, run_id: str) -> dict[str, int]:
    with psycopg2.connect(libpq(url)) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT dagster_event_type, count(*) FROM event_logs WHERE run_id = %s AND "
                       "dagster_event_type IS NOT NULL GROUP BY dagster_event_type", (run_id,))
        return dict(cursor.fetchall())


def test_materializations_are_stored_in_postgres(production_home: Path, postgres_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    source = write_jsonl(tmp_path / "papers.jsonl", scifact_docs(6))
    _run([str(BIN / "quiver"), "source", "add", "papers", str(source)], env)
    _run([str(BIN / "quiver"), "run", "--source", "papers"], env)
    from dagster import AssetKey, DagsterInstance

    with DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        runs = instance.get_runs()
        # one run: the source's stages and both indexes (refresh_job)
        assert [r.job_name for r in runs] == ["refresh_job"] and runs[0].is_success
        event = instance.get_latest_materialization_event(AssetKey("embeddings"))
        assert event.asset_materialization.partition == "papers"
        refresh_run = runs[0]
    # The events are rows of the Postgres database itself.
    events = _events_in_postgres(postgres_url, refresh_run.run_id)
    # documents, chunks, embeddings, faiss_index, milvus_collection; and the two checks' steps
    assert events["ASSET_MATERIALIZATION"] == 5 and events["ASSET_CHECK_EVALUATION"] == 2
    assert events["STEP_SUCCESS"] == 7 and events["PIPELINE_SUCCESS"] == 1  # stored under its legacy name
    with psycopg2.connect(libpq(postgres_url)) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM runs")
        assert cursor.fetchone()[0] == 1


def _start_daemon(env: dict[str, str], module: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-m", module], cwd=PROJECT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def test_the_run_queue_holds_runs_to_the_memory_limit(production_home: Path) -> None:
    """Three runs of heavy steps, a model-class limit of 1: the queue starts them one after the other."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "QUIVER_BALLAST_MB": "100", "QUIVER_BALLAST_CPU_S": "1",
           "QUIVER_MEMORY_NEED_MODEL": "1GiB", "QUIVER_MEMORY_BUDGET": "2GiB"}  # 60% of 2 GiB: one model step
    _run([str(BIN / "quiver"), "limits", "--apply"], env)
    from dagster import DagsterInstance, DagsterRunStatus

    with DagsterInstance.get() as instance:
        assert {p.name: p.limit for p in instance.event_log_storage.get_pool_limits()}["quiver-model"] == 1
        _run([str(BIN / "dagster"), "job", "backfill", "-m", "bench.memory_job", "-j", "ballast_job",
              "--partitions", "p00,p01,p02", "--noprompt"], env)
        assert {r.status for r in instance.get_runs()} == {DagsterRunStatus.QUEUED}
        daemon = _start_daemon(env, "bench.memory_job")
        most_started = 0
        try:
            deadline = time.monotonic() + 300
            while True:
                runs = instance.get_runs()
                most_started = max(most_started, sum(r.status == DagsterRunStatus.STARTED for r in runs))
                if all(r.is_finished for r in runs):
                    break
                assert time.monotonic() < deadline, [r.status for r in runs]
                time.sleep(0.2)
        finally:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()
        assert all(r.is_success for r in runs)
        assert most_started == 1
        records = sorted(instance.get_run_records(), key=lambda r: r.start_time)
        for earlier, later in zip(records, records[1:], strict=False):
            assert later.start_time >= earlier.end_time  # one at a time, by the pool


def _start_worker(name: str, queues: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    """`quiver worker`: as many processes as this machine's memory allows for the queues' classes."""
    return subprocess.Popen([str(BIN / "quiver"), "worker", queues, "-n", name], cwd=PROJECT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_workers(env: dict[str, str], names: list[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = subprocess.run([str(BIN / "celery"), "-b", env["QUIVER_CELERY_BROKER"], "inspect", "ping",
                               "--timeout", "2"], cwd=PROJECT, env=env, capture_output=True, text=True)
        if all(f"{name}@" in proc.stdout for name in names):
            return
        time.sleep(1)
    raise AssertionError(f"Celery workers {names} did not answer within {timeout}s")


def _celery_hosts(instance: Any, run_id: str) -> dict[str, str]:
    """step key -> the Celery worker that executed it, from the run's engine events."""
    from dagster import DagsterEventType

    hosts = {}
    for record in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        event = record.dagster_event
        if event.step_key and "Celery worker" in event.engine_event_data.metadata:
            hosts[event.step_key] = event.engine_event_data.metadata["Celery worker"].value
    return hosts


def test_two_celery_workers_share_a_run_by_memory_class(
    production_home: Path, tmp_path: Path, rabbitmq_url: str, s3_server: str, milvus_server: MilvusServer,
) -> None:
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "HF_HUB_OFFLINE": "1", "QUIVER_EXECUTOR": "celery",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "QUIVER_CELERY_BROKER": rabbitmq_url, "QUIVER_CELERY_BACKEND": REDIS_BACKEND,
           "QUIVER_STORAGE_ROOT": "s3://quiver/root", "QUIVER_MILVUS_URI": milvus_server.uri}
    os.environ["QUIVER_STORAGE_ROOT"] = env["QUIVER_STORAGE_ROOT"]  # this process registers the sources there too
    subprocess.run([str(BIN / "celery"), "-b", rabbitmq_url, "purge", "-f", "-Q", "io,light,model"], env=env,
                   capture_output=True, timeout=60)
    # The model class needs 2 GiB of a 4 GiB budget here: one model step at a time; io and light (256 MiB each)
    # two at a time (light: 15% of 4 GiB / 256 MiB = 2).
    env.update(QUIVER_MEMORY_NEED_MODEL="2GiB", QUIVER_MEMORY_BUDGET="4GiB", QUIVER_CPU_COUNT="2",
               QUIVER_MEMORY_NEED_IO="256MiB", QUIVER_MEMORY_NEED_LIGHT="256MiB")
    workers = [_start_worker("iolight", "io,light", env, tmp_path / "iolight.log"),
               _start_worker("model", "model", env, tmp_path / "model.log")]
    try:
        _wait_for_workers(env, ["iolight", "model"])
        assert (tmp_path / "model.log").read_text().startswith("worker model: 1 processes for model")
        assert (tmp_path / "iolight.log").read_text().startswith("worker iolight: 2 processes for io, light")
        for name, docs in (("papers", scifact_docs(8)), ("notes", scifact_docs(6, start=8))):
            _run([str(BIN / "quiver"), "source", "add", name, str(write_jsonl(tmp_path / f"{name}.jsonl", docs))], env)
            _run([str(BIN / "dagster"), "job", "execute", "-m", "platform_defs", "-j", "ingest_job", "--tags",
                  json.dumps({"dagster/partition": name})], env)
        _run([str(BIN / "dagster"), "job", "execute", "-m", "platform_defs", "-j", "index_job"], env)
        search = _run([str(BIN / "quiver"), "search", scifact_docs(1)[0]["title"], "-k", "3", "--json"], env)
    finally:
        for worker in workers:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        os.environ.pop("QUIVER_STORAGE_ROOT", None)
    from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

    with DagsterInstance.get() as instance:
        runs = {r.tags.get("dagster/partition", r.job_name): r for r in instance.get_runs()}
        assert all(r.is_success for r in runs.values())
        for partition in ("papers", "notes"):
            # the run carries each class's need, which every step checks on its worker before it starts
            assert runs[partition].tags["quiver/need/model"] == str(2 * 2**30)
            assert int(runs[partition].tags["quiver/need/io"]) == 256 * 2**20
            hosts = _celery_hosts(instance, runs[partition].run_id)
            assert {step: host.split("@")[0] for step, host in hosts.items()} == {
                "documents": "iolight", "chunks": "iolight", "embeddings": "model"}
        index_hosts = {h.split("@")[0] for h in _celery_hosts(instance, runs["index_job"].run_id).values()}
        assert index_hosts == {"iolight"}
        embedded = {}
        for partition in ("papers", "notes"):
            record = instance.fetch_materializations(AssetRecordsFilter(
                asset_key=AssetKey("embeddings"), asset_partitions=[partition]), limit=1).records[0]
            embedded[partition] = {k: v.value for k, v in record.event_log_entry.asset_materialization.metadata.items()}
            assert embedded[partition]["path"].startswith(f"s3://quiver/root/embeddings/{partition}/")
    # One long-lived worker process embedded both sources, with the model `quiver worker model` preloaded before
    # the worker forked its process (-i platform_defs.preload): no step loaded it.
    first, second = embedded["papers"], embedded["notes"]
    first_model, second_model = first["details"]["model"], second["details"]["model"]
    assert first_model["step_pid"] == second_model["step_pid"]
    assert (first["model_loads_this_step"], second["model_loads_this_step"]) == (0, 0)
    assert first_model["model_inherited"] is True
    assert second_model["model_loads_by_pid"] == {str(first_model["model_loaded_by_pid"]): 1}
    # Every artifact is on the object store, written by one worker and read by the other.
    import s3fs

    s3 = s3fs.S3FileSystem()
    listing = {p.split("/", 3)[2] for p in s3.find("quiver/root")}
    assert {"documents", "chunks", "embeddings", "faiss_index", "_embedding_cache", "_sources"} <= listing
    assert s3.find("quiver/root/faiss_index/versions", withdirs=False)
    hits = json.loads(search.stdout)
    assert hits[0]["doc_id"] == scifact_docs(1)[0]["id"] and hits[0]["source"] == "papers"
