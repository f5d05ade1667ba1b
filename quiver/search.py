"""What a search request must be before a model or an index is touched, and how deep a search reads: the rules
the command line and a server share, so both refuse the same nonsense with the same words."""

from dataclasses import dataclass

from quiver.errors import QuiverError

DEFAULT_K = 5


class SearchRequestError(QuiverError):
    """A search request that cannot be answered as asked (a server answers it with 400)."""


@dataclass(frozen=True)
class SearchRequest:
    query: str
    k: int


def validate_search(query: object, k: object) -> SearchRequest:
    """The request when it makes sense; SearchRequestError saying what to give instead when it does not: an empty
    or blank query, k below 1 (0 and -1 used to return 20 results), k that is no whole number."""
    if not isinstance(query, str) or not query.strip():
        raise SearchRequestError('the query is empty: give the text to search for, e.g. quiver search "how do I '
                                 'parse json"')
    if isinstance(k, bool) or not isinstance(k, int):
        raise SearchRequestError(f"k must be a whole number of results, not {k!r}")
    if k < 1:
        raise SearchRequestError(f"k must be at least 1 (got {k}): it is how many documents to return")
    return SearchRequest(query, k)


def chunks_to_fetch(k: int, held: int) -> int:
    """Chunks to read for k documents: four per document (a document has several chunks), at least 20, never
    more than the index holds."""
    return min(max(k * 4, 20), held)


def capped_note(k: int, found: int, held: int, store: str) -> str | None:
    """What to tell the user when fewer documents than asked come back because the whole index was read: k is
    capped at what the index holds, and said so (k=100000 used to return every document silently)."""
    if found >= k:
        return None
    return (f"asked for {k:,} results, but the {store} index holds {found:,} documents ({held:,} vectors): "
            f"showing all {found:,}")
