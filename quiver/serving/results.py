"""Search hits as the service and `quiver search` show them: the k best chunks, or the k best documents (each
with its best chunk), with the same fields, depth and rounding as `quiver search`."""

from collections.abc import Sequence
from typing import Any

from quiver.retrieval import Aggregation, top_documents
from quiver.vectors import HIT_FIELDS, SearchHit


def fetch_depth(k: int, documents: bool) -> int:
    """Chunks to fetch for k results: k chunks; for documents four chunks per wanted document and at least 20,
    as `quiver search` fetches, so that the same query gives the same documents on both paths."""
    return max(k * 4, 20) if documents else k


def document_key(hit: SearchHit) -> str:
    return f"{hit.source}\x00{hit.doc_id}"


def hit_row(rank: int, hit: SearchHit, score: float) -> dict[str, Any]:
    return {"rank": rank, "score": round(score, 4), "doc_id": hit.doc_id, "source": hit.source, "title": hit.title,
            "chunk_id": hit.chunk_id, "snippet": hit.snippet()}


Picked = list[tuple[SearchHit, float]]  # the hits shown, best first, each with the score shown
RANK_FIELDS = ("doc_id", "source")  # what ranking reads of a hit; the shown hits' other fields are read after
SHOWN_FIELDS = tuple(f for f in HIT_FIELDS if f not in RANK_FIELDS)


def pick(hits: Sequence[SearchHit], k: int, documents: bool, aggregation: Aggregation = "max") -> Picked:
    """The k best chunks, or the k best documents among chunk hits, each shown by its best chunk and scored by
    the aggregation of its chunks' scores (`quiver.retrieval.top_documents`, what `quiver search` and
    retrieval_eval rank by); best first."""
    if not documents:
        return [(hit, hit.score) for hit in hits[:k]]
    return top_documents(hits, k, document=document_key, score=lambda h: h.score, aggregation=aggregation)


def result_rows(picked: Picked) -> list[dict[str, Any]]:
    return [hit_row(rank, hit, score) for rank, (hit, score) in enumerate(picked, start=1)]
