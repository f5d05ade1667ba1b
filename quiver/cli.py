"""The `quiver` command: run the pipeline, manage sources, search the indexes."""

import argparse
import json
import os
import sys
import textwrap
from typing import Any

from quiver.settings import dagster_home


def _prepare_environment() -> None:
    """Point Dagster at the embedded default instance unless the user chose another."""
    os.environ.setdefault("DAGSTER_HOME", str(dagster_home()))
    os.makedirs(os.environ["DAGSTER_HOME"], exist_ok=True)


def _resources() -> dict[str, Any]:
    from platform_defs.resources import build_resources

    return build_resources(resolve_env=True)


def cmd_run(args: argparse.Namespace) -> int:
    from dagster import DagsterInstance, execute_job, reconstructable

    from platform_defs.definitions import get_index_job, get_ingest_job
    from platform_defs.jobs import INDEX_ASSETS, INGEST_ASSETS

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
    failed: list[str] = []
    for name in names:
        print(f"==> ingesting source {name!r} (documents -> chunks -> embeddings)", flush=True)
        result = execute_job(reconstructable(get_ingest_job), instance=instance, tags={"dagster/partition": name},
                             run_config=config_for_job(file_config, INGEST_ASSETS, run_config))
        if not result.success:
            failed.append(name)
            print(f"!! source {name!r} failed: {_failure_message(result)}", file=sys.stderr)
    print("==> updating the FAISS index and the Milvus collection", flush=True)
    result = execute_job(reconstructable(get_index_job), instance=instance,
                         run_config=config_for_job(file_config, INDEX_ASSETS, run_config))
    if not result.success:
        print(f"!! indexing failed: {_failure_message(result)}", file=sys.stderr)
        return 1
    _print_summary(res)
    return 1 if failed else 0


def load_run_config(path: str) -> dict[str, Any]:
    """A Dagster run config YAML file (ops, resources, execution), as `dagster ... -c FILE` takes it."""
    import yaml

    from quiver.errors import ConfigError

    try:
        with open(path, encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read run config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a run config is a mapping (ops:, resources:, execution:)")
    return loaded


def config_for_job(file_config: dict[str, Any], assets: tuple[str, ...], base: dict[str, Any]) -> dict[str, Any]:
    """The file's config for one job: the `ops` entries of the job's own assets, everything else as is."""
    merged = {**file_config, **base}
    if "ops" in file_config:
        merged["ops"] = {op: value for op, value in file_config["ops"].items() if op in assets}
    return merged


def _failure_message(result: Any) -> str:
    for event in result.all_events:
        data = event.step_failure_data if event.is_step_failure else None
        if data and data.user_failure_data and data.user_failure_data.description:
            return f"step {event.step_key}: {data.user_failure_data.description.strip()}"
        if data and data.error:
            return f"step {event.step_key}: {data.error.message.strip()}"
    return f"run {result.run_id} did not succeed"


def _print_summary(res: dict[str, Any]) -> None:
    version = res["faiss_store"].open_current()
    milvus = res["milvus"]
    print(textwrap.dedent(f"""
        Quiver is ready.
          artifacts (Parquet FileRefs): {res['store'].root}
          FAISS index:                  {version.directory} ({version.manifest['ntotal']} vectors, \
{version.manifest['index_type']})
          Milvus collection:            {milvus.collection!r} at {milvus.uri} ({milvus.count()} vectors)
          Dagster instance:             {os.environ['DAGSTER_HOME']}

        Query it:
          quiver search "how do I parse json" -k 5
          quiver search "how do I parse json" -k 5 --store milvus --json
        See every asset in the UI:
          DAGSTER_HOME={os.environ['DAGSTER_HOME']} dagster dev
    """))


def cmd_source(args: argparse.Namespace) -> int:
    registry = _resources()["sources"]
    if args.action == "add":
        spec = registry.add(args.name, args.path, args.kind, args.chunking)
        _add_partition(spec.name)
        print(f"added source {spec.name!r}: {spec.kind} at {spec.path}")
    elif args.action == "remove":
        removed = registry.remove(args.name)
        _remove_partition(args.name)
        print(f"removed source {args.name!r}" if removed else f"no source {args.name!r}")
        if removed:
            print("run `quiver run` to drop its vectors from FAISS and Milvus")
    else:
        for spec in registry.all():
            print(f"{spec.name}\t{spec.kind}\t{spec.path}")
    return 0


def _add_partition(name: str) -> None:
    from dagster import DagsterInstance

    instance = DagsterInstance.get()
    if name not in instance.get_dynamic_partitions("sources"):
        instance.add_dynamic_partitions("sources", [name])


def _remove_partition(name: str) -> None:
    from dagster import DagsterInstance

    instance = DagsterInstance.get()
    if name in instance.get_dynamic_partitions("sources"):
        instance.delete_dynamic_partition("sources", name)


def search(query: str, k: int, store: str) -> list[dict[str, Any]]:
    """Top-k documents for a query: chunks are ranked, then each document keeps its best chunk."""
    res = _resources()
    vector = res["model_pool"].encode([query])
    fetch = max(k * 4, 20)
    if store == "faiss":
        hits = res["faiss_store"].open_current().search(vector, fetch)[0]
    else:
        hits = res["milvus"].search(vector, fetch)[0]
    results: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for hit in hits:
        if (hit.source, hit.doc_id) in seen:
            continue
        seen.add((hit.source, hit.doc_id))
        body = hit.text[len(hit.title) + 1:] if hit.title and hit.text.startswith(hit.title + "\n") else hit.text
        results.append({"rank": len(results) + 1, "score": round(hit.score, 4), "doc_id": hit.doc_id,
                        "source": hit.source, "title": hit.title, "chunk_id": hit.chunk_id,
                        "snippet": " ".join(body.split())[:200]})
        if len(results) == k:
            break
    return results


def cmd_search(args: argparse.Namespace) -> int:
    results = search(args.query, args.k, args.store)
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


def cmd_eval(args: argparse.Namespace) -> int:
    """Ingest and index the BEIR source if needed, then evaluate it: the same Dagster jobs as the UI runs."""
    from dagster import DagsterInstance, execute_job, reconstructable
    from upath import UPath

    from platform_defs.definitions import get_eval_job, get_index_job, get_ingest_job
    from quiver.beir import has_relevance_data
    from quiver.errors import ConfigError

    path = str(UPath(args.path).absolute())
    if not has_relevance_data(path, args.split):
        raise ConfigError(f"{path} is not a BEIR-format directory: it needs corpus.jsonl (or .gz), queries.jsonl "
                          f"and qrels/{args.split}.tsv")
    name = args.name or UPath(path).name + ("-whole" if args.chunking == "whole_document" else "")
    res = _resources()
    res["sources"].add(name, path, "beir", args.chunking)
    _add_partition(name)
    instance = DagsterInstance.get()
    logging = {"loggers": {"console": {"config": {"log_level": args.log_level}}}}
    steps = [("ingesting", get_ingest_job, {"dagster/partition": name}, {}),
             ("indexing", get_index_job, {}, {}),
             ("evaluating", get_eval_job, {"dagster/partition": name}, {"ops": eval_ops_config(args)})]
    result = None
    for what, job, tags, config in steps:
        if not args.json:
            print(f"==> {what} {name!r}", file=sys.stderr, flush=True)
        result = execute_job(reconstructable(job), instance=instance, tags=tags, run_config={**logging, **config})
        if not result.success and what != "evaluating":
            print(f"!! {what} failed: {_failure_message(result)}", file=sys.stderr)
            return 1
    assert result is not None
    report = eval_report(result)
    if report is None:
        print(f"!! evaluation failed: {_failure_message(result)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_eval_report(name, report))
    return 0 if result.success and all(c["passed"] for c in report["checks"].values()) else 1


def eval_ops_config(args: argparse.Namespace) -> dict[str, Any]:
    ops: dict[str, Any] = {"retrieval_eval": {"config": {"split": args.split, "aggregation": args.aggregation,
                                                         "stores": args.store}}}
    if args.ndcg_floor is not None:
        ops["retrieval_eval_ndcg_at_10_above_floor"] = {"config": {"floor": args.ndcg_floor}}
    return ops


def eval_report(result: Any) -> dict[str, Any] | None:
    """The evaluation's figures and check verdicts, from the run's events."""
    report: dict[str, Any] | None = None
    checks: dict[str, dict[str, Any]] = {}
    for event in result.all_events:
        if event.event_type_value == "ASSET_MATERIALIZATION":
            meta = {k: v.value for k, v in event.step_materialization_data.materialization.metadata.items()}
            stores = [s for s in ("faiss", "milvus") if f"{s}_ndcg@10" in meta]
            report = {
                "queries": meta["queries"], "chunking": meta["chunking"], "aggregation": meta["aggregation"],
                "stores": {s: {"ndcg@10": meta[f"{s}_ndcg@10"], "recall@100": meta[f"{s}_recall@100"],
                               "mrr@10": meta[f"{s}_mrr@10"], "index_type": meta[f"{s}_index_type"]} for s in stores},
                "faiss_milvus_top10_agreement": meta.get("faiss_milvus_top10_agreement"),
                "queries_worse_than_previous": meta["queries_worse_than_previous"], "per_query": meta["path"],
            }
        elif event.event_type_value == "ASSET_CHECK_EVALUATION":
            evaluation = event.event_specific_data
            checks[evaluation.check_name] = {"passed": evaluation.passed, "description": evaluation.description}
    if report is not None:
        report["checks"] = checks
    return report


def format_eval_report(name: str, report: dict[str, Any]) -> str:
    rows = [["store", "index", "nDCG@10", "Recall@100", "MRR@10", "queries"]]
    for store, figures in report["stores"].items():
        rows.append([store, str(figures["index_type"]), f"{figures['ndcg@10']:.5f}", f"{figures['recall@100']:.5f}",
                     f"{figures['mrr@10']:.5f}", str(report["queries"])])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"Retrieval quality of {name!r} ({report['chunking']} chunking, {report['aggregation']} over chunks)", ""]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    if report["faiss_milvus_top10_agreement"] is not None:
        lines.append(f"\nFAISS and Milvus share the top-10 of {report['faiss_milvus_top10_agreement']:.2%} of queries")
    lines.append(f"{report['queries_worse_than_previous']} queries got worse since the previous evaluation; "
                 f"per-query scores: {report['per_query']}")
    for check, verdict in sorted(report["checks"].items()):
        lines.append(f"{'PASS' if verdict['passed'] else 'FAIL'}  {check}: {verdict['description']}")
    return "\n".join(lines)


def cmd_reexecute(args: argparse.Namespace) -> int:
    """Re-executes a run of one of Quiver's jobs, by default from its failure: finished steps' outputs are
    reused, the failed steps and what depends on them run again, with the parent's config and partition."""
    from dagster import DagsterInstance, ReexecutionOptions, execute_job, reconstructable

    from platform_defs.definitions import get_eval_job, get_index_job, get_ingest_job
    from quiver.errors import ConfigError

    factories = {"ingest_job": get_ingest_job, "index_job": get_index_job, "eval_job": get_eval_job}
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
        print(f"!! {_failure_message(result)}", file=sys.stderr)
    return 0 if result.success else 1


def cmd_limits(args: argparse.Namespace) -> int:
    """This machine's concurrency limits per memory class, and the instance's pools."""
    from dagster import DagsterInstance

    from platform_defs.limits import apply_pools, current_limits
    from quiver.memory import format_size

    pool = _resources()["model_pool"]
    if args.measure:
        pool.footprint_file().unlink(missing_ok=True)
    limits = current_limits()
    s = limits.settings
    if args.json:
        print(json.dumps({"available": s.available, "budget": s.budget, "cores": s.cores, "sources": s.sources,
                          "classes": {c.memory_class: {"need": c.need, "limit": c.limit, "bound_by": c.bound_by,
                                                       "pool": c.pool} for c in limits.classes.values()}}, indent=2))
    else:
        print(f"memory available {format_size(s.available)} ({s.sources.get('available')}), budget "
              f"{format_size(s.budget)} ({s.sources.get('budget')}), {s.cores} cores")
        rows = [["class", "need", "from", "share", "limit", "bound by", "pool"], *limits.rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        print(f"worst case, every class at its limit: {format_size(limits.worst_case())}")
    if args.apply:
        with DagsterInstance.get() as instance:
            changed = apply_pools(instance, limits)
        for name, (was, now) in changed.items():
            print(f"pool {name}: {was} -> {now}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quiver", description="Documents to fresh vector indexes, on Dagster.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="materialize every source and the indexes (the main job)")
    run.add_argument("--source", action="append", help="only this source (repeatable); default: all")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                     help="console log level of the Dagster runs (default INFO)")
    run.add_argument("--config", metavar="FILE", help="run config YAML (ops, resources, execution), e.g. the "
                     "embed-and-insert settings of config/ingest.yaml")
    run.set_defaults(func=cmd_run)

    source = sub.add_parser("source", help="add, list or remove sources (partitions)")
    source_sub = source.add_subparsers(dest="action", required=True)
    add = source_sub.add_parser("add", help="register a directory of .md/.txt, a JSONL/Parquet file or BEIR dir")
    add.add_argument("name")
    add.add_argument("path")
    add.add_argument("--kind", choices=["stdlib", "files", "jsonl", "parquet", "beir"])
    add.add_argument("--chunking", choices=["tokens", "whole_document"], default="tokens",
                     help="tokens: windows that fit the model (default); whole_document: one chunk per document, "
                          "truncated by the model, as MTEB encodes BEIR corpora")
    source_sub.add_parser("list")
    remove = source_sub.add_parser("remove")
    remove.add_argument("name")
    source.set_defaults(func=cmd_source)

    srch = sub.add_parser("search", help="search the FAISS index or the Milvus collection")
    srch.add_argument("query")
    srch.add_argument("-k", type=int, default=5)
    srch.add_argument("--store", choices=["faiss", "milvus"], default="faiss")
    srch.add_argument("--json", action="store_true", help="machine-readable output")
    srch.set_defaults(func=cmd_search)

    ev = sub.add_parser("eval", help="retrieval quality of both indexes on a BEIR-format directory")
    ev.add_argument("path", help="a BEIR directory: corpus.jsonl[.gz], queries.jsonl, qrels/<split>.tsv")
    ev.add_argument("--name", help="source name (default: the directory's name, with -whole for whole_document)")
    ev.add_argument("--chunking", choices=["tokens", "whole_document"], default="tokens")
    ev.add_argument("--split", default="test")
    ev.add_argument("--aggregation", choices=["max", "sum", "mean"], default="max",
                    help="how a document's score comes from its chunks (default max)")
    ev.add_argument("--store", choices=["both", "faiss", "milvus"], default="both")
    ev.add_argument("--ndcg-floor", type=float, default=None, help="fail when nDCG@10 is below this")
    ev.add_argument("--json", action="store_true", help="machine-readable output")
    ev.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    ev.set_defaults(func=cmd_eval)

    rex = sub.add_parser("reexecute", help="re-execute a run, from its failure by default")
    rex.add_argument("run_id")
    rex.add_argument("--all-steps", dest="from_failure", action="store_false",
                     help="re-execute every step, not only the failed ones and what depends on them")
    rex.set_defaults(func=cmd_reexecute)

    lim = sub.add_parser("limits", help="concurrency limits per memory class on this machine")
    lim.add_argument("--measure", action="store_true", help="measure the model's memory footprint again")
    lim.add_argument("--apply", action="store_true", help="set the instance's concurrency pools to these limits")
    lim.add_argument("--json", action="store_true")
    lim.set_defaults(func=cmd_limits)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _prepare_environment()
    from quiver.errors import QuiverError

    try:
        return int(args.func(args) or 0)
    except QuiverError as exc:
        print(f"quiver: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
