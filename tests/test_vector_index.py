"""FAISS index types, automatic choice by size, and atomic versioned writes."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from quiver.errors import QuiverError
from quiver.vector_index import IndexSettings, build_index, choose_index_type
from quiver.vectors import PAYLOAD_COLUMNS
from resources.faiss_store import FaissStore


def _data(n: int, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((40, dim))  # clustered, like real embeddings
    vectors = (centers[rng.integers(0, 40, n)] + 0.5 * rng.standard_normal((n, dim))).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = rng.choice(2**62, size=n, replace=False).astype(np.int64)
    return vectors, ids


def _payload(ids: np.ndarray) -> pa.Table:
    strings = [str(i) for i in ids]
    return pa.table({"vector_id": pa.array(ids, pa.int64()),
                     **{c: pa.array(strings) for c in PAYLOAD_COLUMNS[1:]}})


def test_auto_is_exact_below_threshold_and_approximate_above() -> None:
    settings = IndexSettings(auto_approximate_above=1000)
    assert choose_index_type(settings, 1000) == "flat"
    assert choose_index_type(settings, 1001) == "hnsw"
    assert choose_index_type(IndexSettings(index_type="ivf"), 10) == "ivf"
    assert choose_index_type(IndexSettings(auto_approximate_above=10, auto_approximate_type="ivf"), 11) == "ivf"


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_index_types_find_neighbours_by_id(kind: str) -> None:
    vectors, ids = _data(4000)
    index, chosen = build_index(vectors, ids, IndexSettings(index_type=kind))  # type: ignore[arg-type]
    assert chosen == kind and index.ntotal == 4000
    exact = vectors[:50] @ vectors.T
    truth = np.argsort(-exact, axis=1)[:, :10]
    _, found = index.search(vectors[:50], 10)
    recall = np.mean([len(set(ids[t]) & set(f)) / 10 for t, f in zip(truth, found, strict=True)])
    assert recall == 1.0 if kind == "flat" else recall >= 0.8
    assert (found[:, 0] == ids[:50]).all()  # each vector finds itself first, under its own id


def test_a_version_built_on_a_replaced_current_never_becomes_current(tmp_path: Path) -> None:
    """Two index runs at once, each updating the version it found: the second to publish is refused (and its step
    retried on the newer version), so neither run's changes are dropped by the other."""
    from resources.faiss_store import ConcurrentIndexUpdateError

    store = FaissStore(directory=str(tmp_path / "faiss"))
    vectors, ids = _data(100)
    base = store.write_version("k0", vectors, _payload(ids), {"content_hash": "h0"})["version"]
    store.make_current(base, built_on=None)  # the first version, built on nothing
    first = store.write_version("k1", vectors[:50], _payload(ids[:50]), {"content_hash": "h1"})["version"]
    second = store.write_version("k2", vectors[:60], _payload(ids[:60]), {"content_hash": "h2"})["version"]
    store.make_current(first, built_on=base)
    with pytest.raises(ConcurrentIndexUpdateError, match=f"moved from {base} to {first}"):
        store.make_current(second, built_on=base)
    assert store.current_version() == first and store.open_current().index.ntotal == 50
    with pytest.raises(ConcurrentIndexUpdateError):
        store.make_current(second, built_on=None)  # a first build racing another first build
    store.make_current(second, built_on=first)  # rebuilt on the newer one: it goes through
    assert store.current_version() == second


def test_versions_are_atomic_and_current_moves_only_when_complete(tmp_path: Path) -> None:
    store = FaissStore(directory=str(tmp_path / "faiss"))
    vectors, ids = _data(100)
    v1 = store.write_version("k1", vectors, _payload(ids), {"content_hash": "h1"})["version"]
    store.make_current(v1)
    assert store.open_current().index.ntotal == 100 and store.version_for("k1") == v1

    bad_ids = ids.copy()
    bad_ids[1] = bad_ids[0]
    with pytest.raises(QuiverError, match="duplicate vector ids"):
        store.write_version("k2", vectors, _payload(bad_ids), {"content_hash": "h2"})
    assert store.current_version() == v1
    assert store.version_for("k2") is None
    with pytest.raises(QuiverError, match="incomplete or missing"):
        store.make_current("no-such-version")
    assert [p.name for p in (tmp_path / "faiss" / "versions").iterdir()] == [v1]

    v3 = store.write_version("k3", vectors[:10], _payload(ids[:10]), {"content_hash": "h3"})["version"]
    assert store.current_version() == v1  # written but not yet current: readers still see v1
    store.make_current(v3)
    current = store.open_current()
    assert current.index.ntotal == 10 and current.manifest["content_hash"] == "h3"
    hit = current.search(vectors[3:4], 1)[0][0]
    assert hit.vector_id == int(ids[3]) and hit.chunk_id == str(ids[3])


def test_a_rebuild_of_the_same_inputs_is_a_new_version_and_never_touches_the_live_one(tmp_path: Path) -> None:
    store = FaissStore(directory=str(tmp_path / "faiss"), keep_versions=1, retain_replaced_s=0)
    vectors, ids = _data(100)
    live = store.write_version("same-key", vectors, _payload(ids), {"content_hash": "h"})["version"]
    store.make_current(live)
    files = {p.name: p.stat().st_ino for p in store.version_dir(live).iterdir()}
    again = store.write_version("same-key", vectors, _payload(ids), {"content_hash": "h"})["version"]
    assert again != live and store.version_for("same-key") == again
    # Written, not yet current: the live version is exactly as it was, file for file.
    assert {p.name: p.stat().st_ino for p in store.version_dir(live).iterdir()} == files
    assert store.current_version() == live
    store.make_current(again)
    assert not store.version_dir(live).exists()  # replaced, nothing retains it here (keep 1, no grace)


def test_readers_following_current_never_fail_while_versions_are_rebuilt(tmp_path: Path) -> None:
    import threading

    store = FaissStore(directory=str(tmp_path / "faiss"), keep_versions=1, retain_replaced_s=30)
    vectors, ids = _data(20_000, dim=64)
    store.make_current(store.write_version("k", vectors, _payload(ids), {"content_hash": "h"})["version"])
    errors: list[BaseException] = []
    reads = 0
    stop = threading.Event()

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            try:
                version = store.open_current()
                assert version.index.ntotal == 20_000
                assert version.search(vectors[:1], 1)[0][0].vector_id == int(ids[0])
                reads += 1
            except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(3):  # forced rebuilds of the same inputs, made current as soon as each is complete
            store.make_current(store.write_version("k", vectors, _payload(ids), {"content_hash": "h"})["version"])
    finally:
        stop.set()
        thread.join()
    assert errors == [] and reads > 0
