"""From chunk hits to ranked documents, and retrieval quality per query.

Metrics come from ir_measures, whose provider here is pytrec_eval: the same trec_eval code BEIR and
MTEB report with, so the figures are comparable with theirs.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Literal, TypeVar

import ir_measures
import numpy as np
from ir_measures import RR, R, nDCG

Aggregation = Literal["max", "sum", "mean"]
# Name in our metadata and Parquet -> the measure.
MEASURES = {"ndcg@10": nDCG @ 10, "recall@100": R @ 100, "mrr@10": RR @ 10}
Ranking = list[tuple[str, float]]  # (document id, score), best first
# (queries, k) -> for each query, its k best chunks as (document id, score), best first
ChunkSearch = Callable[[np.ndarray, int], list[Ranking]]
Hit = TypeVar("Hit")


def rank_documents(chunk_hits: Sequence[tuple[str, float]], aggregation: Aggregation = "max") -> Ranking:
    """Documents ranked by the scores of their retrieved chunks.

    max: a document is as good as its best chunk (exact once enough chunks are fetched); sum and mean
    are over the chunks retrieved, rewarding documents that match in several places.
    """
    scores: dict[str, list[float]] = {}
    for doc_id, score in chunk_hits:
        scores.setdefault(doc_id, []).append(score)
    if aggregation == "max":
        combined = {d: max(s) for d, s in scores.items()}
    elif aggregation == "sum":
        combined = {d: float(sum(s)) for d, s in scores.items()}
    elif aggregation == "mean":
        combined = {d: float(sum(s)) / len(s) for d, s in scores.items()}
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}: use max, sum or mean")
    return sorted(combined.items(), key=lambda item: (-item[1], item[0]))


def top_documents(hits: Sequence[Hit], k: int, document: Callable[[Hit], str], score: Callable[[Hit], float],
                  aggregation: Aggregation = "max") -> list[tuple[Hit, float]]:
    """The k best documents among chunk hits (best first), each with its best chunk and the document's score
    (`rank_documents`' aggregation); documents of equal score keep the order the store returned them in."""
    best: dict[str, Hit] = {}
    for hit in hits:
        if document(hit) not in best or score(hit) > score(best[document(hit)]):
            best[document(hit)] = hit
    scores = dict(rank_documents([(document(h), score(h)) for h in hits], aggregation))
    first_seen = {doc: position for position, doc in enumerate(dict.fromkeys(document(h) for h in hits))}
    ranked = sorted(scores, key=lambda doc: (-scores[doc], first_seen[doc]))
    return [(best[doc], scores[doc]) for doc in ranked[:k]]


def search_documents(search: ChunkSearch, queries: np.ndarray, depth: int, chunks_in_index: int,
                     aggregation: Aggregation = "max") -> list[Ranking]:
    """The best `depth` documents for each query.

    Chunks are fetched four per wanted document; a query whose chunks fell on fewer than `depth`
    documents is asked again with twice as many, until the index has no more to give.
    """
    results: list[Ranking] = [[] for _ in range(len(queries))]
    if chunks_in_index == 0 or len(queries) == 0:
        return results
    k = min(max(depth * 4, depth), chunks_in_index)
    pending = list(range(len(queries)))
    while pending:
        hits = search(queries[pending], k)
        still = []
        for i, chunk_hits in zip(pending, hits, strict=True):
            ranked = rank_documents(chunk_hits, aggregation)
            if len(ranked) >= depth or len(chunk_hits) < k or k >= chunks_in_index:
                results[i] = ranked[:depth]
            else:
                still.append(i)
        pending = still
        k = min(k * 2, chunks_in_index)
    return results


def query_metrics(qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Ranking]) -> dict[str, dict[str, float]]:
    """{query id: {metric: value}} for every judged query; a query that retrieved nothing scores 0."""
    values = {query_id: dict.fromkeys(MEASURES, 0.0) for query_id in qrels}
    name_of = {measure: name for name, measure in MEASURES.items()}
    run_dict = {q: {doc: float(score) for doc, score in ranking}
                for q, ranking in run.items() if ranking and q in qrels}
    judged = {q: dict(docs) for q, docs in qrels.items()}
    for metric in ir_measures.iter_calc(list(MEASURES.values()), judged, run_dict):
        values[metric.query_id][name_of[metric.measure]] = float(metric.value)
    return values


def mean_metrics(per_query: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Each metric averaged over every judged query, as BEIR and MTEB report it."""
    if not per_query:
        return dict.fromkeys(MEASURES, 0.0)
    return {name: float(np.mean([values[name] for values in per_query.values()])) for name in MEASURES}


def relevant_ranks(ranking: Ranking, relevant: Mapping[str, int]) -> list[int]:
    """1-based ranks at which the query's relevant documents were retrieved."""
    return [rank for rank, (doc_id, _) in enumerate(ranking, start=1) if relevant.get(doc_id, 0) > 0]


def top_k_agreement(a: Sequence[Ranking], b: Sequence[Ranking], k: int = 10) -> float:
    """Fraction of queries whose top-k documents are the same set in both rankings."""
    if not a:
        return 1.0
    same = sum({d for d, _ in x[:k]} == {d for d, _ in y[:k]} for x, y in zip(a, b, strict=True))
    return same / len(a)


def recall_against(exact: Sequence[Ranking], approximate: Sequence[Ranking], k: int) -> float:
    """How much of the exact top-k an approximate search found, averaged over queries."""
    found = [len({d for d, _ in e[:k]} & {d for d, _ in x[:k]}) / max(1, min(k, len(e)))
             for e, x in zip(exact, approximate, strict=True) if e]
    return float(np.mean(found)) if found else 1.0
