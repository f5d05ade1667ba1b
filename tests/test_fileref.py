"""FileRef writes, atomicity and tamper detection, on a real storage root."""

from pathlib import Path

import pyarrow as pa
import pytest

from quiver.errors import FileRefError
from resources.fileref import FileRef, FileStore

SCHEMA = pa.schema([("id", pa.int64()), ("text", pa.string())])


def _batch(start: int, n: int) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict({"id": list(range(start, start + n)),
                                       "text": [f"row {i}" for i in range(start, start + n)]}, schema=SCHEMA)


def test_round_trip_streams_batches(tmp_path: Path) -> None:
    store = FileStore(root=str(tmp_path / "root"))
    with store.parquet_writer(["docs"], "src", SCHEMA) as writer:
        for start in range(0, 10_000, 1000):
            writer.write_batch(_batch(start, 1000))
    ref = writer.ref
    assert ref is not None and ref.rows == 10_000
    assert Path(ref.path).parent == tmp_path / "root" / "docs" / "src"
    assert Path(ref.path).stat().st_size == ref.bytes
    assert store.check(ref) == ref
    assert FileRef.from_json(ref.to_json()) == ref
    batches = list(store.iter_batches(ref, batch_size=3000))
    assert [b.num_rows for b in batches] == [3000, 3000, 3000, 1000]
    ids = [i for b in batches for i in b.column("id").to_pylist()]
    assert ids == list(range(10_000))


def test_same_content_same_hash_and_path(tmp_path: Path) -> None:
    store = FileStore(root=str(tmp_path))
    refs = []
    for _ in range(2):
        with store.parquet_writer(["a"], None, SCHEMA) as writer:
            writer.write_batch(_batch(0, 10))
        refs.append(writer.ref)
    assert refs[0] == refs[1]
    with store.parquet_writer(["a"], None, SCHEMA) as writer:
        writer.write_batch(_batch(1, 10))
    assert writer.ref.sha256 != refs[0].sha256


def test_failed_write_leaves_nothing_trusted(tmp_path: Path) -> None:
    store = FileStore(root=str(tmp_path))
    with store.parquet_writer(["docs"], "p", SCHEMA) as writer:
        writer.write_batch(_batch(0, 5))
    good = writer.ref
    store.write_latest(["docs"], "p", good)
    with pytest.raises(RuntimeError, match="boom"):
        with store.parquet_writer(["docs"], "p", SCHEMA) as failing:
            failing.write_batch(_batch(100, 5))
            raise RuntimeError("boom")
    assert failing.ref is None
    directory = tmp_path / "docs" / "p"
    assert sorted(p.name for p in directory.iterdir()) == sorted([Path(good.path).name, "LATEST.json"])
    assert store.read_latest(["docs"], "p") == good


def test_tampered_file_is_rejected(tmp_path: Path) -> None:
    store = FileStore(root=str(tmp_path))
    with store.parquet_writer(["docs"], "p", SCHEMA) as writer:
        writer.write_batch(_batch(0, 5))
    ref = writer.ref
    data = bytearray(Path(ref.path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(ref.path).write_bytes(bytes(data))
    with pytest.raises(FileRefError, match=r"was modified: sha256 is [0-9a-f]{64}, expected " + ref.sha256):
        store.check(ref)
    assert store.cached_fileref(["docs"], "p", "nokey") is None


def test_ref_outside_root_is_rejected(tmp_path: Path) -> None:
    root = tmp_path / "root"
    other = FileStore(root=str(tmp_path / "elsewhere"))
    with other.parquet_writer(["docs"], "p", SCHEMA) as writer:
        writer.write_batch(_batch(0, 1))
    store = FileStore(root=str(root))
    with pytest.raises(FileRefError, match="points outside the storage root"):
        store.check(writer.ref)
    sneaky = FileRef(str(root / ".." / "elsewhere" / "docs" / "p" / Path(writer.ref.path).name), writer.ref.sha256,
                     1, writer.ref.bytes, writer.ref.schema)
    with pytest.raises(FileRefError, match="points outside the storage root"):
        store.check(sneaky)


def test_old_versions_are_pruned_but_latest_kept(tmp_path: Path) -> None:
    store = FileStore(root=str(tmp_path), keep_versions=2)
    refs = []
    for i in range(5):
        with store.parquet_writer(["a"], "p", SCHEMA) as writer:
            writer.write_batch(_batch(i, 3))
        refs.append(writer.ref)
        if i == 0:
            store.write_latest(["a"], "p", writer.ref)
    remaining = {p.name for p in (tmp_path / "a" / "p").glob("*.parquet")}
    assert Path(refs[0].path).name in remaining  # LATEST points at it
    assert Path(refs[4].path).name in remaining
    assert Path(refs[1].path).name not in remaining


def test_temporary_files_are_never_versions_and_abandoned_ones_are_removed(tmp_path: Path) -> None:
    import os

    store = FileStore(root=str(tmp_path), keep_versions=2)
    directory = tmp_path / "a" / "p"
    directory.mkdir(parents=True)
    for i in range(3):  # a writer that died three times, just now
        (directory / f".tmp-dead{i}.parquet").write_bytes(b"half written")
    old = directory / ".tmp-long-dead.parquet"
    old.write_bytes(b"half written")
    os.utime(old, (1, 1))
    refs = []
    for i in range(2):
        with store.parquet_writer(["a"], "p", SCHEMA) as writer:
            writer.write_batch(_batch(i, 3))
        refs.append(writer.ref)
    # Both real versions are kept: temp files never count as versions.
    assert {Path(r.path).name for r in refs} <= {p.name for p in directory.iterdir()}
    assert not old.exists()
    assert sorted(p.name for p in directory.glob(".tmp-*")) == [f".tmp-dead{i}.parquet" for i in range(3)]
