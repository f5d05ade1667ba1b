"""The Dagster UI serves the project: every asset appears in the asset graph (via its GraphQL API)."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.conftest import PROJECT

QUERY = "{ assetNodes { assetKey { path } groupName opName } }"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_webserver_shows_every_asset(quiver_home: Path) -> None:
    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1",
         "-p", str(port)],
        cwd=PROJECT, env={**os.environ, "DAGSTER_HOME": str(quiver_home)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        nodes = None
        while time.monotonic() < deadline and nodes is None:
            assert server.poll() is None, server.stderr.read()[-3000:] if server.stderr else "webserver exited"
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": QUERY}).encode(),
                    headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=10) as response:
                    payload = json.load(response)
                nodes = payload["data"]["assetNodes"]
                if not nodes:  # the code location is still loading
                    nodes = None
                    time.sleep(1)
            except (OSError, KeyError, TypeError):
                time.sleep(1)
        assert nodes is not None, "the webserver did not serve the asset graph within 120 s"
        found = {("/".join(n["assetKey"]["path"]), n["groupName"]) for n in nodes}
        assert found == {("documents", "ingest"), ("chunks", "ingest"), ("embeddings", "ingest"),
                         ("faiss_index", "index"), ("milvus_collection", "index"), ("retrieval_eval", "evaluation")}
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


STALE_QUERY = """{
  partitioned: assetNodes(assetKeys: [{path: ["documents"]}, {path: ["chunks"]}, {path: ["embeddings"]}]) {
    assetKey { path } staleStatus(partition: "papers") }
  indexes: assetNodes(assetKeys: [{path: ["faiss_index"]}, {path: ["milvus_collection"]}]) {
    assetKey { path } staleStatus }
}"""


def _serve_and_query(root: Path, home: Path, query: str) -> dict:
    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1",
         "-p", str(port)], cwd=root, env={**os.environ, "DAGSTER_HOME": str(home)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                    headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=10) as response:
                    data = json.load(response)["data"]
                if data and all(data.values()):
                    return data
            except (OSError, KeyError, TypeError):
                pass
            time.sleep(1)
        raise AssertionError("the webserver did not answer within 120 s")
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_ui_marks_exactly_the_edited_stage_and_downstream_stale(
    quiver_home: Path, tmp_path: Path, instance, resources  # noqa: ANN001
) -> None:
    import shutil

    from tests.helpers import add_source, index, ingest, scifact_docs, write_jsonl

    add_source(instance, resources, "papers", write_jsonl(tmp_path / "p.jsonl", scifact_docs(5)))
    ingest(instance, resources, "papers")
    index(instance, resources)

    copy = tmp_path / "project"
    copy.mkdir()
    for package in ("quiver", "assets", "resources", "platform_defs"):
        shutil.copytree(PROJECT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT / "workspace.yaml", copy / "workspace.yaml")

    def statuses() -> dict[str, str]:
        data = _serve_and_query(copy, quiver_home, STALE_QUERY)
        return {"/".join(n["assetKey"]["path"]): n["staleStatus"] for nodes in data.values() for n in nodes}

    assert set(statuses().values()) == {"FRESH"}
    chunker = copy / "quiver" / "chunking.py"
    chunker.write_text(chunker.read_text().replace("overlap_tokens: int = 32", "overlap_tokens: int = 40"))
    after = statuses()
    assert after == {"documents": "FRESH", "chunks": "STALE", "embeddings": "STALE", "faiss_index": "STALE",
                     "milvus_collection": "STALE"}
