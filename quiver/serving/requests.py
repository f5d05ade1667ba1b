"""What a client may ask the search service, checked before any work: every problem is a 4xx with a message
that names the field and the limit, never a 500."""

import json
from dataclasses import dataclass
from typing import Any

from quiver.errors import QuiverError
from quiver.names import RULE, SOURCE_NAME

STORES = ("faiss", "milvus")
AGGREGATIONS = ("max", "sum", "mean")
FIELDS = ("query", "queries", "k", "source", "store", "documents", "aggregation")
DEFAULT_K = 5  # as `quiver search`


class ServeError(QuiverError):
    """A request the service cannot answer, with the HTTP status that says why."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class Limits:
    """Bounds on one request (each a command-line option of `quiver serve`)."""

    max_k: int = 100
    max_query_chars: int = 2000
    max_queries: int = 64
    max_body_bytes: int = 1 << 20


@dataclass(frozen=True)
class SearchRequest:
    queries: tuple[str, ...]
    k: int = DEFAULT_K
    store: str = "faiss"
    source: str | None = None
    documents: bool = False
    aggregation: str = "max"
    single: bool = True  # asked as `query` (the answer has `hits` too), not `queries`


def _invalid(message: str) -> ServeError:
    return ServeError(422, message)


def _check_query(value: Any, what: str, limits: Limits) -> str:
    if not isinstance(value, str):
        raise _invalid(f"{what} must be a string, not {type(value).__name__}")
    if not value.strip():
        raise _invalid(f"{what} is empty")
    if len(value) > limits.max_query_chars:
        raise _invalid(f"{what} is {len(value)} characters long; the limit is {limits.max_query_chars}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON admits a lone surrogate (\ud800), which no text encoder takes
        raise _invalid(f"{what} is not valid text: {exc.reason} at position {exc.start}") from exc
    return value


def _choice(data: dict[str, Any], name: str, choices: tuple[str, ...], default: str) -> str:
    value = data.get(name, default)
    if value not in choices:
        raise _invalid(f"unknown {name} {value!r}: use one of {', '.join(choices)}")
    return str(value)


def parse_search(body: bytes, limits: Limits) -> SearchRequest:
    """A search request from a POST body; ServeError (400 for what is not a JSON object, 413 for a body over the
    limit, 422 for a field out of bounds) otherwise."""
    if len(body) > limits.max_body_bytes:
        raise ServeError(413, f"the body is {len(body)} bytes; the limit is {limits.max_body_bytes}")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ServeError(400, f"the body is not JSON: {exc}") from exc
    except RecursionError as exc:
        raise ServeError(400, "the body is not a search request: it nests deeper than a JSON parser follows") from exc
    if not isinstance(data, dict):
        raise ServeError(400, 'the body must be a JSON object, such as {"query": "how do I parse json", "k": 5}')
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise _invalid(f"unknown field {', '.join(map(repr, unknown))}: the fields are {', '.join(FIELDS)}")
    if ("query" in data) == ("queries" in data):
        raise _invalid("give either query (a string) or queries (a list of strings)")
    if "query" in data:
        queries: tuple[str, ...] = (_check_query(data["query"], "query", limits),)
    else:
        given = data["queries"]
        if not isinstance(given, list) or not given:
            raise _invalid("queries must be a non-empty list of strings")
        if len(given) > limits.max_queries:
            raise _invalid(f"queries has {len(given)} entries; the limit is {limits.max_queries}")
        queries = tuple(_check_query(q, f"queries[{i}]", limits) for i, q in enumerate(given))
    k = data.get("k", DEFAULT_K)
    if not isinstance(k, int) or isinstance(k, bool):
        raise _invalid(f"k must be an integer, not {type(k).__name__}")
    if not 1 <= k <= limits.max_k:
        raise _invalid(f"k is {k}; it must be between 1 and {limits.max_k}")
    source = data.get("source")
    if source is not None and (not isinstance(source, str) or not SOURCE_NAME.match(source)):
        raise _invalid(f"source {source!r} is not a source name: those are {RULE}")
    documents = data.get("documents", False)
    if not isinstance(documents, bool):
        raise _invalid(f"documents must be true or false, not {documents!r}")
    return SearchRequest(queries, k, _choice(data, "store", STORES, "faiss"), source, documents,
                         _choice(data, "aggregation", AGGREGATIONS, "max"), single="query" in data)
