"""The retrieval evaluation's regression gate: a source's nDCG@10 against its last passing evaluation.

An absolute floor fails every dataset whose nDCG@10 is naturally low (BEIR NFCorpus scores 0.316 with the
published model), so the gate a user needs by default compares like with like: the same source evaluated with
the same model, chunking, index settings and evaluation config, whose last evaluation passed. It fails when a
store's nDCG@10 dropped more than a tolerance below that one, and names both figures and the queries that got
worse.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from quiver.hashing import sha256_json
from quiver.report import run_text, when_text


def settings_key(settings: Mapping[str, Any]) -> str:
    """What makes two evaluations comparable: equal settings (model, chunking, indexes, config), equal key."""
    return sha256_json(dict(settings))[:24]


@dataclass
class Evaluation:
    """One evaluation's nDCG@10: per store, the mean and each judged query's."""

    per_query: dict[str, dict[str, float]]  # store -> query id -> nDCG@10
    run_id: str = ""
    made_at: float = 0.0

    def mean(self, store: str) -> float:
        scores = self.per_query[store]
        return sum(scores.values()) / len(scores) if scores else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "made_at": self.made_at, "per_query": self.per_query,
                "ndcg@10": {s: round(self.mean(s), 6) for s in self.per_query}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Evaluation":
        return cls({s: dict(q) for s, q in data["per_query"].items()}, str(data.get("run_id", "")),
                   float(data.get("made_at", 0.0)))


@dataclass
class Verdict:
    passed: bool
    description: str
    baseline: Evaluation | None
    drops: dict[str, float] = field(default_factory=dict)  # store -> nDCG@10 lost since the baseline
    worse: list[dict[str, Any]] = field(default_factory=list)  # queries that got worse, biggest drop first


def worse_queries(baseline: Evaluation, now: Evaluation, limit: int = 10) -> list[dict[str, Any]]:
    """The queries whose nDCG@10 dropped since the baseline, biggest drop first, in every store both have."""
    found = []
    for store, scores in now.per_query.items():
        before = baseline.per_query.get(store, {})
        for query, value in scores.items():
            old = before.get(query)
            if old is not None and value < old - 1e-9:
                found.append({"store": store, "query_id": query, "ndcg@10_before": round(old, 4),
                              "ndcg@10_now": round(value, 4)})
    found.sort(key=lambda d: (d["ndcg@10_now"] - d["ndcg@10_before"], d["store"], d["query_id"]))
    return found[:limit] if limit else found


def judge(now: Evaluation, baseline: Evaluation | None, tolerance: float, source: str) -> Verdict:
    """Passes unless a store's nDCG@10 is more than `tolerance` below the baseline's; the first evaluation with
    these settings passes and becomes the baseline."""
    figures = ", ".join(f"{s} {now.mean(s):.5f}" for s in now.per_query)
    if baseline is None:
        return Verdict(True, f"first evaluation of {source!r} with these settings: nDCG@10 {figures} is the "
                             "baseline later evaluations are compared with", None)
    shared = [s for s in now.per_query if s in baseline.per_query]
    drops = {s: round(baseline.mean(s) - now.mean(s), 6) for s in shared}
    failing = {s: d for s, d in drops.items() if d > tolerance + 1e-12}
    worse = worse_queries(baseline, now, limit=0)
    since = f"the last passing evaluation ({run_text(baseline.run_id).replace('`', '')}, {when_text(baseline.made_at)})"
    if failing:
        moves = "; ".join(f"{s} {baseline.mean(s):.5f} -> {now.mean(s):.5f} (-{d:.5f})" for s, d in failing.items())
        examples = ", ".join(f"{w['query_id']} ({w['store']} {w['ndcg@10_before']:.2f} -> {w['ndcg@10_now']:.2f})"
                             for w in worse[:5])
        return Verdict(False, f"nDCG@10 dropped more than {tolerance} below {since}: {moves}; {len(worse)} "
                              f"queries got worse: {examples}", baseline, drops, worse)
    return Verdict(True, f"nDCG@10 {figures}: within {tolerance} of {since} ("
                         + ", ".join(f"{s} {baseline.mean(s):.5f}" for s in shared) + f"); {len(worse)} queries "
                         "got worse", baseline, drops, worse)
