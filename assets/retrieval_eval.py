"""Stage 5: retrieval quality of the FAISS index and the Milvus collection, on a BEIR-format source.

The source's judged queries are encoded with the model pool and searched in both stores, among the
source's own vectors; documents are ranked by their chunks (max by default) and nDCG@10, Recall@100
and MRR@10 computed with ir_measures. The per-query scores are a small Parquet (a FileRef), so two
materializations can be compared query by query; the metadata holds a table per store and the
queries that got worse since the previous materialization. Asset checks gate on a nDCG floor, on the
two stores agreeing, and on every result being a document of the corpus.
"""

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from dagster import (
    AssetExecutionContext,
    AssetIn,
    Config,
    DataVersion,
    IdentityPartitionMapping,
    MetadataValue,
    Output,
    TableColumn,
    TableRecord,
    TableSchema,
    asset,
)
from pydantic import Field

from assets.common import (
    OWNERS,
    STORAGE_KIND,
    fail_fast_unless_transient,
    judged_sources_partitions,
    memory_class,
    run_metadata,
)
from assets.faiss_index import faiss_index
from assets.milvus_collection import milvus_collection
from quiver.beir import RelevanceData, has_relevance_data, read_relevance_data
from quiver.errors import FileRefError
from quiver.report import summary_markdown
from quiver.retrieval import (
    Aggregation,
    ChunkSearch,
    Ranking,
    mean_metrics,
    query_metrics,
    relevant_ranks,
    search_documents,
    top_k_agreement,
)
from quiver.tables import markdown
from resources.faiss_store import FaissStore
from resources.fileref import FileRef, FileStore
from resources.milvus_store import MilvusStore
from resources.model_pool import ModelPool
from resources.sources import SourceRegistry

STORES = ("faiss", "milvus")
EVAL_SETTINGS = ["_eval_settings"]  # the settings of each evaluation, by its results' hash (FileStore cache)
COLUMN_OF = {"ndcg@10": "ndcg_at_10", "recall@100": "recall_at_100", "mrr@10": "mrr_at_10"}
RESULTS_SCHEMA = pa.schema([
    ("store", pa.string()),
    ("query_id", pa.string()),
    *((column, pa.float64()) for column in COLUMN_OF.values()),
    ("relevant", pa.int32()),
    ("relevant_ranks", pa.list_(pa.int32())),  # where the relevant documents were retrieved (1-based)
    ("top10", pa.list_(pa.string())),
    ("unknown_doc_ids", pa.list_(pa.string())),  # retrieved ids that are no document of the corpus
])


class RetrievalEvalConfig(Config):
    stores: Literal["both", "faiss", "milvus"] = Field(default="both", description="Stores to evaluate.")
    aggregation: Literal["max", "sum", "mean"] = Field(
        default="max", description="How a document's score comes from its retrieved chunks.")
    depth: int = Field(default=100, ge=10, description="Documents retrieved per query (Recall@100 needs 100).")
    split: str = Field(default="test", description="Which qrels/<split>.tsv holds the judgments.")
    query_batch_size: int = Field(default=256, ge=1)


@dataclass
class StoreEvaluation:
    store: str
    rankings: dict[str, Ranking]
    per_query: dict[str, dict[str, float]]
    search_seconds: float

    def means(self) -> dict[str, float]:
        return mean_metrics(self.per_query)


def store_searches(partition: str, stores: list[str], faiss_store: FaissStore,
                   milvus: MilvusStore) -> dict[str, tuple[ChunkSearch, int, str]]:
    """For each store: a chunk search among the source's vectors, how many there are, and the index type."""
    found: dict[str, tuple[ChunkSearch, int, str]] = {}
    if "faiss" in stores:
        version = faiss_store.open_current()

        def faiss_search(queries: np.ndarray, k: int) -> list[Ranking]:
            return [[(h.doc_id, h.score) for h in hits]
                    for hits in version.search(queries, k, source=partition, fields=("doc_id",))]

        found["faiss"] = (faiss_search, len(version.ids_of_source(partition)), version.manifest["index_type"])
    if "milvus" in stores:
        def milvus_search(queries: np.ndarray, k: int) -> list[Ranking]:
            return [[(h.doc_id, h.score) for h in hits]
                    for hits in milvus.search(queries, k, source=partition, fields=("doc_id",))]

        count = milvus.count(source=partition) if milvus.exists() else 0
        found["milvus"] = (milvus_search, count, milvus.index_type)
    return found


def evaluate_stores(relevance: RelevanceData, query_vectors: np.ndarray,
                    searches: dict[str, tuple[ChunkSearch, int, str]], depth: int, aggregation: Aggregation,
                    batch_size: int) -> dict[str, StoreEvaluation]:
    query_ids = list(relevance.queries)
    results = {}
    for store, (search, chunks, _) in searches.items():
        started = time.perf_counter()
        rankings: list[Ranking] = []
        for start in range(0, len(query_ids), batch_size):
            rankings += search_documents(search, query_vectors[start:start + batch_size], depth, chunks, aggregation)
        seconds = time.perf_counter() - started
        by_query = dict(zip(query_ids, rankings, strict=True))
        results[store] = StoreEvaluation(store, by_query, query_metrics(relevance.qrels, by_query), seconds)
    return results


def results_table(evaluations: dict[str, StoreEvaluation], relevance: RelevanceData,
                  corpus_ids: set[str]) -> pa.Table:
    rows = []
    for store, evaluation in evaluations.items():
        for query_id, ranking in evaluation.rankings.items():
            relevant = relevance.qrels[query_id]
            rows.append({
                "store": store, "query_id": query_id,
                **{COLUMN_OF[name]: value for name, value in evaluation.per_query[query_id].items()},
                "relevant": sum(1 for r in relevant.values() if r > 0),
                "relevant_ranks": relevant_ranks(ranking, relevant),
                "top10": [doc for doc, _ in ranking[:10]],
                "unknown_doc_ids": sorted({doc for doc, _ in ranking if doc not in corpus_ids}),
            })
    return pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA)


def previous_results(store: FileStore, partition: str) -> pa.Table | None:
    """The last materialization's per-query scores, if its file is still there and intact."""
    ref = store.read_latest(["retrieval_eval"], partition)
    try:
        return store.read_table(store.check(ref)) if ref else None
    except FileRefError:
        return None


def worse_than_before(before: pa.Table | None, now: pa.Table, limit: int = 20) -> list[dict[str, Any]]:
    """Queries whose nDCG@10 dropped since the previous materialization, biggest drop first."""
    if before is None:
        return []
    previous = {(s, q): v for s, q, v in zip(*(before.column(c).to_pylist() for c in ("store", "query_id",
                                                                                         "ndcg_at_10")), strict=True)}
    drops = []
    for store, query_id, value in zip(*(now.column(c).to_pylist() for c in ("store", "query_id", "ndcg_at_10")),
                                      strict=True):
        old = previous.get((store, query_id))
        if old is not None and value < old - 1e-9:
            drops.append({"store": store, "query_id": query_id, "ndcg@10_before": round(old, 4),
                          "ndcg@10_now": round(value, 4)})
    drops.sort(key=lambda d: d["ndcg@10_now"] - d["ndcg@10_before"])
    return drops[:limit] if limit else drops


def results_markdown(evaluations: dict[str, StoreEvaluation], queries: int) -> str:
    rows = []
    for store, evaluation in evaluations.items():
        means = evaluation.means()
        rows.append([store, f"{means['ndcg@10']:.5f}", f"{means['recall@100']:.5f}", f"{means['mrr@10']:.5f}",
                     queries])
    return markdown(["store", "nDCG@10", "Recall@100", "MRR@10", "queries"], rows)


def _table_metadata(evaluations: dict[str, StoreEvaluation], queries: int) -> MetadataValue:
    schema = TableSchema(columns=[TableColumn("store", "string"), TableColumn("nDCG@10", "float"),
                                  TableColumn("Recall@100", "float"), TableColumn("MRR@10", "float"),
                                  TableColumn("queries", "int")])
    records = []
    for store, evaluation in evaluations.items():
        means = evaluation.means()
        records.append(TableRecord({"store": store, "nDCG@10": round(means["ndcg@10"], 5),
                                    "Recall@100": round(means["recall@100"], 5), "MRR@10": round(means["mrr@10"], 5),
                                    "queries": queries}))
    return MetadataValue.table(records=records, schema=schema)


@asset(
    partitions_def=judged_sources_partitions,
    ins={"documents": AssetIn(partition_mapping=IdentityPartitionMapping())},
    deps=[faiss_index, milvus_collection],
    io_manager_key="fileref_io_manager",
    output_required=False,
    group_name="evaluation",
    kinds={"python", "parquet"},
    owners=OWNERS,
    tags={STORAGE_KIND: "parquet"},
    **memory_class("model"),
    description="nDCG@10, Recall@100 and MRR@10 of the FAISS index and the Milvus collection on a BEIR source's "
                "judged queries; per-query scores as Parquet. Its partitions are the sources with queries.jsonl and "
                "qrels/ (`quiver source add` and `quiver eval` add them), so a source that cannot be evaluated is "
                "not shown missing. The blocking check `ndcg_at_10_no_regression` fails when nDCG@10 drops more than "
                "its tolerance below the last passing evaluation with the same settings; `ndcg_at_10_above_floor` "
                "judges only when a floor is set.",
)
@fail_fast_unless_transient
def retrieval_eval(
    context: AssetExecutionContext, config: RetrievalEvalConfig, documents: FileRef, store: FileStore,
    sources: SourceRegistry, model_pool: ModelPool, faiss_store: FaissStore, milvus: MilvusStore,
) -> Iterator[Output[FileRef]]:
    started = time.perf_counter()
    partition = context.partition_key
    spec = sources.get(partition)
    if not has_relevance_data(spec.path, config.split):
        context.log.info(f"retrieval_eval[{partition}]: skipped, {spec.path} has no queries.jsonl and "
                         f"qrels/{config.split}.tsv (evaluation needs a BEIR-format source)")
        return
    relevance = read_relevance_data(spec.path, config.split)
    corpus_ids = set(store.read_table(documents, columns=["doc_id"]).column("doc_id").to_pylist())
    encode_started = time.perf_counter()
    query_vectors = model_pool.encode(list(relevance.queries.values()))
    encode_seconds = time.perf_counter() - encode_started
    searches = store_searches(partition, list(STORES) if config.stores == "both" else [config.stores], faiss_store,
                              milvus)
    evaluations = evaluate_stores(relevance, query_vectors, searches, config.depth, config.aggregation,
                                  config.query_batch_size)
    table = results_table(evaluations, relevance, corpus_ids)
    before = previous_results(store, partition)
    with store.parquet_writer(["retrieval_eval"], partition, RESULTS_SCHEMA) as writer:
        writer.write_batch(table)
    assert writer.ref is not None
    drops = worse_than_before(before, table, limit=0)
    n = len(relevance.queries)
    settings = evaluation_settings(config, spec.chunking, model_pool, faiss_store, milvus, sorted(evaluations))
    # what the checks compare an evaluation with: evaluations with equal settings
    store.cache_put(EVAL_SETTINGS, partition, writer.ref.sha256, settings)
    metadata: dict[str, Any] = {
        "summary": MetadataValue.md(summary_markdown(
            f"Evaluated {n} queries of {partition}: nDCG@10 " + ", ".join(
                f"{s} {e.means()['ndcg@10']:.5f}" for s, e in evaluations.items()),
            [f"{s} ({searches[s][2]}): Recall@100 {e.means()['recall@100']:.5f}, MRR@10 {e.means()['mrr@10']:.5f}"
             for s, e in evaluations.items()] + [f"{len(drops)} queries worse than the previous evaluation"])),
        "results": _table_metadata(evaluations, n),
        "results_markdown": MetadataValue.md(results_markdown(evaluations, n)),
        "queries": n, "judgments": sum(len(d) for d in relevance.qrels.values()), "corpus_documents": len(corpus_ids),
        "split": config.split, "chunking": spec.chunking, "aggregation": config.aggregation, "depth": config.depth,
        "query_encode_seconds": round(encode_seconds, 3),
        "queries_worse_than_previous": len(drops),
        "worse_than_previous_examples": MetadataValue.json(drops[:20]),
    }
    for name, evaluation in evaluations.items():
        means = evaluation.means()
        metadata.update({f"{name}_{metric}": MetadataValue.float(round(value, 6)) for metric, value in means.items()})
        metadata[f"{name}_index_type"] = searches[name][2]
        metadata[f"{name}_chunks_searched"] = searches[name][1]
        metadata[f"{name}_search_seconds"] = round(evaluation.search_seconds, 3)
        metadata[f"{name}_unknown_doc_ids"] = sum(len(x) for x, s in zip(table.column("unknown_doc_ids").to_pylist(),
                                                                         table.column("store").to_pylist(),
                                                                         strict=True) if s == name)
    if {"faiss", "milvus"} <= set(evaluations):
        order = list(relevance.queries)
        metadata["faiss_milvus_top10_agreement"] = round(top_k_agreement(
            [evaluations["faiss"].rankings[q] for q in order], [evaluations["milvus"].rankings[q] for q in order]), 4)
    metadata["details"] = MetadataValue.json({"evaluation_settings": settings})
    context.log.info(f"retrieval_eval[{partition}]: {n} queries\n" + results_markdown(evaluations, n))
    yield Output(writer.ref, data_version=DataVersion(writer.ref.sha256),
                 metadata=run_metadata(started, table.num_rows, metadata))


def evaluation_settings(config: RetrievalEvalConfig, chunking: str, model_pool: ModelPool, faiss_store: FaissStore,
                        milvus: MilvusStore, stores: list[str]) -> dict[str, Any]:
    """What decides an evaluation's figures besides the corpus: the model, the chunking, each store's index as
    searched, and the evaluation's own config. Evaluations are compared only when these are equal."""
    index: dict[str, Any] = {}
    if "faiss" in stores and (version := faiss_store.current_version()):
        manifest = faiss_store.manifest(version)
        index["faiss"] = manifest.get("details") or {"type": manifest["index_type"], **manifest.get("settings", {})}
    if "milvus" in stores:
        index["milvus"] = {"type": milvus.index_type, "metric": "IP"}
    return {"model": model_pool.fingerprint(), "model_name": model_pool.model, "backend": model_pool.backend,
            "chunking": chunking, "index": index, "aggregation": config.aggregation, "depth": config.depth,
            "split": config.split, "stores": stores}
