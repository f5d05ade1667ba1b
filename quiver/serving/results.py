"""Search hits as the service and `quiver search` show them: the k best chunks, or the k best documents (each
with its best chunk), with the same fields, depth and rounding as `quiver search`."""

from collections.abc import Sequence
from typing import Any

from quiver.retrieval import Aggregation, top_documents
from quiver.vectors import SearchHit


def fetch_depth(k: int, documents: bool) -> int:
    """Chunks to fetch for k results: k chunks; for documents four chunks per wanted document and at least 20,
    as `quiver search` fetches, so that the same query gives the same documents on both paths."""
    return max(k * 4, 20) if documents else k


def document_key(hit: SearchHit) -> str:
    return f"{hit.source}\x00{hit.doc_id}"


def hit_row(rank: int, hit: SearchHit, score: float) -> dict[str, Any]:
    return {"rank": rank, "score": round(score, 4), "doc_id": hit.doc_id, "source": hit.source, "title": hit.title,
            "chunk_id": hit.chunk_id, "snippet": hit.snippet()}


def chunk_results(hits: Sequence[SearchHit], k: int) -> list[dict[str, Any]]:
    """The k best chunks, best first."""
    return [hit_row(rank, hit, hit.score) for rank, hit in enumerate(hits[:k], start=1)]


def document_results(hits: Sequence[SearchHit], k: int, aggregation: Aggregation = "max") -> list[dict[str, Any]]:
    """The k best documents among chunk hits, each shown by its best chunk, scored by the aggregation of its
    chunks' scores (`quiver.retrieval.top_documents`, what `quiver search` and retrieval_eval rank by)."""
    ranked = top_documents(hits, k, document=document_key, score=lambda h: h.score, aggregation=aggregation)
    return [hit_row(rank, hit, score) for rank, (hit, score) in enumerate(ranked, start=1)]
