"""One micro-batch of search requests: every query encoded in one forward pass, then one search per store and
source on the version being served, and each request's answer cut from it."""

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from quiver.errors import QuiverError
from quiver.serving.requests import SearchRequest, ServeError
from quiver.serving.results import RANK_FIELDS, SHOWN_FIELDS, Picked, fetch_depth, pick, result_rows
from quiver.serving.watcher import IndexWatcher
from quiver.vectors import SearchHit

Search = Callable[[np.ndarray, int, str | None], list[list[SearchHit]]]
Fill = Callable[[list[SearchHit]], list[SearchHit]]  # the hits with every payload field (in the same order)


class MilvusReader(Protocol):
    """The Milvus collection as the service reads it (platform_defs/serve.py wraps the MilvusStore resource)."""

    name: str

    def turn(self) -> AbstractContextManager[None]: ...

    def search(self, queries: np.ndarray, k: int, source: str | None) -> list[list[SearchHit]]: ...


@dataclass
class SearchEngine:
    encode: Callable[[list[str]], np.ndarray]
    faiss: IndexWatcher
    milvus: MilvusReader
    registered_sources: Callable[[], set[str]]

    def run_batch(self, requests: Sequence[SearchRequest]) -> list[dict[str, Any] | BaseException]:
        """Each request's answer, or the ServeError that says why it has none, in order."""
        texts = list(dict.fromkeys(q for r in requests for q in r.queries))
        answers: list[dict[str, Any] | BaseException] = [ServeError(500, "not answered")] * len(requests)
        try:
            vectors = self.encode(texts)  # one forward pass for the whole batch
        except QuiverError as exc:  # the model pool gave up on its instances: not the clients' fault
            return [ServeError(503, f"the model failed: {exc}")] * len(requests)
        except Exception:  # noqa: BLE001 - one request's text: each is encoded alone, and only its own fails
            vectors, failed = self._encode_each(texts)
            if len(failed) == len(texts):  # nothing encodes: the model's fault, not the clients'
                return [ServeError(503, f"the model failed: {next(iter(failed.values()))}")] * len(requests)
            for i, request in enumerate(requests):
                bad = [q for q in request.queries if q in failed]
                if bad:
                    answers[i] = ServeError(422, f"the query could not be encoded: {failed[bad[0]]}")
        row = {text: i for i, text in enumerate(texts)}
        answerable = [i for i, a in enumerate(answers) if not (isinstance(a, ServeError) and a.status == 422)]
        for store in ("faiss", "milvus"):
            asked = [i for i in answerable if requests[i].store == store]
            if not asked:
                continue
            try:
                with self._reading(store) as (search, fill, held, version):
                    known = held | self.registered_sources()
                    for i, answer in self._answer([requests[i] for i in asked], vectors, row, search, fill, known,
                                                  version):
                        answers[asked[i]] = answer
            except ServeError as exc:
                for i in asked:
                    answers[i] = exc
        return answers

    def _encode_each(self, texts: list[str]) -> tuple[np.ndarray, dict[str, str]]:
        """Each text alone (after a batch failed): the vectors (zeros for a text that failed) and why each failed."""
        rows, failed = [], {}
        for text in texts:
            try:
                rows.append(self.encode([text])[0])
            except Exception as exc:  # noqa: BLE001 - said to that request's client, as a 422
                failed[text] = f"{type(exc).__name__}: {exc}"
                rows.append(None)
        width = next((len(r) for r in rows if r is not None), 1)
        return np.stack([r if r is not None else np.zeros(width, np.float32) for r in rows]), failed

    def _reading(self, store: str) -> AbstractContextManager[tuple[Search, Fill, frozenset[str], str | None]]:
        return _faiss_reading(self.faiss) if store == "faiss" else _milvus_reading(self.milvus, self.faiss)

    @staticmethod
    def _answer(requests: list[SearchRequest], vectors: np.ndarray, row: dict[str, int], search: Search,
                fill: Fill, known: set[str] | frozenset[str], version: str | None) -> Iterator[tuple[int, Any]]:
        """One search per source for the requests of a store; then the hits the answers show (not the deeper
        candidates documents are ranked from) read their titles and texts, in one read for the batch."""
        by_source: dict[str | None, list[int]] = {}
        for i, request in enumerate(requests):
            by_source.setdefault(request.source, []).append(i)
        picked: dict[int, list[Picked]] = {}
        for source, members in by_source.items():
            if source is not None and source not in known:
                error = ServeError(422, f"unknown source {source!r}: the sources are {', '.join(sorted(known))}")
                yield from ((i, error) for i in members)
                continue
            texts = list(dict.fromkeys(q for i in members for q in requests[i].queries))
            depth = max(fetch_depth(requests[i].k, requests[i].documents) for i in members)
            hits = search(vectors[[row[t] for t in texts]], depth, source)  # one search for the whole group
            found = dict(zip(texts, hits, strict=True))
            for i in members:
                r = requests[i]
                picked[i] = [pick(found[q][:fetch_depth(r.k, r.documents)], r.k, r.documents, r.aggregation)
                             for q in r.queries]
        shown = fill([hit for lists in picked.values() for one in lists for hit, _ in one])
        at = 0
        for i, lists in picked.items():
            filled = []
            for one in lists:
                filled.append([(hit, score) for hit, (_, score) in zip(shown[at:at + len(one)], one, strict=True)])
                at += len(one)
            yield i, _response(requests[i], filled, version)


def _response(request: SearchRequest, picked: list[Picked], version: str | None) -> dict[str, Any]:
    results = [{"query": query, "index_version": version, "hits": result_rows(one)}
               for query, one in zip(request.queries, picked, strict=True)]
    answer: dict[str, Any] = {"store": request.store, "index_version": version, "k": request.k,
                              "documents": request.documents, "results": results}
    if request.single:
        answer["hits"] = results[0]["hits"]
    return answer


@contextmanager
def _faiss_reading(watcher: IndexWatcher) -> Iterator[tuple[Search, Fill, frozenset[str], str | None]]:
    """The served FAISS version, held for the batch (a swap meanwhile leaves it open until the batch is done);
    its search reads what ranking needs, and the hits shown are filled from the same version."""
    with watcher.use() as served:
        index = served.index
        yield (lambda queries, k, source: index.search(queries, k, source, fields=RANK_FIELDS)), (
            lambda hits: index.filled(hits, SHOWN_FIELDS)), served.sources, served.name


@contextmanager
def _milvus_reading(milvus: MilvusReader, faiss: IndexWatcher) -> Iterator[tuple[Search, Fill, frozenset[str], None]]:
    """The Milvus collection for the batch (a Milvus Lite database is taken for the batch and given back after);
    its sources are known from the served FAISS version, which the same index job writes. Milvus updates its
    collection in place: an answer from it names no version, and its hits come with their payload (a second
    read could see another state of the collection)."""
    served = faiss.current
    with milvus.turn():
        yield milvus.search, list, served.sources if served is not None else frozenset(), None
