"""`quiver eval`: the retrieval evaluation of a BEIR directory, through the same Dagster jobs the UI runs."""

import argparse
import json
import sys
from typing import Any

from dagster import DagsterInstance, execute_job, reconstructable
from upath import UPath

from platform_defs.cli_progress import progress
from platform_defs.definitions import get_eval_job, get_index_job, get_ingest_job
from platform_defs.resources import build_resources
from platform_defs.runs import add_partition, failure_message
from quiver.beir import has_relevance_data
from quiver.errors import ConfigError
from quiver.tables import aligned


def evaluate(args: argparse.Namespace) -> int:
    """Ingest and index the BEIR source if needed, then evaluate it: the same Dagster jobs as the UI runs."""
    path = str(UPath(args.path).absolute())
    if not has_relevance_data(path, args.split):
        raise ConfigError(f"{path} is not a BEIR-format directory: it needs corpus.jsonl (or .gz), queries.jsonl "
                          f"and qrels/{args.split}.tsv")
    name = args.name or UPath(path).name + ("-whole" if args.chunking == "whole_document" else "")
    res = build_resources(resolve_env=True)
    res["sources"].add(name, path, "beir", args.chunking)
    add_partition(name, judged=True)
    instance = DagsterInstance.get()
    logging = {"loggers": {"console": {"config": {"log_level": args.log_level}}}}
    steps = [("ingesting", get_ingest_job, {"dagster/partition": name}, {}),
             ("indexing", get_index_job, {}, {}),
             ("evaluating", get_eval_job, {"dagster/partition": name}, {"ops": eval_ops_config(args)})]
    result = None
    # each job is minutes of waiting on a large corpus: a bar of the three on a terminal
    with progress(f"quiver eval {name}", len(steps), quiet=args.json) as bar:
        for what, job, tags, config in steps:
            with bar.step(f"{what} {name!r}"):
                result = execute_job(reconstructable(job), instance=instance, tags=tags,
                                     run_config={**logging, **config})
            if not result.success and what != "evaluating":
                break
    assert result is not None
    if not result.success and what != "evaluating":
        print(f"!! {what} failed: {failure_message(result)}", file=sys.stderr)
        return 1
    report = eval_report(result)
    if report is None:
        print(f"!! evaluation failed: {failure_message(result)}", file=sys.stderr)
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
    if args.ndcg_tolerance is not None:
        ops["retrieval_eval_ndcg_at_10_no_regression"] = {"config": {"tolerance": args.ndcg_tolerance}}
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
    rows = [[store, str(figures["index_type"]), f"{figures['ndcg@10']:.5f}", f"{figures['recall@100']:.5f}",
             f"{figures['mrr@10']:.5f}", str(report["queries"])] for store, figures in report["stores"].items()]
    lines = [f"Retrieval quality of {name!r} ({report['chunking']} chunking, {report['aggregation']} over chunks)", ""]
    lines.append(aligned(["store", "index", "nDCG@10", "Recall@100", "MRR@10", "queries"], rows))
    if report["faiss_milvus_top10_agreement"] is not None:
        lines.append(f"\nFAISS and Milvus share the top-10 of {report['faiss_milvus_top10_agreement']:.2%} of queries")
    lines.append(f"{report['queries_worse_than_previous']} queries got worse since the previous evaluation; "
                 f"per-query scores: {report['per_query']}")
    for check, verdict in sorted(report["checks"].items()):
        lines.append(f"{'PASS' if verdict['passed'] else 'FAIL'}  {check}: {verdict['description']}")
    return "\n".join(lines)
