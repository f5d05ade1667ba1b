"""Helpers that run real Dagster materializations and read what they recorded."""

import gzip
import json
from pathlib import Path
from typing import Any

import faiss
from dagster import AssetKey, DagsterInstance, ExecuteInProcessResult, materialize

from bench.milvus_server import MilvusServer, free_port  # noqa: F401 - the real server, shared with bench
from platform_defs.definitions import ALL_ASSETS, ALL_CHECKS
from platform_defs.jobs import INDEX_ASSETS, INGEST_ASSETS
from platform_defs.runs import add_partition
from quiver.beir import is_judged
from quiver.hashing import vector_id, vector_key
from tests.conftest import DATASETS

SCIFACT = DATASETS / "scifact"


def add_source(instance: DagsterInstance, resources: dict[str, Any], name: str, path: str | Path,
               kind: str | None = None) -> None:
    spec = resources["sources"].add(name, str(path), kind)
    add_partition(name, instance, judged=spec.kind == "beir" and is_judged(spec.path))


def ingest(instance: DagsterInstance, resources: dict[str, Any], partition: str,
           run_config: dict[str, Any] | None = None, raise_on_error: bool = True) -> ExecuteInProcessResult:
    return materialize(ALL_ASSETS, instance=instance, resources=resources, partition_key=partition,
                       selection=list(INGEST_ASSETS), run_config=run_config or {},
                       raise_on_error=raise_on_error)


def index(instance: DagsterInstance, resources: dict[str, Any], run_config: dict[str, Any] | None = None,
          raise_on_error: bool = True) -> ExecuteInProcessResult:
    """Both indexes and their reconciliation checks."""
    return materialize([*ALL_ASSETS, *ALL_CHECKS], instance=instance, resources=resources,
                       selection=list(INDEX_ASSETS), run_config=run_config or {}, raise_on_error=raise_on_error)


def check_results(result: ExecuteInProcessResult) -> dict[str, Any]:
    """{"asset:check": evaluation} of the asset checks a run executed, and {check name: evaluation} for the
    names only one asset's check has (both indexes have a check `matches_chunks`)."""
    evaluations = result.get_asset_check_evaluations()
    names = [e.check_name for e in evaluations]
    return {**{e.check_name: e for e in evaluations if names.count(e.check_name) == 1},
            **{f"{e.asset_key.to_user_string()}:{e.check_name}": e for e in evaluations}}


def metadata(result: ExecuteInProcessResult, asset: str) -> dict[str, Any]:
    """The metadata values of an asset's materialization in a run."""
    for event in result.get_asset_materialization_events():
        mat = event.materialization
        if mat.asset_key == AssetKey(asset):
            return {k: v.value for k, v in mat.metadata.items()}
    raise AssertionError(f"{asset} was not materialized")


def chunk_rows(resources: dict[str, Any], source: str) -> dict[int, tuple[str, str, str]]:
    """{vector id: (doc id, chunk id, vector key)} the chunks asset says the source has now."""
    store = resources["store"]
    fingerprint = resources["model_pool"].fingerprint()
    ref = store.read_latest(["chunks"], source)
    table = store.read_table(ref, columns=["chunk_id", "doc_id", "chunk_hash", "text"])
    return {vector_id(source, c): (d, c, vector_key(fingerprint, h))
            for c, d, h in zip(*(table.column(n).to_pylist() for n in ("chunk_id", "doc_id", "chunk_hash")),
                               strict=True)}


def milvus_rows(resources: dict[str, Any]) -> dict[int, dict[str, Any]]:
    milvus = resources["milvus"]
    rows = milvus.loaded_client().query(milvus.collection, filter="id >= 0",
                                        output_fields=["id", "source", "doc_id", "vector_key", "vector"])
    found = {int(r["id"]): r for r in rows}
    assert len(found) == len(rows) == milvus.count(), "Milvus holds an id twice"
    return found


def assert_stores_exact(resources: dict[str, Any], docs: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Both stores hold one vector per current chunk, with the current content, and nothing else."""
    expected: dict[int, tuple[str, str, str]] = {}
    for source in docs:
        expected.update(chunk_rows(resources, source))
    milvus = milvus_rows(resources)
    assert set(milvus) == set(expected)
    assert {vid: r["vector_key"] for vid, r in milvus.items()} == {vid: e[2] for vid, e in expected.items()}
    for source, source_docs in docs.items():  # what the test itself knows exists, independent of the pipeline
        assert {r["doc_id"] for r in milvus.values() if r["source"] == source} == set(source_docs)
    version = resources["faiss_store"].open_current()
    faiss_ids = [int(v) for v in faiss.vector_to_array(version.index.id_map)]
    assert sorted(faiss_ids) == sorted(expected)
    assert dict(zip(version.payload.column("vector_id").to_pylist(), version.payload.column("vector_key").to_pylist(),
                    strict=True)) == {vid: e[2] for vid, e in expected.items()}


def scifact_docs(n: int, start: int = 0) -> list[dict[str, Any]]:
    docs = []
    with gzip.open(SCIFACT / "corpus.jsonl.gz", "rt", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i < start:
                continue
            if len(docs) == n:
                break
            record = json.loads(line)
            docs.append({"id": record["_id"], "title": record["title"], "text": record["text"]})
    return docs


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def run_on_a_terminal(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> tuple[Any, str]:
    """Runs a command whose stderr is a pseudo-terminal (as when a person runs it) and stdout a pipe: the
    finished process (stdout captured) and everything it wrote to the terminal."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import termios
    import threading

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a terminal of 160 columns
    seen: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the other end closed: the process is gone
                return
            if not data:
                return
            seen.append(data)

    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    finally:
        reader.join(timeout=10)
        os.close(master)
    return subprocess.CompletedProcess(args, proc.returncode, stdout, ""), b"".join(seen).decode(errors="replace")


# Small chunks (many per document) and the two reconciliation checks, as the incremental tests use them.
SMALL_CHUNKS = {"ops": {"chunks": {"config": {"chunk_tokens": 64, "overlap_tokens": 8}}}}
CHECKS = ("faiss_index:matches_chunks", "milvus_collection:matches_chunks")
