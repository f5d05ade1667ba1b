"""The same backfill through the multiprocess executor and through two Celery workers, on the production
instance (Postgres, run queue, dagster-daemon), a Milvus server and a shared storage root.

A backfill of N sources is N runs of ingest_job. Multiprocess: every run forks its steps from its own
forkserver, which loads the model. Celery: the runs send their steps to the queue of their memory class;
one worker serves io and light, one serves model and keeps the model loaded across steps and runs.
Printed: wall time, model loads, and peak memory (RSS of the process tree) per worker.

Needs PostgreSQL (127.0.0.1:5432), RabbitMQ (127.0.0.1:5672) and Redis (127.0.0.1:6379).

    python bench/distributed.py [--sources 6] [--docs 40]
"""

import argparse
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PROJECT, print_table, wait_for_runs, write_results  # noqa: E402
from bench.concurrency import RssSampler  # noqa: E402

BIN = Path(sys.executable).parent
SCIFACT = Path(os.environ.get("QUIVER_DATASETS") or PROJECT.parent / "shared" / "datasets") / "scifact"


def fresh_database() -> tuple[str, Any]:
    import psycopg2

    name = f"quiver_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {name}")

    def drop() -> None:
        cursor = admin.cursor()
        cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        cursor.execute(f"DROP DATABASE IF EXISTS {name}")

    return f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}", drop


def write_sources(directory: Path, count: int, docs: int) -> list[Path]:
    records = []
    with gzip.open(SCIFACT / "corpus.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            records.append({"id": record["_id"], "title": record["title"], "text": record["text"]})
            if len(records) == count * docs:
                break
    files = []
    for i in range(count):
        path = directory / f"s{i}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records[i * docs:(i + 1) * docs]))
        files.append(path)
    return files


def start_worker(name: str, queues: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    """A worker as the README starts one: `quiver worker QUEUES`, its processes from this machine's memory limits
    for the queues' classes, the model worker preloading the model before it forks."""
    return subprocess.Popen([str(BIN / "quiver"), "worker", queues, "-n", name], cwd=PROJECT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def backfill(mode: str, files: list[Path], work: Path) -> dict[str, Any]:
    from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

    from bench.milvus_server import MilvusServer

    url, drop = fresh_database()
    home = work / f"home-{mode}"
    home.mkdir()
    shutil.copy(PROJECT / "deploy" / "production" / "dagster.yaml", home / "dagster.yaml")
    milvus = MilvusServer(work / f"milvus-{mode}").start()
    env = {**os.environ, "DAGSTER_HOME": str(home), "QUIVER_POSTGRES_URL": url, "QUIVER_MAX_CONCURRENT_RUNS": "4",
           "QUIVER_STORAGE_ROOT": str(work / f"artifacts-{mode}"), "QUIVER_MILVUS_URI": milvus.uri,
           "PYTHONPATH": str(PROJECT), "HF_HUB_OFFLINE": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    if mode == "celery":
        env.update(QUIVER_EXECUTOR="celery", QUIVER_CELERY_BROKER="pyamqp://guest:guest@127.0.0.1:5672//",
                   QUIVER_CELERY_BACKEND="redis://127.0.0.1:6379/4")
        subprocess.run([str(BIN / "celery"), "-b", env["QUIVER_CELERY_BROKER"], "purge", "-f", "-Q",
                        "io,light,model"], env=env, capture_output=True, timeout=60)
    names = [f.stem for f in files]
    for name, path in zip(names, files, strict=True):
        subprocess.run([str(BIN / "quiver"), "source", "add", name, str(path)], cwd=PROJECT, env=env, check=True,
                       capture_output=True)
    workers: dict[str, subprocess.Popen] = {}
    if mode == "celery":
        workers = {"io+light worker": start_worker("iolight", "io,light", env, work / "iolight.log"),
                   "model worker": start_worker("model", "model", env, work / "model.log")}
        time.sleep(8)
    daemon = subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-m", "platform_defs"], cwd=PROJECT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    samplers = {label: RssSampler(psutil.Process(w.pid)) for label, w in workers.items()}
    samplers["daemon and runs"] = RssSampler(psutil.Process(daemon.pid))
    for sampler in samplers.values():
        sampler.__enter__()
    os.environ["DAGSTER_HOME"], os.environ["QUIVER_POSTGRES_URL"] = str(home), url
    try:
        started = time.perf_counter()
        subprocess.run([str(BIN / "dagster"), "job", "backfill", "-m", "platform_defs", "-j", "ingest_job",
                        "--partitions", ",".join(names), "--noprompt"], cwd=PROJECT, env=env, check=True,
                       capture_output=True)
        with DagsterInstance.get() as instance:
            runs = wait_for_runs(instance, len(names), started)
            wall = time.perf_counter() - started
            loaders = set()  # the processes that loaded the model: each loads it once
            for name in names:
                record = instance.fetch_materializations(AssetRecordsFilter(
                    asset_key=AssetKey("embeddings"), asset_partitions=[name]), limit=1).records[0]
                meta = {k: v.value for k, v in record.event_log_entry.asset_materialization.metadata.items()}
                loaders.add(meta["details"]["model"]["model_loaded_by_pid"])
            failed = sum(not r.is_success for r in runs)
    finally:
        for sampler in samplers.values():
            sampler.__exit__()
        for process in [daemon, *workers.values()]:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        milvus.kill()
        drop()
    # Multiprocess: every run's forkserver loads the model. Celery: the model worker, once for all steps.
    started_as = {label: (work / f"{'model' if 'model' in label else 'iolight'}.log").read_text().splitlines()[0]
                  for label in workers}  # "worker model: N processes for model (...)"
    return {"mode": mode, "wall_s": wall, "runs": len(names), "failed_runs": failed, "workers": started_as,
            "model_loads": len(loaders), "peak_rss": {label: s.peak for label, s in samplers.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", type=int, default=6)
    parser.add_argument("--docs", type=int, default=40, help="SciFact documents per source")
    args = parser.parse_args()
    from quiver.memory import format_size

    work = Path(tempfile.mkdtemp(prefix="quiver-bench-distributed-"))
    files = write_sources(work, args.sources, args.docs)
    results = [backfill(mode, files, work) for mode in ("multiprocess", "celery")]
    rows = []
    for r in results:
        for label, peak in r["peak_rss"].items():
            rows.append([r["mode"], f"{r['wall_s']:.1f}", r["model_loads"], r["failed_runs"], label,
                         format_size(peak)])
    table = print_table(
        f"Backfill of {args.sources} sources x {args.docs} SciFact documents (ingest_job), production instance",
        ["executor", "wall s", "model loads", "failed runs", "process tree", "peak RSS"], rows)
    table += "".join(f"\n{line}" for r in results for line in r.get("workers", {}).values())
    write_results("distributed", {"args": vars(args), "results": results, "table": table})
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
