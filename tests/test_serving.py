"""The search service's parts below HTTP: micro-batches and their limits, and the hot swap on a real FAISS store,
versions published as faiss_index publishes them (written in full, then CURRENT moved)."""

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from quiver.serving.batching import BatchSettings, MicroBatcher
from quiver.serving.watcher import IndexWatcher, RefusedVersion, model_mismatch
from resources.faiss_store import FaissStore


def test_a_batch_in_flight_keeps_its_version_and_another_model_is_never_served(quiver_home: Path) -> None:
    store = FaissStore()
    vectors = np.eye(3, 8, dtype=np.float32)

    def publish(key: str, fingerprint: str) -> str:
        payload = pa.table({"vector_id": pa.array([1, 2, 3], pa.int64()),
                            **{c: [f"{key}-{c}-{i}" for i in range(3)] for c in ("chunk_id", "doc_id", "title", "text",
                                                                                    "vector_key")},
                            "source": ["s"] * 3})
        manifest = store.write_version(key, vectors, payload, {"model_fingerprints": [fingerprint]})
        store.make_current(manifest["version"])
        return str(manifest["version"])

    def check(name: str, opened: Any) -> None:
        if problem := model_mismatch(name, opened.manifest, "ours", "the model"):
            raise RefusedVersion(problem)

    events: list[tuple[str, str]] = []
    watcher = IndexWatcher(store, check=check, listener=lambda event, facts: events.append((event, facts["version"])))
    assert watcher.refresh() is False and watcher.problem == (
        f"no FAISS index under {store.directory} yet: materialize faiss_index first")
    a = publish("a", "ours")
    assert watcher.refresh() is True and watcher.current is not None and watcher.current.name == a
    with watcher.use() as in_flight:
        b = publish("b", "ours")
        assert watcher.refresh() is True and watcher.current.name == b
        assert in_flight.name == a and not in_flight.closed  # the batch still searches its own version
        assert [h.chunk_id for h in in_flight.index.search(vectors[:1], 1)[0]] == ["a-chunk_id-0"]
        assert events == [("swap", a), ("swap", b)]  # a is not closed while a batch uses it
    assert in_flight.closed and in_flight.index is None
    assert events[-1] == ("closed", a)
    c = publish("c", "theirs")
    assert watcher.refresh() is False and watcher.current.name == b
    assert watcher.problem == model_mismatch(c, store.manifest(c), "ours", "the model")
    assert watcher.refresh() is False and events[-1] == ("refused", c)
    assert [e for e in events if e[0] == "refused"] == [("refused", c)]  # refused once, not reopened every poll
    with watcher.use() as served:
        assert served.name == b and [h.chunk_id for h in served.index.search(vectors[:1], 1)[0]] == ["b-chunk_id-0"]


def _batches(settings: BatchSettings, sizes: list[int]) -> tuple[list[list[int]], list[Any]]:
    """Submits one item of each size at once to a batcher whose batches take 20 ms; (the batches run, each as
    its items' sizes, in order; each item's result)."""
    ran: list[list[int]] = []

    def run(items: list[int]) -> list[Any]:
        ran.append(list(items))
        time.sleep(0.02)
        return [ValueError("odd") if size == 3 else size * 10 for size in items]

    async def main() -> list[Any]:
        batcher: MicroBatcher[int, int] = MicroBatcher(run, settings, size=lambda size: size)
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(size) for size in sizes), return_exceptions=True)
        finally:
            await batcher.stop()

    return ran, asyncio.run(main())


def test_micro_batches_keep_their_limit_and_each_item_gets_its_own_result() -> None:
    ran, results = _batches(BatchSettings(max_batch=4, window_s=0.005), [1, 1, 2, 1, 1, 6, 1, 3])
    assert ran == [[1, 1, 2], [1, 1], [6], [1, 3]]  # at most 4 queries, a larger item alone, arrival order kept
    assert results[:7] == [10, 10, 20, 10, 10, 60, 10]
    assert isinstance(results[7], ValueError)  # one item's failure is its own
    ran, _ = _batches(BatchSettings(enabled=False), [1, 1, 2, 1])
    assert ran == [[1], [1], [2], [1]]
