"""Reading a Milvus collection's keys in pages, so that memory holds one page, never a whole listing.

A listing is Milvus's query iterator, which pages in primary-key order (a plain query with a limit does not
return the lowest ids: Milvus Lite answers with any rows). Each page is its own retried call; after a
transient error the listing resumes with a new iterator for the rows after the last id read, so a page is
repeated at most, never a whole listing, and a million-vector source is read in pages of thousands.
"""

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from quiver.hashing import KeyDigest
from quiver.vectors import source_filter

KeyRow = tuple[int, str, str]  # (vector id, vector key, source)


class MilvusKeys:
    """Key listings of MilvusStore (a mixin: the store gives `_call`, `_loaded`, `exists`, `collection` and
    `key_page_rows`)."""

    def key_pages(self, expression: str = "", including: set[str] | None = None,
                  excluding: set[str] | None = None) -> Iterator[list[KeyRow]]:
        """(vector id, vector key, source) of the rows matching the filter (of the included sources, or of every
        source but the excluded ones), in pages of at most key_page_rows rows, in id order."""
        if including is not None:
            if not including:
                return
            expression = source_filter(including=including)
        expression = expression or source_filter(excluding=excluding)
        if not self.exists():
            return
        state: dict[str, Any] = {"iterator": None, "after": -1}

        def next_page(client: Any) -> list[dict[str, Any]]:
            if state["iterator"] is None:  # the first page, or the next one after an attempt that failed
                where = f"id > {state['after']}" + (f" and ({expression})" if expression else "")
                state["iterator"] = self._loaded(client).query_iterator(
                    self.collection, batch_size=self.key_page_rows, filter=where,
                    output_fields=["id", "vector_key", "source"])
            try:
                return state["iterator"].next()
            except Exception:
                _close(state)
                raise

        try:
            while True:
                rows = self._call("list vectors", next_page)
                if not rows:
                    return
                page = sorted((int(r["id"]), r["vector_key"], r["source"]) for r in rows)
                state["after"] = page[-1][0]
                yield page
        finally:
            _close(state)

    def key_rows(self, expression: str = "", including: set[str] | None = None,
                 excluding: set[str] | None = None) -> Iterator[KeyRow]:
        """The rows of `key_pages`, one at a time."""
        for page in self.key_pages(expression, including, excluding):
            yield from page

    def iter_keys(self, source: str | None = None) -> Iterator[tuple[int, str]]:
        """Every (vector id, vector key) the collection holds, optionally for one source, streamed in pages."""
        return ((vid, key) for vid, key, _ in self.key_rows(source_filter(source)))

    def existing_keys(self, source: str | None = None) -> dict[int, str]:
        """{vector id: vector key} of what the collection holds (optionally for one source): one dict of them
        all, for a caller that needs random access to every key (a pipeline step asks `keys_of` per batch)."""
        return dict(self.iter_keys(source))

    def keys_of(self, ids: Sequence[int], source: str) -> dict[int, str]:
        """{vector id: vector key} of those of the given ids that the source holds: one query per page of ids."""
        held: dict[int, str] = {}
        for start in range(0, len(ids), self.key_page_rows):
            part = ", ".join(str(int(i)) for i in ids[start:start + self.key_page_rows])
            where = f"id in [{part}] and {source_filter(source)}"
            rows = self._call("look up vectors", lambda c, w=where: self._loaded(c).query(
                self.collection, filter=w, output_fields=["id", "vector_key"]))
            held.update((int(r["id"]), r["vector_key"]) for r in rows)
        return held

    def ids_not_in(self, source: str, current: np.ndarray) -> Iterator[list[int]]:
        """Pages of the source's vector ids that are not in `current` (sorted int64): what a writer deletes."""
        for page in self.key_pages(source_filter(source)):
            ids = np.fromiter((vid for vid, _, _ in page), dtype=np.int64, count=len(page))
            at = np.minimum(np.searchsorted(current, ids), max(len(current) - 1, 0))
            gone = ids if not len(current) else ids[current[at] != ids]
            if len(gone):
                yield gone.tolist()

    def held_digest(self, source: str) -> str:
        """KeyDigest of what the collection holds of one source, read in pages."""
        return KeyDigest().update((vid, key) for vid, key, _ in self.key_rows(source_filter(source))).hexdigest()


def _close(state: dict[str, Any]) -> None:
    iterator, state["iterator"] = state["iterator"], None
    if iterator is not None:
        try:
            iterator.close()
        except Exception:  # noqa: BLE001 - closing an iterator whose connection failed: nothing to release
            pass
