"""The retrieval evaluation's blocking checks: no regression against the last passing evaluation with the same
settings (the gate on by default), an absolute nDCG@10 floor (only when a user sets one), both stores agreeing,
and every result being a document of the corpus."""

import time

import numpy as np
import pyarrow as pa
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    Config,
    MetadataValue,
    asset_check,
)
from pydantic import Field

from assets.common import fail_fast_unless_transient, judged_sources_partitions, memory_class
from assets.retrieval_eval import COLUMN_OF, EVAL_SETTINGS, retrieval_eval
from quiver.regression import Evaluation, judge, settings_key
from quiver.retrieval import MEASURES
from resources.fileref import FileRef, FileStore

BASELINES = ["_eval_baselines"]  # the last passing evaluation per source and settings (FileStore cache)


def _store_means(table: pa.Table) -> dict[str, dict[str, float]]:
    means: dict[str, dict[str, float]] = {}
    stores = table.column("store").to_pylist()
    for store in sorted(set(stores)):
        rows = [i for i, s in enumerate(stores) if s == store]
        means[store] = {name: float(np.mean([table.column(COLUMN_OF[name])[i].as_py() for i in rows]))
                        for name in MEASURES}
    return means


def per_query_ndcg(table: pa.Table) -> dict[str, dict[str, float]]:
    """{store: {query id: nDCG@10}} of an evaluation's results."""
    found: dict[str, dict[str, float]] = {}
    for store, query, value in zip(*(table.column(c).to_pylist() for c in ("store", "query_id", "ndcg_at_10")),
                                   strict=True):
        found.setdefault(store, {})[query] = float(value)
    return found


class CheckSeverityConfig(Config):
    fail_run: bool = Field(default=True, description="A failure fails the run (ERROR); off: it warns (WARN).")


class RegressionConfig(CheckSeverityConfig):
    tolerance: float = Field(default=0.01, ge=0, le=1, description="nDCG@10 a store may lose against the last "
                             "passing evaluation of the source with the same settings before the check fails.")


class NdcgFloorConfig(CheckSeverityConfig):
    floor: float | None = Field(default=None, ge=0, le=1, description="Lowest acceptable nDCG@10 of any evaluated "
                                "store; unset (the default): no floor, the regression gate judges.")


class AgreementConfig(CheckSeverityConfig):
    min_fraction: float = Field(default=0.99, ge=0, le=1,
                                description="Fraction of queries whose top-10 documents FAISS and Milvus share.")


def _severity(config: CheckSeverityConfig) -> AssetCheckSeverity:
    return AssetCheckSeverity.ERROR if config.fail_run else AssetCheckSeverity.WARN


def _results(store: FileStore, ref: FileRef) -> pa.Table:
    return store.read_table(store.check(ref))


@asset_check(asset=retrieval_eval, blocking=True, partitions_def=judged_sources_partitions,
             **memory_class("light"),
             description="nDCG@10 of every evaluated store has not dropped more than `tolerance` (0.01) below the "
                         "last passing evaluation of the same source with the same model, chunking, index settings "
                         "and evaluation config; names both figures and the queries that got worse. The first "
                         "evaluation with new settings passes and becomes the baseline.")
@fail_fast_unless_transient
def ndcg_at_10_no_regression(context: AssetCheckExecutionContext, config: RegressionConfig, retrieval_eval: FileRef,
                             store: FileStore) -> AssetCheckResult:
    partition = context.partition_key
    now = Evaluation(per_query_ndcg(_results(store, retrieval_eval)), context.run.run_id, time.time())
    key = settings_key(store.cache_get(EVAL_SETTINGS, partition, retrieval_eval.sha256) or {})
    found = store.cache_get(BASELINES, partition, key)
    baseline = Evaluation.from_json(found) if found else None
    verdict = judge(now, baseline, config.tolerance, partition)
    if verdict.passed:  # the last passing evaluation is what the next one is compared with
        store.cache_put(BASELINES, partition, key, now.to_json())
    metadata = {"tolerance": config.tolerance, "settings_key": key,
                **{f"{s}_ndcg@10": MetadataValue.float(round(now.mean(s), 6)) for s in now.per_query}}
    if baseline is not None:
        metadata.update({"baseline_run_id": MetadataValue.dagster_run(baseline.run_id),
                         "baseline_made_at": MetadataValue.timestamp(baseline.made_at),
                         **{f"baseline_{s}_ndcg@10": MetadataValue.float(round(baseline.mean(s), 6))
                            for s in baseline.per_query},
                         "queries_worse": len(verdict.worse),
                         "worse_queries": MetadataValue.json(verdict.worse[:20])})
    return AssetCheckResult(passed=verdict.passed, severity=_severity(config), description=verdict.description,
                            metadata=metadata)


@asset_check(asset=retrieval_eval, blocking=True, partitions_def=judged_sources_partitions,
             **memory_class("light"),
             description="nDCG@10 of every evaluated store is at or above `floor`, when one is set (no floor by "
                         "default: datasets differ too much for one).")
@fail_fast_unless_transient
def ndcg_at_10_above_floor(config: NdcgFloorConfig, retrieval_eval: FileRef, store: FileStore) -> AssetCheckResult:
    means = _store_means(_results(store, retrieval_eval))
    figures = ", ".join(f"{s} {m['ndcg@10']:.5f}" for s, m in means.items())
    metadata = {**({"floor": config.floor} if config.floor is not None else {}),
                **{f"{s}_ndcg@10": m["ndcg@10"] for s, m in means.items()}}
    if config.floor is None:
        return AssetCheckResult(passed=True, severity=_severity(config), metadata=metadata,
                                description=f"no floor set (nDCG@10 {figures}); set this check's `floor`, or "
                                            "`quiver eval --ndcg-floor`, for one")
    low = {s: round(m["ndcg@10"], 5) for s, m in means.items() if m["ndcg@10"] < config.floor}
    description = (f"nDCG@10 below the floor {config.floor}: {low}" if low else
                   f"nDCG@10 at or above {config.floor}: {figures}")
    return AssetCheckResult(passed=not low, severity=_severity(config), description=description, metadata=metadata)


@asset_check(asset=retrieval_eval, blocking=True, partitions_def=judged_sources_partitions,
             **memory_class("light"),
             description="FAISS and Milvus return the same top-10 documents for (nearly) every query.")
@fail_fast_unless_transient
def faiss_and_milvus_agree(config: AgreementConfig, retrieval_eval: FileRef, store: FileStore) -> AssetCheckResult:
    table = _results(store, retrieval_eval)
    top = {(s, q): set(t) for s, q, t in zip(*(table.column(c).to_pylist() for c in ("store", "query_id", "top10")),
                                             strict=True)}
    queries = sorted({q for s, q in top if s == "faiss"} & {q for s, q in top if s == "milvus"})
    if not queries:
        return AssetCheckResult(passed=True, severity=_severity(config),
                                description="only one store was evaluated: nothing to compare")
    differing = [q for q in queries if top[("faiss", q)] != top[("milvus", q)]]
    fraction = 1 - len(differing) / len(queries)
    return AssetCheckResult(
        passed=fraction >= config.min_fraction, severity=_severity(config),
        description=f"same top-10 for {fraction:.2%} of {len(queries)} queries (at least {config.min_fraction:.0%} "
                    f"wanted)",
        metadata={"agreement": fraction, "queries": len(queries), "differing": len(differing),
                  "differing_examples": MetadataValue.json(differing[:20])})


@asset_check(asset=retrieval_eval, blocking=True, partitions_def=judged_sources_partitions,
             **memory_class("light"),
             description="No query returns a document id that is not in the source's corpus.")
@fail_fast_unless_transient
def results_are_corpus_documents(config: CheckSeverityConfig, retrieval_eval: FileRef,
                                 store: FileStore) -> AssetCheckResult:
    table = _results(store, retrieval_eval)
    unknown: dict[str, set[str]] = {}
    for store_name, ids in zip(table.column("store").to_pylist(), table.column("unknown_doc_ids").to_pylist(),
                               strict=True):
        unknown.setdefault(store_name, set()).update(ids)
    bad = {s: sorted(ids) for s, ids in unknown.items() if ids}
    return AssetCheckResult(
        passed=not bad, severity=_severity(config),
        description=("results outside the corpus: " + "; ".join(f"{s}: {len(v)} ids, e.g. {v[:3]}"
                                                                for s, v in bad.items()))
        if bad else "every result is a document of the corpus",
        metadata={f"{s}_unknown_doc_ids": len(v) for s, v in unknown.items()})
