"""Search service benchmark on the default corpus's index (the stdlib documentation), all in one run:

1. `quiver serve` driven by 1, 8, 32 and 128 concurrent clients (aiohttp's async client, one connection each) for
   a fixed time per level, with micro-batching on and off (two servers side by side, driven in turn in
   alternating order; medians of the repeats): QPS, p50/p95/p99 latency, errors, mean batch size;
2. under 32 clients, 5 new FAISS versions published by re-materializing faiss_index (a marker document changes
   each time): failed answers, and wrong-version answers (a version never published, a marker that is not the
   claimed version's, a version older than one published `--grace-s` before the request, or a client seeing an
   older version after a newer one);
3. `quiver search` end to end, through the server (QUIVER_SERVER_URL) and standalone.

    python bench/serve.py [--backend torch] [--seconds 8] [--repeats 2] [--levels 1,8,32,128] [--swaps 5]
                          [--limit-docs N] [--home DIR]

`--backend` (QUIVER_MODEL_BACKEND: torch, onnx-int8, openvino-int8, ...) is the model backend the home is indexed
with and every server and publisher runs with (a server refuses an index of another backend's fingerprint); the
tables and serve.json say which.
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PROJECT, fresh_home, median, print_table, write_results, write_stdlib_subset  # noqa: E402
from bench.serve_process import QUIVER, ServerProcess  # noqa: E402
from quiver.backends import BACKENDS  # noqa: E402

QUERIES = ["how do I parse json", "read a csv file", "sort a list of dictionaries by a key",
           "run a subprocess and read its output", "parse command line arguments", "format a date as a string",
           "compress a file with gzip", "open a tcp socket", "named groups in regular expressions",
           "hash a password securely", "run functions in a thread pool", "create a temporary directory",
           "encode custom types as json", "pretty print nested data", "send an http request",
           "round a decimal number", "random sample without replacement", "walk a directory tree",
           "copy a file with its metadata", "log messages to a file", "replace a function in a unit test",
           "wait for several asyncio tasks", "dataclass field with a default factory", "enum with string values"]
MARKER_QUERY = "Quiver hot swap marker document"
BACKEND_ENV = "QUIVER_MODEL_BACKEND"  # read by the model pool of every process the benchmark starts
K = 10


def marker_doc(n: int) -> dict[str, str]:
    return {"id": f"marker-{n}", "title": f"Swap marker {n}",
            "text": f"{MARKER_QUERY} number {n}: the benchmark republishes the FAISS index with this document."}


def write_marker(path: Path, n: int) -> None:
    path.write_text(json.dumps(marker_doc(n)) + "\n", encoding="utf-8")


def build_home(args: argparse.Namespace) -> Path:
    """A home with the default corpus (or its first --limit-docs documents) and the marker source, indexed by
    `quiver run`; an existing --home is reused as it is."""
    if args.home:
        home = Path(args.home)
        os.environ["DAGSTER_HOME"] = str(home)
        return home
    home = fresh_home("quiver-bench-serve-")
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    corpus = ["stdlib", "stdlib", "--kind", "stdlib"]
    if args.limit_docs:
        corpus = ["stdlib_subset", str(write_stdlib_subset(home / "stdlib_subset.jsonl", args.limit_docs))]
    write_marker(home / "swaps.jsonl", 0)
    for source in (corpus, ["swaps", str(home / "swaps.jsonl")]):
        subprocess.run([str(QUIVER), "source", "add", *source], env=env, check=True, cwd=PROJECT)
    started = time.perf_counter()
    subprocess.run([str(QUIVER), "run", "--log-level", "WARNING"], env=env, check=True, cwd=PROJECT,
                   stdout=subprocess.DEVNULL)
    print(f"indexed the corpus in {time.perf_counter() - started:.0f}s ({home})", flush=True)
    return home


async def drive(url: str, clients: int, seconds: float, marker_every: int = 0,
                until: asyncio.Event | None = None) -> list[dict[str, Any]]:
    """`clients` clients, each sending its next request when the last one was answered, for `seconds` (or until
    the event is set; the requests in flight then are waited for); every `marker_every`-th request of a client
    asks for the marker document.

    The clients are aiohttp's (one keep-alive connection each): they share the server's cores, and at 32 clients
    httpx's async client spent 5.6-7.9 ms of CPU per request here against aiohttp's 0.4-0.5 ms, CPU that the
    server's forward passes then lacked (the benchmark measured its own client)."""
    import aiohttp

    records: list[dict[str, Any]] = []
    end = time.perf_counter() + seconds

    def going() -> bool:
        return not until.is_set() if until is not None else time.perf_counter() < end

    async def client(number: int, http: aiohttp.ClientSession) -> None:
        sent = 0
        while going():
            marker = marker_every and sent % marker_every == marker_every - 1
            body = ({"query": MARKER_QUERY, "k": 1, "source": "swaps", "documents": True} if marker else
                    {"query": QUERIES[(number + sent) % len(QUERIES)], "k": K, "documents": True})
            sent += 1
            started, wall = time.perf_counter(), time.time()
            record: dict[str, Any] = {"client": number, "sent": wall, "marker": bool(marker)}
            try:
                async with http.post(f"{url}/search", json=body) as answer:
                    record["status"] = answer.status
                    data = await answer.json()  # read in full either way: the connection is reused
                    if answer.status == 200:
                        record["version"] = data["index_version"]
                        record["top"] = data["hits"][0]["doc_id"] if data["hits"] else None
            except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                record["status"], record["exception"] = None, f"{type(exc).__name__}: {exc}"
            record["latency_s"] = time.perf_counter() - started
            records.append(record)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    return records


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def batch_counts(server: ServerProcess) -> tuple[float, float]:
    """(batches, queries) the server has run so far, from /metrics."""
    import urllib.request

    text = urllib.request.urlopen(server.url + "/metrics", timeout=10).read().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("quiver_batch_q")}
    return values.get("quiver_batch_queries_count", 0.0), values.get("quiver_batch_queries_sum", 0.0)


def level_row(batching: str, clients: int, wall_s: float, records: list[dict[str, Any]],
              batches: float, queries: float) -> dict[str, Any]:
    """One run's figures; QPS over its whole wall time, the last requests' answers included."""
    ok = [r["latency_s"] * 1000 for r in records if r["status"] == 200]
    return {"batching": batching, "clients": clients, "requests": len(records), "errors": len(records) - len(ok),
            "qps": round(len(ok) / wall_s, 1), "p50_ms": round(percentile(ok, 50), 1),
            "p95_ms": round(percentile(ok, 95), 1), "p99_ms": round(percentile(ok, 99), 1),
            "mean_batch": round(queries / max(1.0, batches), 1)}


def load_levels(home: Path, levels: list[int], seconds: float, repeats: int, logs: Path) -> tuple[list[dict[str, Any]],
                                                                                                  list[dict[str, Any]]]:
    """Both servers (batching on and off) run side by side, and each level drives them in turn, in alternating
    order (on, off, off, on, ...), so that a machine whose load drifts weighs on both alike; per level and mode,
    the medians of the repeats."""
    servers = {mode: ServerProcess(home, logs / f"batching-{mode}.log", args=[] if mode == "on" else ["--no-batching"])
               for mode in ("on", "off")}
    runs: list[dict[str, Any]] = []
    try:
        for server in servers.values():
            server.start()
        for server in servers.values():
            model = server.wait_ready()["model"]
            assert model.endswith(f"backend {os.environ[BACKEND_ENV]}"), f"the server runs {model}"
            asyncio.run(drive(server.url, 8, 2.0))  # warm-up, not counted
        for clients in levels:
            for repeat in range(repeats):
                for mode in ("on", "off") if repeat % 2 == 0 else ("off", "on"):
                    batches0, queries0 = batch_counts(servers[mode])
                    started = time.perf_counter()
                    records = asyncio.run(drive(servers[mode].url, clients, seconds))
                    wall = time.perf_counter() - started
                    batches1, queries1 = batch_counts(servers[mode])
                    runs.append({**level_row(mode, clients, wall, records, batches1 - batches0,
                                             queries1 - queries0), "repeat": repeat, "wall_s": round(wall, 2)})
                    print(f"batching {mode}, {clients} clients, repeat {repeat + 1}: {runs[-1]}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    rows = []
    for clients in levels:
        for mode in ("on", "off"):
            mine = [r for r in runs if r["clients"] == clients and r["batching"] == mode]
            rows.append({"batching": mode, "clients": clients, "requests": sum(r["requests"] for r in mine),
                         "errors": sum(r["errors"] for r in mine),
                         **{key: round(median([r[key] for r in mine]), 1)
                            for key in ("qps", "p50_ms", "p95_ms", "p99_ms", "mean_batch")}})
    return rows, runs


def publish_worker(home: Path) -> None:
    """Run in a process of its own: for each line on stdin, a new marker document, the swaps source re-ingested
    and faiss_index re-materialized (real Dagster runs); prints the version CURRENT then names."""
    os.environ["DAGSTER_HOME"] = str(home)
    from dagster import DagsterInstance, materialize

    from platform_defs.definitions import ALL_ASSETS, ALL_CHECKS
    from platform_defs.jobs import INGEST_ASSETS
    from platform_defs.resources import build_resources

    resources = build_resources(resolve_env=True)
    store = resources["faiss_store"]
    instance = DagsterInstance.get()
    resources["model_pool"].loaded()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        n = int(line)
        previous = store.current_version()
        write_marker(home / "swaps.jsonl", n)
        materialize(ALL_ASSETS, instance=instance, resources=resources, partition_key="swaps",
                    selection=list(INGEST_ASSETS))
        materialize([*ALL_ASSETS, *ALL_CHECKS], instance=instance, resources=resources, selection=["faiss_index"])
        # When CURRENT moved: make_current notes it as the time the previous version was retired.
        moved = float((store.root / "retired" / previous).read_text())
        print(json.dumps({"n": n, "version": store.current_version(), "at": moved}), flush=True)


async def swaps_under_load(home: Path, swaps: int, clients: int, grace_s: float, log: Path) -> dict[str, Any]:
    from platform_defs.resources import build_resources

    first = build_resources(resolve_env=True)["faiss_store"].current_version()
    start = int(json.loads((home / "swaps.jsonl").read_text())["id"].removeprefix("marker-"))  # a reused home's
    worker = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--publish-worker", "--home", str(home), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=Path(f"{log}.publisher").open("wb"), cwd=PROJECT,
        env={**os.environ, "DAGSTER_HOME": str(home)})
    assert worker.stdin is not None and worker.stdout is not None
    assert json.loads(await worker.stdout.readline()) == {"ready": True}
    server = ServerProcess(home, log).start()
    await asyncio.to_thread(server.wait_ready)
    published = [{"n": start, "version": first, "at": 0.0}]
    stop = asyncio.Event()

    async def publish() -> None:
        try:
            await asyncio.sleep(2)
            for n in range(start + 1, start + swaps + 1):
                worker.stdin.write(f"{n}\n".encode())  # type: ignore[union-attr]
                line = await worker.stdout.readline()  # type: ignore[union-attr]
                if not line:  # the publisher died: stop the clients instead of waiting for a version forever
                    raise RuntimeError(f"the publisher exited before version {n} (its log: {log}.publisher)")
                published.append(json.loads(line))
                print(f"published version {n}: {published[-1]['version']}", flush=True)
                await asyncio.sleep(2)
        finally:
            stop.set()

    started = time.perf_counter()
    publisher = asyncio.create_task(publish())
    # Every other request of each client asks for the marker, until the last version has been out for 2 s.
    records = await drive(server.url, clients, 0, marker_every=2, until=stop)
    await publisher
    wall = time.perf_counter() - started
    worker.stdin.close()
    await worker.wait()
    server.stop()
    return {"published": published, "wall_s": wall, **judge(records, published, grace_s)}


def judge(records: list[dict[str, Any]], published: list[dict[str, Any]], grace_s: float) -> dict[str, Any]:
    """Failed and wrong-version answers, and how soon each version was first served."""
    order = {p["version"]: i for i, p in enumerate(published)}
    failed = [r for r in records if r["status"] != 200]
    answered = [r for r in records if r["status"] == 200]
    unknown = [r for r in answered if r["version"] not in order]
    wrong_marker = [r for r in answered if r["marker"] and r["version"] in order
                    and r["top"] != f"marker-{published[order[r['version']]]['n']}"]
    stale = [r for r in answered if r["version"] in order and any(
        p["at"] and r["sent"] > p["at"] + grace_s and order[r["version"]] < i for i, p in enumerate(published))]
    backwards, newest = [], {}
    for r in sorted(answered, key=lambda r: r["sent"]):
        if r["version"] in order:
            if order[r["version"]] < newest.get(r["client"], 0):
                backwards.append(r)
            newest[r["client"]] = max(newest.get(r["client"], 0), order[r["version"]])
    delays = []
    for p in published[1:]:
        seen = [r["sent"] + r["latency_s"] for r in answered if r["version"] == p["version"]]
        delays.append(round(min(seen) - p["at"], 2) if seen else None)
    latencies = [r["latency_s"] * 1000 for r in answered]
    wrong = len(unknown) + len(wrong_marker) + len(stale) + len(backwards)
    return {"requests": len(records), "failed": len(failed), "failures": [r.get("exception") or r["status"]
                                                                          for r in failed][:10],
            "unknown_version": len(unknown), "wrong_marker": len(wrong_marker), "stale": len(stale),
            "backwards": len(backwards), "wrong_version": wrong,
            "marker_answers": sum(r["marker"] for r in answered), "first_served_after_s": delays,
            "versions_served": sorted({r["version"] for r in answered}, key=lambda v: order.get(v, -1)),
            "p50_ms": round(percentile(latencies, 50), 1), "p99_ms": round(percentile(latencies, 99), 1)}


def cli_search(home: Path, repeats: int, log: Path) -> dict[str, Any]:
    """Wall time of `quiver search` as a user runs it: through a running server, and standalone (once: it loads
    the model)."""
    server = ServerProcess(home, log).start()
    try:
        server.wait_ready()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run([str(QUIVER), "search", QUERIES[0], "-k", "5"], check=True, stdout=subprocess.DEVNULL,
                           env={**os.environ, "DAGSTER_HOME": str(home), "QUIVER_SERVER_URL": server.url})
            times.append(time.perf_counter() - started)
    finally:
        server.stop()
    started = time.perf_counter()
    subprocess.run([str(QUIVER), "search", QUERIES[0], "-k", "5"], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "DAGSTER_HOME": str(home)})
    return {"through_server_s": times, "through_server_median_s": median(times),
            "standalone_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="torch", choices=BACKENDS, help="the model backend the index is "
                        "built with and the servers run (default torch)")
    parser.add_argument("--seconds", type=float, default=8.0, help="load per level and batching mode")
    parser.add_argument("--levels", default="1,8,32,128", help="concurrent clients, comma-separated")
    parser.add_argument("--repeats", type=int, default=2, help="runs per level and mode, in alternating order")
    parser.add_argument("--swaps", type=int, default=5, help="FAISS versions published under load")
    parser.add_argument("--swap-clients", type=int, default=32)
    parser.add_argument("--grace-s", type=float, default=5.0, help="a request sent this long after a version was "
                        "published must not be answered by an older one")
    parser.add_argument("--limit-docs", type=int, default=0, help="index only the first N stdlib documents")
    parser.add_argument("--home", help="reuse a home this benchmark built before")
    parser.add_argument("--publish-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ[BACKEND_ENV] = args.backend  # before any model pool reads it, here or in a process started here
    if args.publish_worker:
        publish_worker(Path(args.home))
        return
    home = build_home(args)
    from platform_defs.resources import build_resources

    store = build_resources(resolve_env=True)["faiss_store"]
    manifest = store.manifest(store.current_version())
    pool = build_resources(resolve_env=True)["model_pool"]
    if manifest.get("model_fingerprints") != [pool.fingerprint()]:
        raise SystemExit(f"the index at {home} was not built with backend {args.backend}: give --home of a run "
                         "with that backend, or none")
    levels = [int(n) for n in args.levels.split(",")]
    logs = home / "bench-logs"
    logs.mkdir(exist_ok=True)
    rows, runs = load_levels(home, levels, args.seconds, args.repeats, logs)
    swaps = asyncio.run(swaps_under_load(home, args.swaps, args.swap_clients, args.grace_s, logs / "swaps.log"))
    print(f"swaps: {json.dumps({k: v for k, v in swaps.items() if k != 'published'})}", flush=True)
    cli = cli_search(home, 5, logs / "cli.log")

    at = {(r["batching"], r["clients"]): r for r in rows}
    on32, off32 = at.get(("on", 32)), at.get(("off", 32))
    targets = []
    if on32 and off32:
        ratio = on32["qps"] / max(off32["qps"], 1e-9)
        targets += [
            {"measure": "QPS at 32 clients, batching on / off (p50 latency off / on)",
             "value": f"{on32['qps']} / {off32['qps']} = {ratio:.2f}x ({off32['p50_ms'] / on32['p50_ms']:.2f}x)",
             "target": ">= 3x", "met": ratio >= 3},
            {"measure": "p99 latency at 32 clients, batching on", "value": f"{on32['p99_ms']} ms",
             "target": "<= 100 ms", "met": on32["p99_ms"] <= 100}]
    targets += [
        {"measure": f"failed answers across {args.swaps} swaps under {args.swap_clients} clients",
         "value": swaps["failed"], "target": "0", "met": swaps["failed"] == 0},
        {"measure": "wrong-version answers across the swaps", "value": swaps["wrong_version"], "target": "0",
         "met": swaps["wrong_version"] == 0},
        {"measure": "quiver search through the server, end to end (median of 5)",
         "value": f"{cli['through_server_median_s']:.2f}s (standalone {cli['standalone_s']:.1f}s)",
         "target": "< 1 s", "met": cli["through_server_median_s"] < 1}]
    # Every row says its model backend: a table pasted alone still says which backend it measured.
    rows = [{"backend": args.backend, **r} for r in rows]
    targets = [{"backend": args.backend, **t} for t in targets]
    headers = ["backend", "batching", "clients", "requests", "errors", "qps", "p50_ms", "p95_ms", "p99_ms",
               "mean_batch"]
    table1 = print_table(f"quiver serve, model backend {args.backend}, on the default corpus's index "
                         f"({manifest['ntotal']} vectors, {manifest['index_type']}), k={K} documents, "
                         f"{args.seconds:g} s per level and mode, medians of {args.repeats} in alternating order",
                         headers, [[r[h] for h in headers] for r in rows])
    table2 = print_table(f"Targets, model backend {args.backend}", ["backend", "measure", "value", "target", "met"],
                         [list(t.values()) for t in targets])
    write_results("serve", {"backend": args.backend, "model": pool.model, "model_fingerprint": pool.fingerprint(),
                            "args": vars(args), "vectors": manifest["ntotal"], "index_type": manifest["index_type"],
                            "k": K, "levels": rows, "runs": runs, "swaps": swaps, "cli": cli, "targets": targets,
                            "table": table1 + "\n" + table2})


if __name__ == "__main__":
    main()
