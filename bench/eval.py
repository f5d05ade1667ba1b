"""Retrieval quality on BEIR SciFact, next to the published figures for all-MiniLM-L6-v2 (MTEB paper:
nDCG@10 0.64508, Recall@100 0.925, exact cosine search over title + " " + text, 256 tokens).

For whole-document and chunked modes, and for each FAISS index type (flat = exact, IVF, HNSW): nDCG@10,
Recall@100, MRR@10 (from the retrieval_eval asset's code), recall of the exact top-10 / top-100 documents,
indexing time, and query latency (median and p95 over single queries, with and without the query
embedding; with --repeats N, N passes over the queries and the median of the passes' figures). Milvus
(FLAT) is evaluated beside exact FAISS. The IVF list count is the built index's own nlist.

    python bench/eval.py [--dataset PATH] [--repeats 1]
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import fresh_home, print_table, write_results  # noqa: E402

DATASETS = Path(os.environ.get("QUIVER_DATASETS") or Path(__file__).resolve().parents[2] / "shared" / "datasets")
PUBLISHED = {"ndcg@10": 0.64508, "recall@100": 0.925}
TOLERANCE = 0.005
INDEX_TYPES = ("flat", "ivf", "hnsw")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def materialize(res: dict[str, Any], instance: Any, assets: list[str], partition: str | None = None,
                config: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    from dagster import materialize as run

    from platform_defs.definitions import ALL_ASSETS, ALL_CHECKS

    result = run([*ALL_ASSETS, *ALL_CHECKS], instance=instance, resources=res, selection=assets,
                 partition_key=partition, run_config=config or {})
    return {e.materialization.asset_key.to_user_string(): {k: v.value for k, v in e.materialization.metadata.items()}
            for e in result.get_asset_materialization_events()}


def latency_pass(search: Any, pool: Any, queries: list[str], vectors: np.ndarray, depth: int,
                 chunks: int) -> dict[str, float]:
    """Milliseconds per single query, searched alone: without and with encoding the query."""
    from quiver.retrieval import search_documents

    search_only, with_embedding = [], []
    for text, vector in zip(queries, vectors, strict=True):
        started = time.perf_counter()
        search_documents(search, vector[None, :], depth, chunks)
        search_only.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        search_documents(search, pool.encode([text]), depth, chunks)
        with_embedding.append((time.perf_counter() - started) * 1000)
    return {"search_ms_median": statistics.median(search_only), "search_ms_p95": percentile(search_only, 95),
            "embed_search_ms_median": statistics.median(with_embedding),
            "embed_search_ms_p95": percentile(with_embedding, 95)}


def latencies(search: Any, pool: Any, queries: list[str], vectors: np.ndarray, depth: int, chunks: int,
              repeats: int) -> dict[str, Any]:
    """`repeats` passes over the queries: each figure is the median of the passes', every pass is kept."""
    passes = [latency_pass(search, pool, queries, vectors, depth, chunks) for _ in range(repeats)]
    return {**{k: statistics.median([p[k] for p in passes]) for k in passes[0]}, "latency_passes": passes}


def ivf_lists(faiss_store: Any) -> dict[str, int | None]:
    """The current FAISS version's own IVF list count and probes (None for other index types)."""
    import faiss

    index = faiss_store.read_index(faiss_store.current_version())
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index
        return {"ivf_nlist": None, "ivf_nprobe": None}
    return {"ivf_nlist": int(ivf.nlist), "ivf_nprobe": int(ivf.nprobe)}


def evaluate_mode(res: dict[str, Any], instance: Any, name: str, path: str, chunking: str,
                  args: argparse.Namespace) -> list[dict[str, Any]]:
    from assets.retrieval_eval import RetrievalEvalConfig, evaluate_stores, store_searches
    from quiver.beir import read_relevance_data
    from quiver.retrieval import mean_metrics, recall_against
    from resources.faiss_store import FaissStore

    res["sources"].add(name, path, "beir", chunking)
    instance.add_dynamic_partitions("sources", [name])
    started = time.perf_counter()
    ingested = materialize(res, instance, ["documents", "chunks", "embeddings"], name)
    embed_s = time.perf_counter() - started
    chunks_meta = ingested["chunks"]
    relevance = read_relevance_data(path)
    pool = res["model_pool"]
    texts = list(relevance.queries.values())
    vectors = pool.encode(texts)
    rows, exact = [], None
    for index_type in INDEX_TYPES:
        res["faiss_store"] = FaissStore(index_type=index_type)
        meta = materialize(res, instance, ["faiss_index", "milvus_collection"])
        lists = ivf_lists(res["faiss_store"])
        stores = ["faiss", "milvus"] if index_type == "flat" else ["faiss"]
        # The headline figures come from the evaluation asset itself.
        evaluated = materialize(res, instance, ["retrieval_eval"], name, {"ops": {"retrieval_eval": {"config": {
            "stores": "both" if index_type == "flat" else "faiss"}}}})["retrieval_eval"]
        searches = store_searches(name, stores, res["faiss_store"], res["milvus"])
        rankings = evaluate_stores(relevance, vectors, searches, 100, "max", RetrievalEvalConfig().query_batch_size)
        for store in stores:
            means = mean_metrics(rankings[store].per_query)
            assert abs(means["ndcg@10"] - evaluated[f"{store}_ndcg@10"]) < 1e-6
            ranked = [rankings[store].rankings[q] for q in relevance.queries]
            if exact is None and store == "faiss":
                exact = ranked
            search, chunks, kind = searches[store]
            row = {"mode": chunking, "store": store, "index": kind, "queries": len(texts),
                   **(lists if store == "faiss" else {"ivf_nlist": None, "ivf_nprobe": None}),
                   "chunks": chunks_meta["rows"], "over_window": chunks_meta["chunks_longer_than_model_window"],
                   **means, "recall_vs_exact@10": recall_against(exact, ranked, 10),
                   "recall_vs_exact@100": recall_against(exact, ranked, 100),
                   "embed_and_insert_s": embed_s,
                   "index_build_s": meta["faiss_index"].get("build_seconds", 0.0) if store == "faiss" else None,
                   **latencies(search, pool, texts, vectors, 100, chunks, args.repeats)}
            rows.append(row)
            print(f"{chunking} {store} {kind}: nDCG@10 {means['ndcg@10']:.5f} R@100 {means['recall@100']:.5f} "
                  f"MRR@10 {means['mrr@10']:.5f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(DATASETS / "scifact"))
    parser.add_argument("--repeats", type=int, default=1, help="latency passes over the queries (medians)")
    args = parser.parse_args()
    fresh_home("quiver-bench-eval-")
    from dagster import DagsterInstance

    from platform_defs.resources import build_resources

    res = build_resources(resolve_env=True)
    instance = DagsterInstance.get()
    rows = evaluate_mode(res, instance, "scifact-whole", args.dataset, "whole_document", args)
    rows += evaluate_mode(res, instance, "scifact", args.dataset, "tokens", args)

    def verdict(row: dict[str, Any]) -> str:
        if row["mode"] != "whole_document" or row["index"] not in ("flat", "FLAT"):
            return ""
        ok = all(abs(row[m] - PUBLISHED[m]) <= TOLERANCE for m in PUBLISHED)
        return "yes" if ok else "NO"

    table_rows = [["published (MTEB)", "", "exact", f"{PUBLISHED['ndcg@10']:.5f}", f"{PUBLISHED['recall@100']:.3f}",
                   "", "", "", "", "", "", ""]]
    for r in rows:
        index = r["index"] if r["ivf_nlist"] is None else f"{r['index']} ({r['ivf_nprobe']} of {r['ivf_nlist']} lists)"
        table_rows.append([r["mode"], r["store"], index, f"{r['ndcg@10']:.5f}", f"{r['recall@100']:.5f}",
                           f"{r['mrr@10']:.5f}", f"{r['recall_vs_exact@10']:.3f} / {r['recall_vs_exact@100']:.3f}",
                           f"{r['embed_and_insert_s']:.0f}", "" if r["index_build_s"] is None
                           else f"{r['index_build_s']:.2f}",
                           f"{r['search_ms_median']:.2f} / {r['search_ms_p95']:.2f}",
                           f"{r['embed_search_ms_median']:.1f} / {r['embed_search_ms_p95']:.1f}", verdict(r)])
    table = print_table(
        f"SciFact ({rows[0]['queries']} test queries), all-MiniLM-L6-v2; whole_document: {rows[0]['chunks']} documents "
        f"({rows[0]['over_window']} longer than the model's 256 tokens, truncated by it); tokens: "
        f"{rows[-1]['chunks']} chunks; latencies: medians of {args.repeats} pass(es)",
        ["mode", "store", "index", "nDCG@10", "Recall@100", "MRR@10", "recall of exact top-10 / top-100",
         "embed+insert s", "index build s", "search ms median / p95", "embed+search ms median / p95",
         "within ±0.005 of published"], table_rows)
    write_results("eval", {"args": vars(args), "published": PUBLISHED, "tolerance": TOLERANCE, "rows": rows,
                           "table": table})


if __name__ == "__main__":
    main()
