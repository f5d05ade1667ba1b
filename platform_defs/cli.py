"""The `quiver` command: run the pipeline, manage sources, search the indexes, see the memory limits.

Each command runs Quiver's own Dagster jobs on the instance of $DAGSTER_HOME (the project's dagster_home/
unless set), so the UI shows every run a command made.
"""

import argparse
import json
import os
import socket
import sys
import textwrap
from pathlib import Path
from typing import Any

from quiver.errors import ConfigError, QuiverError
from quiver.names import CHUNKING_STRATEGIES, DEFAULT_CHUNKING
from quiver.search import DEFAULT_K
from quiver.settings import PROJECT_ROOT, dagster_home
from quiver.warm import WARM_CHILD_ENV, run_through_host

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def _prepare_environment() -> None:
    """Point Dagster at the embedded default instance unless the user chose another."""
    os.environ.setdefault("DAGSTER_HOME", str(dagster_home()))
    os.makedirs(os.environ["DAGSTER_HOME"], exist_ok=True)


def _resources() -> dict[str, Any]:
    from platform_defs.resources import build_resources

    return build_resources(resolve_env=True)


def cmd_run(args: argparse.Namespace) -> int:
    from dagster import DagsterInstance, execute_job, reconstructable

    from platform_defs.definitions import get_index_job, get_ingest_job, get_refresh_job
    from platform_defs.jobs import INDEX_ASSETS, INGEST_ASSETS
    from platform_defs.runs import config_for_job, failure_message, load_run_config
    from platform_defs.sqlite_keepalive import sqlite_files_held

    res = _resources()
    registry = res["sources"]
    if not registry.all():
        registry.add("stdlib", "stdlib", "stdlib")
    names = args.source or [spec.name for spec in registry.all()]
    for name in names:
        registry.get(name)  # fails early, with a clear message, for an unknown source
    instance = DagsterInstance.get()
    known = set(instance.get_dynamic_partitions("sources"))
    instance.add_dynamic_partitions("sources", [n for n in names if n not in known])

    # INFO keeps the console to what a user wants to follow (progress, results); the UI has everything.
    run_config = {"loggers": {"console": {"config": {"log_level": args.log_level}}}}
    file_config = load_run_config(args.config) if args.config else {}

    def run(factory: Any, assets: tuple[str, ...], tags: dict[str, str]) -> Any:
        with sqlite_files_held(instance):  # the run's creation and its last events, as its executor does the rest
            return execute_job(reconstructable(factory), instance=instance, tags=tags,
                               run_config=config_for_job(file_config, assets, run_config))

    print(f"quiver run materializes {', '.join(INGEST_ASSETS)} of {len(names)} source(s) ({', '.join(names)}), then "
          f"{' and '.join(INDEX_ASSETS)} with their checks; not retrieval_eval (`quiver eval DIR` evaluates a BEIR "
          "directory)", flush=True)
    if len(names) == 1:  # one run: the source's stages, then both indexes and their checks
        print(f"==> refreshing source {names[0]!r} (documents -> chunks -> embeddings) and the indexes "
              "(faiss_index, milvus_collection) in one run", flush=True)
        result = run(get_refresh_job, (*INGEST_ASSETS, *INDEX_ASSETS), {"dagster/partition": names[0]})
        if not result.success:
            print(f"!! the run failed: {failure_message(result)}", file=sys.stderr)
            return 1
        _print_summary(res, result)
        return 0
    failed: list[str] = []
    for name in names:  # a run per source: one bad source does not hold back the others
        print(f"==> ingesting source {name!r} (documents -> chunks -> embeddings)", flush=True)
        result = run(get_ingest_job, INGEST_ASSETS, {"dagster/partition": name})
        if not result.success:
            failed.append(name)
            print(f"!! source {name!r} failed: {failure_message(result)}", file=sys.stderr)
    print("==> updating the FAISS index and the Milvus collection", flush=True)
    result = run(get_index_job, INDEX_ASSETS, {})
    if not result.success:
        print(f"!! indexing failed: {failure_message(result)}", file=sys.stderr)
        return 1
    _print_summary(res, result)
    return 1 if failed else 0


def _index_facts(result: Any) -> dict[str, dict[str, Any]]:
    """{asset: metadata} of the index materializations of a run: the summary reads them instead of reopening
    both stores (opening Milvus Lite alone takes about half a second)."""
    facts = {}
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        if mat.asset_key.path[-1] in ("faiss_index", "milvus_collection"):
            facts[mat.asset_key.path[-1]] = {k: v.value for k, v in mat.metadata.items()}
    return facts


def _print_summary(res: dict[str, Any], result: Any) -> None:
    facts = _index_facts(result)
    faiss, milvus = facts.get("faiss_index", {}), facts.get("milvus_collection", {})
    print(textwrap.dedent(f"""
        Quiver is ready.
          artifacts (Parquet FileRefs): {res['store'].root}
          FAISS index:                  {faiss.get('path', '?')} ({faiss.get('vectors', '?')} vectors, \
{faiss.get('index_type', '?')})
          Milvus collection:            {res['milvus'].collection!r} at {res['milvus'].uri} \
({milvus.get('vectors', '?')} vectors)
          Dagster instance:             {os.environ['DAGSTER_HOME']}

        Query it:
          quiver search "how do I parse json" -k 5
          quiver search "how do I parse json" -k 5 --store milvus --json
        Evaluate retrieval quality on a BEIR directory (corpus, queries, qrels; not part of quiver run):
          quiver eval DIR
        See every asset in the UI:
          DAGSTER_HOME={os.environ['DAGSTER_HOME']} dagster dev
    """))


def search(query: str, k: int, store: str, notes: list[str] | None = None) -> list[dict[str, Any]]:
    """Top-k documents for a query: its chunks are ranked, then each document keeps its best chunk. A request
    validate_search refuses is refused here too; k is capped at what the index holds (said in `notes`)."""
    from quiver.retrieval import top_documents
    from quiver.search import SearchRequestError, capped_note, chunks_to_fetch, validate_search

    request = validate_search(query, k)
    res = _resources()
    if store == "faiss":
        version = res["faiss_store"].open_current()
        held, fetch = int(version.manifest["ntotal"]), lambda vector, n: version.search(vector, n)[0]
    else:
        milvus = res["milvus"]
        held, fetch = (milvus.count() if milvus.exists() else 0), lambda vector, n: milvus.search(vector, n)[0]
    if held == 0:
        raise SearchRequestError(f"the {store} index holds no vectors yet: run `quiver run` first")
    vector = res["model_pool"].encode([request.query])
    depth = chunks_to_fetch(request.k, held)
    while True:  # read deeper while documents with many chunks leave fewer than k, up to the whole index
        ranked = top_documents(fetch(vector, depth), request.k, document=lambda h: f"{h.source}\x00{h.doc_id}",
                               score=lambda h: h.score)
        if len(ranked) >= request.k or depth >= held:
            break
        depth = min(depth * 2, held)
    if store == "milvus":
        res["milvus"].release()
    if notes is not None and (note := capped_note(request.k, len(ranked), held, store)):
        notes.append(note)
    return [{"rank": rank, "score": round(score, 4), "doc_id": hit.doc_id, "source": hit.source, "title": hit.title,
             "chunk_id": hit.chunk_id, "snippet": hit.snippet()} for rank, (hit, score) in enumerate(ranked, start=1)]


def cmd_search(args: argparse.Namespace) -> int:
    from quiver.search import validate_search

    validate_search(args.query, args.k)  # refused before the model or an index is loaded
    notes: list[str] = []
    if os.environ.get("QUIVER_SERVER_URL"):  # a running `quiver serve`: no model to load here
        from quiver.serving.client import search_server

        results = search_server(os.environ["QUIVER_SERVER_URL"], args.query, args.k, args.store)
        if len(results) < args.k:
            notes.append(f"{len(results)} results, fewer than k={args.k}: the server's index holds no more")
    else:
        results = search(args.query, args.k, args.store, notes)
    for note in notes:  # on stderr: --json output stays one JSON document
        print(f"quiver: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(f"{r['rank']:>2}. {r['score']:.4f}  {r['doc_id']}  [{r['source']}]")
        print(f"    {r['title']}")
        print(textwrap.indent(textwrap.fill(r["snippet"], 100), "    "))
    if not results:
        print("no results")
    return 0


def cmd_reexecute(args: argparse.Namespace) -> int:
    """Re-executes a run of one of Quiver's jobs, by default from its failure: finished steps' outputs are
    reused, the failed steps and what depends on them run again, with the parent's config and partition."""
    from dagster import DagsterInstance, ReexecutionOptions, execute_job, reconstructable

    from platform_defs.definitions import get_eval_job, get_index_job, get_ingest_job, get_refresh_job
    from platform_defs.runs import failure_message

    factories = {"ingest_job": get_ingest_job, "index_job": get_index_job, "refresh_job": get_refresh_job,
                 "eval_job": get_eval_job}
    instance = DagsterInstance.get()
    parent = instance.get_run_by_id(args.run_id)
    if parent is None:
        raise ConfigError(f"no run {args.run_id} in the instance at {os.environ['DAGSTER_HOME']}")
    if parent.job_name not in factories:
        raise ConfigError(f"run {args.run_id} is of job {parent.job_name!r}; quiver re-executes "
                          f"{', '.join(factories)} (use the UI for others)")
    options = (ReexecutionOptions.from_failure(args.run_id, instance) if args.from_failure
               else ReexecutionOptions(parent_run_id=args.run_id))
    tags = {k: v for k, v in parent.tags.items() if not k.startswith("dagster/") or k == "dagster/partition"}
    result = execute_job(reconstructable(factories[parent.job_name]), instance=instance, run_config=parent.run_config,
                         tags=tags, reexecution_options=options)
    steps = sorted({e.step_key for e in result.all_events if e.is_step_success and e.step_key})
    print(f"run {result.run_id} re-executed {parent.job_name} {'from failure' if args.from_failure else 'in full'}"
          f" of {args.run_id}: {'succeeded' if result.success else 'failed'}; steps run: {', '.join(steps) or 'none'}")
    if not result.success:
        print(f"!! {failure_message(result)}", file=sys.stderr)
    return 0 if result.success else 1


def cmd_limits(args: argparse.Namespace) -> int:
    """This machine's concurrency limits per memory class, and the instance's pools."""
    from dagster import DagsterInstance

    from platform_defs.footprint import forget_footprint
    from platform_defs.limits import apply_pools, current_limits
    from quiver.memory import format_size
    from quiver.tables import aligned

    if args.measure:
        forget_footprint(_resources()["model_pool"])
    limits = current_limits()
    s = limits.settings
    celery = os.environ.get("QUIVER_EXECUTOR") == "celery"
    if args.json:
        print(json.dumps({"available": s.available, "budget": s.budget, "cores": s.cores, "sources": s.sources,
                          "executor": "celery" if celery else "multiprocess",
                          "classes": {c.memory_class: {"need": c.need, "limit": c.limit, "bound_by": c.bound_by,
                                                       "pool": c.pool, "formula": s.sources.get(c.memory_class)}
                                      for c in limits.classes.values()}}, indent=2))
    else:
        print(f"memory available {format_size(s.available)} ({s.sources.get('available')}), budget "
              f"{format_size(s.budget)} ({s.sources.get('budget')}), {s.cores} cores")
        print(aligned(["class", "need", "share", "limit", "bound by", "pool"], limits.rows()))
        print(f"worst case, every class at its limit: {format_size(limits.worst_case())}")
        print("\nwhat one step of each class holds:")
        for c in limits.classes.values():
            print(f"  {c.memory_class}: {s.sources.get(c.memory_class)}")
        if celery:
            print("\nexecutor: celery. Each worker runs as many steps of its queue's class as this table allows on "
                  "its own machine: start them with `quiver worker model` and `quiver worker io,light`; every step "
                  "checks its need against the worker's memory before it starts.")
        else:
            print("\nexecutor: multiprocess. The limits apply within a run (tag limits, with a preflight when it "
                  "starts) and across runs (the pools above, with the queued run coordinator).")
    if args.apply:
        with DagsterInstance.get() as instance:
            changed = apply_pools(instance, limits)
        for name, (was, now) in changed.items():
            print(f"pool {name}: {was} -> {now}", file=sys.stderr)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """A Celery worker for memory-class queues, as many processes as this machine's memory allows for them."""
    from platform_defs.limits import current_limits

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    limits = current_limits()
    unknown = [q for q in queues if q not in limits.classes]
    if unknown:
        raise ConfigError(f"no memory class {', '.join(unknown)}: queues are {', '.join(limits.classes)}")
    # Steps of any listed class may arrive: the smallest limit is the one that fits whatever the mix is.
    concurrency = args.concurrency or min(limits.classes[q].limit for q in queues)
    name = args.name or f"{'-'.join(queues)}-{socket.gethostname()}"
    if "model" in queues:  # the worker's model steps share its cores, as in the multiprocess executor
        os.environ.setdefault("QUIVER_MODEL_THREADS", str(max(1, limits.settings.cores // concurrency)))
    command = [str(Path(sys.executable).parent / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app",
               "-y", args.config, "-q", ",".join(queues), "-n", name,
               *(["-i", "platform_defs.preload"] if "model" in queues else []), "--", "-c", str(concurrency)]
    threads = f", {os.environ['QUIVER_MODEL_THREADS']} model thread(s) each" if "model" in queues else ""
    print(f"worker {name}: {concurrency} processes for {', '.join(queues)} "
          f"({'; '.join(f'{q} limit {limits.classes[q].limit}' for q in queues)}){threads}", file=sys.stderr,
          flush=True)
    if args.dry_run:
        print(" ".join(command))
        return 0
    os.execv(command[0], command)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from platform_defs.cli_eval import evaluate

    return evaluate(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quiver", description="Documents to fresh vector indexes, on Dagster.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="materialize documents, chunks and embeddings of every source, then faiss_index "
                         "and milvus_collection with their checks (not retrieval_eval: see `quiver eval`)")
    run.add_argument("--source", action="append", help="only this source (repeatable); default: all")
    run.add_argument("--log-level", default="INFO", choices=LOG_LEVELS,
                     help="console log level of the Dagster runs (default INFO)")
    run.add_argument("--config", metavar="FILE", help="run config YAML (ops, resources, execution), e.g. the "
                     "embed-and-insert settings of config/ingest.yaml")
    run.set_defaults(func=cmd_run)

    from platform_defs.cli_model import add_parser as add_export_parser
    from platform_defs.cli_source import add_parser as add_source_parser

    add_source_parser(sub)

    srch = sub.add_parser("search", help="search the FAISS index or the Milvus collection")
    srch.add_argument("query", help="the text to search for (not empty)")
    srch.add_argument("-k", type=int, default=DEFAULT_K, metavar="N",
                      help=f"how many documents to return, at least 1 (default {DEFAULT_K}; capped at what the "
                           "index holds)")
    srch.add_argument("--store", choices=["faiss", "milvus"], default="faiss",
                      help="the FAISS index (default) or the Milvus collection: the same vectors")
    srch.add_argument("--json", action="store_true", help="machine-readable output")
    srch.set_defaults(func=cmd_search)

    ev = sub.add_parser("eval", help="retrieval quality of both indexes on a BEIR-format directory")
    ev.add_argument("path", help="a BEIR directory: corpus.jsonl[.gz], queries.jsonl, qrels/<split>.tsv")
    ev.add_argument("--name", help="source name (default: the directory's name, with -whole for whole_document)")
    ev.add_argument("--chunking", choices=CHUNKING_STRATEGIES, default=DEFAULT_CHUNKING,
                    help="tokens (default) or whole_document (as MTEB encodes BEIR: reproduces published figures)")
    ev.add_argument("--split", default="test", help="which qrels/<split>.tsv holds the judgments (default test)")
    ev.add_argument("--aggregation", choices=["max", "sum", "mean"], default="max",
                    help="how a document's score comes from its chunks (default max)")
    ev.add_argument("--store", choices=["both", "faiss", "milvus"], default="both",
                    help="the stores to evaluate (default both)")
    ev.add_argument("--ndcg-tolerance", type=float, default=None,
                    help="fail when nDCG@10 drops more than this below the last passing evaluation with the same "
                         "settings (default 0.01)")
    ev.add_argument("--ndcg-floor", type=float, default=None,
                    help="also fail when nDCG@10 is below this absolute floor (default: no floor)")
    ev.add_argument("--json", action="store_true", help="machine-readable output")
    ev.add_argument("--log-level", default="CRITICAL", choices=[*LOG_LEVELS, "CRITICAL"],
                    help="console log level of the Dagster runs (default CRITICAL: the command prints its own "
                         "report and verdicts; the UI has every event)")
    ev.set_defaults(func=cmd_eval)

    rex = sub.add_parser("reexecute", help="re-execute a run, from its failure by default")
    rex.add_argument("run_id", help="the run to re-execute (its id, as the UI or `quiver run` shows it)")
    rex.add_argument("--all-steps", dest="from_failure", action="store_false",
                     help="re-execute every step, not only the failed ones and what depends on them (default: "
                          "from the failure)")
    rex.set_defaults(func=cmd_reexecute)

    lim = sub.add_parser("limits", help="concurrency limits per memory class on this machine")
    lim.add_argument("--measure", action="store_true", help="measure the model's memory footprint again")
    lim.add_argument("--apply", action="store_true", help="set the instance's concurrency pools to these limits")
    lim.add_argument("--json", action="store_true", help="machine-readable output")
    lim.set_defaults(func=cmd_limits)

    wrk = sub.add_parser("worker", help="start a Celery worker for memory-class queues (QUIVER_EXECUTOR=celery)")
    wrk.add_argument("queues", help="comma-separated memory classes: model, or io,light")
    wrk.add_argument("-c", "--concurrency", type=int, default=0,
                     help="worker processes (default: the smallest limit of the queues' classes on this machine)")
    wrk.add_argument("--config", default=str(PROJECT_ROOT / "deploy" / "production" / "celery.yaml"),
                     help="the workers' Celery config (broker and backend), default deploy/production/celery.yaml")
    wrk.add_argument("-n", "--name", help="the worker's name (default: its queues and this host's name)")
    wrk.add_argument("--dry-run", action="store_true", help="print the worker command instead of running it")
    wrk.set_defaults(func=cmd_worker)

    from platform_defs.cli_warm import add_parser as add_warm_parser
    from platform_defs.serve_cli import add_parser as add_serve_parser

    add_export_parser(sub)
    add_warm_parser(sub)
    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    _prepare_environment()
    if args.func is cmd_run and not os.environ.get(WARM_CHILD_ENV):  # a warm host's child runs it itself
        code = run_through_host(argv)
        if code is not None:
            return code
    try:
        return int(args.func(args) or 0)
    except QuiverError as exc:
        print(f"quiver: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
