"""`quiver serve` as its clients see it: a real server process with the real model, over a FAISS index and a
Milvus Lite collection built by real Dagster runs of the pipeline on a small source."""

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.serve_process import PROJECT, QUIVER, ServerProcess
from tests.conftest import QUIVER_ENV
from tests.helpers import add_source, index, ingest, scifact_docs, write_jsonl

TOKEN = "s3cret-token-for-the-tests"
DOCS = scifact_docs(30)
QUERIES = [DOCS[7]["title"], "stem cells and tumour growth", DOCS[21]["text"][:180]]


@dataclass
class Served:
    home: Path
    source: Path
    server: ServerProcess
    resources: dict[str, Any]
    instance: Any

    def post(self, body: Any, token: str | None = TOKEN, raw: bytes | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        content = raw if raw is not None else json.dumps(body).encode()
        return httpx.post(f"{self.server.url}/search", content=content, headers=headers, timeout=60)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(f"{self.server.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}


def run_pipeline(instance: Any, resources: dict[str, Any]) -> None:
    """A real Dagster run of the ingest assets of the source, then of both indexes and their checks."""
    ingest(instance, resources, "small")
    index(instance, resources)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A home whose index the pipeline built, and an authenticated server over it, for the module's tests."""
    from dagster import DagsterInstance

    from platform_defs.resources import build_resources
    from resources.process import reset_process_state

    root = tmp_path_factory.mktemp("serve")
    home = root / "dagster_home"
    home.mkdir()
    shutil.copy(PROJECT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(home))
        for name in QUIVER_ENV:
            mp.delenv(name, raising=False)
        reset_process_state()
        resources = build_resources(resolve_env=True)
        with DagsterInstance.get() as instance:
            source = write_jsonl(root / "small.jsonl", DOCS)
            add_source(instance, resources, "small", source)
            run_pipeline(instance, resources)
            server = ServerProcess(home, root / "server.log", env={"QUIVER_SERVER_TOKEN": TOKEN},
                                   args=["--max-query-chars", "200", "--max-queries", "8", "--milvus-wait-s", "0.5"])
            server.start()
            try:
                server.wait_ready()
                yield Served(home, source, server, resources, instance)
            finally:
                server.stop()
                reset_process_state()


def test_answers_equal_quiver_search_on_both_stores(served: Served) -> None:
    from platform_defs.cli import search

    store = served.resources["faiss_store"]
    version = store.current_version()
    assert store.manifest(version)["model_fingerprints"] == [served.resources["model_pool"].fingerprint()]
    for kind in ("faiss", "milvus"):
        for query in QUERIES:
            answer = served.post({"query": query, "k": 5, "store": kind, "documents": True})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["hits"] == search(query, 5, kind)  # the standalone path of `quiver search`
            assert body["index_version"] == (version if kind == "faiss" else None)
            assert [r["query"] for r in body["results"]] == [query]
    top = served.post({"query": DOCS[7]["title"], "k": 1, "documents": True}).json()["hits"][0]
    assert (top["doc_id"], top["title"], top["rank"]) == (DOCS[7]["id"], DOCS[7]["title"], 1)

    # Chunk hits: the k nearest chunks of the served version, as FAISS ranks them.
    chunks = served.post({"queries": QUERIES[:2], "k": 4}).json()
    vectors = served.resources["model_pool"].encode(QUERIES[:2])
    expected = store.open_current().search(vectors, 4)
    assert "hits" not in chunks and chunks["documents"] is False
    assert [[h["chunk_id"] for h in r["hits"]] for r in chunks["results"]] == [[h.chunk_id for h in row]
                                                                             for row in expected]
    assert [[h["score"] for h in r["hits"]] for r in chunks["results"]] == [[round(h.score, 4) for h in row]
                                                                          for row in expected]
    one_source = served.post({"query": QUERIES[1], "k": 3, "source": "small"}).json()
    assert {h["source"] for h in one_source["hits"]} == {"small"} and len(one_source["hits"]) == 3


def test_quiver_search_talks_to_the_server_without_torch(served: Served) -> None:
    from platform_defs.cli import search

    probe = ("import json, sys\nfrom platform_defs.cli import main\nrc = main(sys.argv[1:])\n"
             "sys.stderr.write(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'dagster'})))\n"
             "sys.exit(rc)")
    env = {**os.environ, "DAGSTER_HOME": str(served.home), "QUIVER_SERVER_URL": served.server.url,
           "QUIVER_SERVER_TOKEN": TOKEN}
    for kind in ("faiss", "milvus"):
        proc = subprocess.run([sys.executable, "-c", probe, "search", QUERIES[0], "-k", "4", "--store", kind, "--json"],
                              cwd=PROJECT, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == search(QUERIES[0], 4, kind)
        assert proc.stderr == "[]"  # neither torch nor Dagster was imported
    refused = subprocess.run([str(QUIVER), "search", QUERIES[0]], cwd=PROJECT, capture_output=True, text=True,
                             env={**env, "QUIVER_SERVER_TOKEN": "wrong"}, timeout=60)
    assert (refused.returncode, refused.stderr) == (
        2, f"quiver: the Quiver server at {served.server.url} answered 401: the bearer token is not valid\n")


LONG = "x" * 201
BAD_INPUTS = [
    (b'{"query": ""}', 422, "query is empty"),
    (b'{"query": "\\ud800"}', 422, "query is not valid text: surrogates not allowed at position 0"),
    (b"[" * 100_000, 400, "the body is not a search request: it nests deeper than a JSON parser follows"),
    (b'{"query": "   "}', 422, "query is empty"),
    (b'{"queries": ["fine", ""]}', 422, "queries[1] is empty"),
    (b'{"queries": []}', 422, "queries must be a non-empty list of strings"),
    (json.dumps({"queries": ["q"] * 9}).encode(), 422, "queries has 9 entries; the limit is 8"),
    (b'{"query": 5}', 422, "query must be a string, not int"),
    (b'{"query": "a", "k": 0}', 422, "k is 0; it must be between 1 and 100"),
    (b'{"query": "a", "k": 101}', 422, "k is 101; it must be between 1 and 100"),
    (b'{"query": "a", "k": "5"}', 422, "k must be an integer, not str"),
    (b'{"query": "a", "k": true}', 422, "k must be an integer, not bool"),
    (b'{"query": "a", "source": "nope"}', 422, "unknown source 'nope': the sources are small"),
    (b'{"query": "a", "source": "nope", "store": "milvus"}', 422, "unknown source 'nope': the sources are small"),
    (b'{"query": "a", "source": "../etc"}', 422, "source '../etc' is not a source name: those are letters, "
     "digits, '_', '.' and '-', starting with a letter or digit, at most 64 characters"),
    (b'{"query": "a", "store": "pgvector"}', 422, "unknown store 'pgvector': use one of faiss, milvus"),
    (b'{"query": "a", "aggregation": "median"}', 422, "unknown aggregation 'median': use one of max, sum, mean"),
    (b'{"query": "a", "documents": "yes"}', 422, "documents must be true or false, not 'yes'"),
    (b'{"query": "a", "queries": ["b"]}', 422, "give either query (a string) or queries (a list of strings)"),
    (b'{"k": 3}', 422, "give either query (a string) or queries (a list of strings)"),
    (b'{"query": "a", "top_k": 3}', 422, "unknown field 'top_k': the fields are query, queries, k, source, store, "
     "documents, aggregation"),
    (json.dumps({"query": LONG}).encode(), 422, "query is 201 characters long; the limit is 200"),
    (b"query=how+to+parse+json", 400, "the body is not JSON: Expecting value: line 1 column 1 (char 0)"),
    (b'{"query": "a"', 400, "the body is not JSON: Expecting ',' delimiter: line 1 column 14 (char 13)"),
    (b"", 400, "the body is not JSON: Expecting value: line 1 column 1 (char 0)"),
    (b'["a"]', 400, 'the body must be a JSON object, such as {"query": "how do I parse json", "k": 5}'),
    (b"x" * (1 << 20 | 1), 413, f"the body is {1 << 20 | 1} bytes; the limit is {1 << 20}"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_INPUTS, ids=[m[:40] for _, _, m in BAD_INPUTS])
def test_bad_input_gets_a_4xx_with_a_clear_message(served: Served, body: bytes, status: int, message: str) -> None:
    answer = served.post(None, raw=body)
    assert (answer.status_code, answer.json()) == (status, {"error": message})


def test_unknown_paths_and_methods_get_json_errors(served: Served) -> None:
    url = served.server.url
    assert (lambda r: (r.status_code, r.json()))(httpx.get(f"{url}/search")) == (
        405, {"error": "GET is not allowed on /search"})
    assert (lambda r: (r.status_code, r.json()))(httpx.post(f"{url}/query", json={"query": "a"})) == (
        404, {"error": "no such path /query: the API is POST /search, GET /healthz, /readyz and /metrics"})


def test_authentication(served: Served) -> None:
    missing = served.post({"query": "a"}, token=None)
    assert (missing.status_code, missing.json(), missing.headers["www-authenticate"]) == (
        401, {"error": "this server needs a bearer token: send the header Authorization: Bearer <token>"}, "Bearer")
    wrong = served.post({"query": "a"}, token=TOKEN[:-1] + "X")
    assert (wrong.status_code, wrong.json()) == (401, {"error": "the bearer token is not valid"})
    assert served.post({"query": "a"}, token=TOKEN).status_code == 200
    assert httpx.get(f"{served.server.url}/metrics").status_code == 401
    # Probes need no token.
    assert served.server.get("/healthz") == (200, {"status": "alive"})
    assert served.server.get("/readyz")[1]["status"] == "ready"
    # Off loopback, the server does not start without a token unless told to.
    env = {k: v for k, v in served.server.env.items() if k != "QUIVER_SERVER_TOKEN"}
    proc = subprocess.run([str(QUIVER), "serve", "--host", "0.0.0.0"], cwd=PROJECT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (2, "quiver: serving on 0.0.0.0, which is not loopback, needs a bearer "
                                                 "token: set QUIVER_SERVER_TOKEN (clients send it as Authorization: "
                                                 "Bearer <token>), or pass --no-auth to serve without authentication "
                                                 "on purpose\n")


def _value(metrics: dict[Any, float], name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def test_concurrent_queries_are_micro_batched_with_the_answers_of_single_ones(served: Served) -> None:
    queries = [f"{d['title']}" for d in DOCS[:24]]
    alone = [served.post({"query": q, "k": 3, "documents": True}).json()["hits"] for q in queries]
    before = served.metrics()

    async def together() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as client:
            return await asyncio.gather(*(client.post(f"{served.server.url}/search", json={
                "query": q, "k": 3, "documents": True}) for q in queries))

    answers = asyncio.run(together())
    after = served.metrics()
    assert [a.status_code for a in answers] == [200] * 24
    assert [a.json()["hits"] for a in answers] == alone
    batches = _value(after, "quiver_batch_requests_count") - _value(before, "quiver_batch_requests_count")
    assert _value(after, "quiver_batch_requests_sum") - _value(before, "quiver_batch_requests_sum") == 24
    assert 1 <= batches < 24  # requests shared forward passes
    assert _value(after, "quiver_search_requests_total", store="faiss", status="200") - _value(
        before, "quiver_search_requests_total", store="faiss", status="200") == 24


def test_metrics_count_requests_errors_and_the_served_version(served: Served) -> None:
    before = served.metrics()
    assert served.post({"query": "a", "k": 2}).status_code == 200
    assert served.post({"query": ""}).status_code == 422
    assert served.post({"query": "a"}, token=None).status_code == 401
    after = served.metrics()

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("quiver_search_requests_total", store="faiss", status="200") == 1
    assert delta("quiver_search_requests_total", store="none", status="422") == 1
    assert delta("quiver_search_requests_total", store="none", status="401") == 1
    assert delta("quiver_errors_total", kind="invalid") == 1
    assert delta("quiver_errors_total", kind="unauthorized") == 1
    assert delta("quiver_search_request_seconds_count", store="faiss") == 1
    assert delta("quiver_batch_queries_count") == 1
    version = served.resources["faiss_store"].current_version()
    assert _value(after, "quiver_index_version_info", version=version) == 1
    assert _value(after, "quiver_index_vectors") == served.resources["faiss_store"].manifest(version)["ntotal"]
    assert _value(after, "quiver_ready") == 1


def test_milvus_lite_is_taken_per_batch_and_busy_is_a_503(served: Served) -> None:
    from resources.milvus_clients import close_milvus_clients, hold_lite

    uri = served.resources["milvus"].uri
    assert served.post({"query": QUERIES[0], "store": "milvus"}).status_code == 200
    assert hold_lite(uri, wait=False)  # the server gave the database back after its batch
    try:  # held here, as a pipeline step that writes Milvus holds it
        busy = served.post({"query": QUERIES[0], "store": "milvus"})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "2"
        message = busy.json()["error"]
        assert message.startswith(f"the Milvus Lite database {uri} is held by another process (pid {os.getpid()} on ")
        assert message.endswith("it admits one process at a time: ask again soon, or serve from a Milvus server "
                                "(QUIVER_MILVUS_URI)")
        assert served.post({"query": QUERIES[0]}).status_code == 200  # FAISS answers meanwhile
    finally:
        close_milvus_clients(uri)
    assert served.post({"query": QUERIES[0], "store": "milvus"}).status_code == 200


def test_refuses_to_start_on_an_index_of_another_model(served: Served, tmp_path: Path) -> None:
    from resources.model_pool import ModelPool

    model = tmp_path / "model"
    shutil.copytree(served.resources["model_pool"].model_path, model)
    config = json.loads((model / "sentence_bert_config.json").read_text())
    (model / "sentence_bert_config.json").write_text(json.dumps({**config, "max_seq_length": 128}))
    version = served.resources["faiss_store"].current_version()
    ours, theirs = served.resources["model_pool"].fingerprint(), ModelPool(model=str(model)).fingerprint()
    proc = subprocess.run([str(QUIVER), "serve", "--port", "1"], cwd=PROJECT, capture_output=True, text=True,
                          env={**served.server.env, "QUIVER_MODEL": str(model)}, timeout=120)
    assert (proc.returncode, proc.stderr.splitlines()[-1]) == (2, (
        f"quiver: not serving: FAISS version {version} holds vectors of model fingerprint {ours}, but this server's "
        f"model ({model}, backend torch) has fingerprint {theirs}: its queries would be encoded differently from the "
        "chunks. Serve with the settings the pipeline ran with (QUIVER_MODEL, QUIVER_MODEL_BACKEND, "
        "QUIVER_MODEL_QUANTIZATION), or rebuild the index with this model"))


def test_readiness_is_503_until_the_index_exists(quiver_home: Path, tmp_path: Path) -> None:
    from dagster import DagsterInstance

    from platform_defs.resources import build_resources

    server = ServerProcess(quiver_home, tmp_path / "server.log").start()
    try:
        server.wait_listening()
        assert server.get("/healthz") == (200, {"status": "alive"})
        faiss_dir = f"{quiver_home}/artifacts/faiss_index"
        no_index = f"no FAISS index under {faiss_dir} yet: materialize faiss_index first"
        deadline = time.monotonic() + 300
        while (status := server.get("/readyz"))[1]["reasons"] != [no_index]:  # the model may still be loading
            assert status[0] == 503 and no_index in status[1]["reasons"]
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.2)
        assert status[0] == 503 and status[1]["status"] == "not ready" and status[1]["index_version"] is None
        refused = httpx.post(f"{server.url}/search", json={"query": "stem cells"})
        assert (refused.status_code, refused.json()) == (503, {"error": f"no FAISS index is being served: {no_index}"})

        resources = build_resources(resolve_env=True)
        with DagsterInstance.get() as instance:
            add_source(instance, resources, "small", write_jsonl(tmp_path / "small.jsonl", DOCS[:10]))
            run_pipeline(instance, resources)
        ready = server.wait_ready(timeout_s=30)
        assert ready["index_version"] == resources["faiss_store"].current_version()
        found = httpx.post(f"{server.url}/search", json={"query": DOCS[3]["title"], "k": 1, "documents": True})
        assert found.json()["hits"][0]["doc_id"] == DOCS[3]["id"]
    finally:
        assert server.stop() in (0, -15), server.log_tail()  # uvicorn re-raises the SIGTERM it handled


def test_a_new_version_is_picked_up_without_a_failed_request(served: Served) -> None:
    """Last in the module: it changes the index the others read."""
    store = served.resources["faiss_store"]
    old = store.current_version()
    swaps_before = _value(served.metrics(), "quiver_index_swaps_total")
    query = "zebra migration across the Serengeti"
    assert DOCS[29]["id"] in {h["doc_id"] for h in served.post(
        {"query": DOCS[29]["title"], "k": 3, "documents": True}).json()["hits"]}
    seen: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as client:
            while not stop.is_set():
                answer = client.post(f"{served.server.url}/search", json={"query": query, "k": 1, "documents": True})
                seen.append((answer.status_code, answer.json().get("index_version")))

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        marker = {"id": "zebra-1", "title": "Zebra migration", "text": "Zebras migrate across the Serengeti plains "
                  "every year, following the rains and fresh grass."}
        write_jsonl(served.source, [*DOCS[:29], marker])  # one document gone, one new
        run_pipeline(served.instance, served.resources)
        new = store.current_version()
        assert new != old
        deadline = time.monotonic() + 15
        while not seen or seen[-1][1] != new:
            assert time.monotonic() < deadline, f"still served {seen[-1:]} after 15 s: {served.server.log_tail()}"
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join()
    assert {status for status, _ in seen} == {200}
    versions = [v for _, v in seen]
    assert set(versions) == {old, new}
    assert versions == sorted(versions, key=lambda v: v == new)  # old, then new: never back
    hit = served.post({"query": query, "k": 1, "documents": True}).json()
    assert (hit["index_version"], hit["hits"][0]["doc_id"]) == (new, "zebra-1")
    gone = served.post({"query": DOCS[29]["title"], "k": 3, "documents": True}).json()
    assert DOCS[29]["id"] not in {h["doc_id"] for h in gone["hits"]}
    assert served.server.get("/readyz")[1]["index_version"] == new
    assert _value(served.metrics(), "quiver_index_swaps_total") == swaps_before + 1


def test_the_model_threads_sleep_between_forward_passes(served: Served) -> None:
    """Spinning OpenMP threads take the cores from the event loop and the clients between forward passes."""
    ready = served.server.get("/readyz")[1]
    assert ready["omp_wait_policy"] == "PASSIVE"
    assert isinstance(ready["model_threads"], int) and ready["model_threads"] >= 1


class _CountedTable:
    """A payload table that counts the rows read of each column (a stand-in for the FAISS version's)."""

    def __init__(self, table: Any, reads: dict[str, int]) -> None:
        self.table, self.reads = table, reads

    def __getattr__(self, name: str) -> Any:
        return getattr(self.table, name)

    def column(self, name: str) -> Any:
        column, reads = self.table.column(name), self.reads
        return type("Counted", (), {"__getattr__": lambda _, a: getattr(column, a), "take": lambda _, rows: (
            reads.__setitem__(name, reads.get(name, 0) + len(rows)), column.take(rows))[1]})()


def test_a_batch_reads_the_titles_and_texts_of_the_hits_it_shows_only(served: Served) -> None:
    from platform_defs.cli import search
    from quiver.serving.engine import SearchEngine
    from quiver.serving.requests import SearchRequest
    from quiver.serving.watcher import IndexWatcher

    watcher, reads = IndexWatcher(served.resources["faiss_store"]), {}
    assert watcher.refresh() and watcher.current is not None
    watcher.current.index.payload = _CountedTable(watcher.current.index.payload, reads)
    engine = SearchEngine(served.resources["model_pool"].encode, watcher, None, set)  # type: ignore[arg-type]
    answers = engine.run_batch([SearchRequest((q,), k=3, documents=True) for q in QUERIES])
    assert [a["hits"] for a in answers] == [search(q, 3, "faiss") for q in QUERIES]  # type: ignore[index]
    # Documents are ranked from 20 chunks a query; only the 3 shown of each are read in full.
    assert reads["doc_id"] == 20 * len(QUERIES) and reads["title"] == reads["text"] == 3 * len(QUERIES)


def test_a_servers_batches_encode_without_hashing_the_model_again(served: Served,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """pool.encode hashes the model's files (for its fingerprint) at every call; the server's encoder finds its
    model once, and encodes exactly as the pool does."""
    import numpy as np

    import resources.model_pool as model_pool

    pool = served.resources["model_pool"]
    expected, hashed, real = pool.encode(QUERIES), [], model_pool.weights_hash
    encode = pool.encoder(pool.fingerprint())
    monkeypatch.setattr(model_pool, "weights_hash", lambda path: hashed.append(path) or real(path))
    assert np.array_equal(encode(QUERIES), expected) and hashed == []
    assert len(pool.encode(QUERIES)) == 3 and len(hashed) == 2  # what each batch cost
