"""FileRefs: stages hand each other references to Parquet files, not data.

A FileStore writes Parquet atomically (temp file + rename) at a content-addressed path that includes
the asset key and partition, keeps each partition's latest reference and the stage caches, and checks a
reference before it is read: inside the storage root, and the file still has its hash. (The IO manager
that hands references between stages is resources/fileref_io.py.)
"""

import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from dagster import (
    ConfigurableResource,
    MetadataValue,
)
from pydantic import Field
from upath import UPath

from quiver.atomic import (
    atomic_replace,
    flush_to_disk,
    is_local,
    is_temporary,
    remove_stale_temporaries,
    write_text_atomic,
)
from quiver.errors import FileRefError
from quiver.names import check_source_name
from quiver.settings import default_storage_root

UNPARTITIONED = "__all__"
LATEST_POINTER = "LATEST.json"
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileRef:
    """Where an asset's Parquet output is, and what it must hash to."""

    path: str
    sha256: str
    rows: int
    bytes: int
    schema: str
    # A sharded output: the Parquet files it is made of, in order, as (path, sha256, rows, bytes); `path` is
    # then their directory and `sha256` the hash of their hashes (shard_ref). Readers stream them as one table.
    parts: tuple[tuple[str, str, int, int], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "FileRef":
        return from_dict(json.loads(text))

    def files(self) -> list["FileRef"]:
        """The Parquet files to read, in order: the ref itself, or its shards."""
        if not self.parts:
            return [self]
        return [FileRef(path, sha, rows, size, self.schema) for path, sha, rows, size in self.parts]

    def metadata(self) -> dict[str, Any]:
        return {
            "path": MetadataValue.path(self.path),
            "rows": MetadataValue.int(self.rows),
            "bytes": MetadataValue.int(self.bytes),
            "sha256": MetadataValue.text(self.sha256),
        }


def from_dict(stored: dict[str, Any]) -> FileRef:
    return FileRef(**{**stored, "parts": tuple(tuple(p) for p in stored.get("parts") or ())})


def shard_ref(directory: str, shards: list[FileRef]) -> FileRef:
    """One FileRef for an output made of several Parquet files (their schemas must agree), in that order."""
    if not shards:
        raise FileRefError("a sharded output needs at least one shard")
    digest = hashlib.sha256(b"quiver-shards\x00" + "\n".join(s.sha256 for s in shards).encode())
    return FileRef(directory, digest.hexdigest(), sum(s.rows for s in shards), sum(s.bytes for s in shards),
                   shards[0].schema, tuple((s.path, s.sha256, s.rows, s.bytes) for s in shards))


class _HashingSink:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, target: Any) -> None:
        self._target = target
        self.digest = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.size += len(view)
        self._target.write(view)
        return len(view)

    def flush(self) -> None:
        self._target.flush()

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size


def file_sha256(path: UPath) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


class ParquetFileWriter:
    """Streams record batches into a temp file; `ref` exists only after a clean close."""

    def __init__(self, directory: UPath, schema: pa.Schema) -> None:
        self.directory = directory
        self.schema = schema
        self.ref: FileRef | None = None
        self.rows = 0
        directory.mkdir(parents=True, exist_ok=True)
        self._tmp = directory / f".tmp-{uuid.uuid4().hex}.parquet"
        self._handle = self._tmp.open("wb")
        self._sink = _HashingSink(self._handle)
        self._writer = pq.ParquetWriter(pa.PythonFile(self._sink, mode="w"), schema, compression="zstd")

    def write_batch(self, batch: pa.RecordBatch | pa.Table) -> None:
        if batch.num_rows:
            self._writer.write(batch)
            self.rows += batch.num_rows

    def close(self) -> FileRef:
        self._writer.close()
        flush_to_disk(self._handle)
        self._handle.close()
        sha = self._sink.digest.hexdigest()
        final = self.directory / f"{sha[:24]}.parquet"
        atomic_replace(self._tmp, final)
        self.ref = FileRef(str(final), sha, self.rows, self._sink.size, self.schema.to_string(
            show_field_metadata=False, show_schema_metadata=False))
        return self.ref

    def abort(self) -> None:
        try:
            self._writer.close()
            self._handle.close()
        finally:
            if self._tmp.exists():
                self._tmp.unlink()


class FileStore(ConfigurableResource):
    """The storage root for FileRefs, stage caches and indexes: a local path or any fsspec URI."""

    root: str = Field(default_factory=default_storage_root,
                      description="Local path or universal-pathlib URI (s3://, gs://, ...).")
    keep_versions: int = Field(default=3, description="Older Parquet versions kept per asset partition.")
    abandoned_temp_after_s: float = Field(default=3600.0, description="A temp file older than this was left by a "
                                          "writer that died, and is removed.")

    @property
    def root_path(self) -> UPath:
        return UPath(self.root)

    def asset_dir(self, asset: Iterable[str], partition: str | None) -> UPath:
        return self.root_path.joinpath(*asset, _partition_part(partition))

    @contextmanager
    def parquet_writer(self, asset: Iterable[str], partition: str | None,
                       schema: pa.Schema, prune: bool = True) -> Iterator[ParquetFileWriter]:
        """Write one asset partition's Parquet; a failure leaves no file that anything trusts. Without `prune`,
        older files stay (shards, which the merged output prunes with `prune_shards`)."""
        writer = ParquetFileWriter(self.asset_dir(asset, partition), schema)
        try:
            yield writer
        except BaseException:
            writer.abort()
            raise
        writer.close()
        if prune:
            self._prune(writer.directory, keep={writer.ref.path} if writer.ref else set())

    def prune_shards(self, directory: str, keep: Iterable[FileRef]) -> int:
        """Removes the shard files in a directory that none of the `keep` outputs names (a cached output that
        named one then misses and is recomputed, never read wrong); returns how many."""
        names = {UPath(part.path).name for ref in keep for part in ref.files()}
        removed = 0
        for entry in UPath(directory).iterdir():
            if entry.name.endswith(".parquet") and not is_temporary(entry) and entry.name not in names:
                entry.unlink(missing_ok=True)
                removed += 1
        return removed

    def _prune(self, directory: UPath, keep: set[str]) -> None:
        """Keeps the newest `keep_versions` outputs (and the latest); temp files are never versions, and the
        ones a dead writer left are removed once they are old enough not to be in progress."""
        pointer = directory / LATEST_POINTER
        if pointer.exists():
            keep = keep | {self._from_stored(json.loads(pointer.read_text())).path}
        entries = list(directory.iterdir())
        remove_stale_temporaries(entries, self.abandoned_temp_after_s)
        files = sorted((p for p in entries if p.name.endswith(".parquet") and not is_temporary(p)),
                       key=lambda p: p.stat().st_mtime, reverse=True)
        for stale in files[self.keep_versions:]:
            if str(stale) not in keep:
                stale.unlink(missing_ok=True)

    def check(self, ref: FileRef, verify_hash: bool = True) -> FileRef:
        """The same ref if it is inside the root and unchanged (each shard of a sharded one); FileRefError
        otherwise."""
        if ref.parts:
            files = [self.check(part, verify_hash) for part in ref.files()]
            if shard_ref(ref.path, files).sha256 != ref.sha256:
                raise FileRefError(f"FileRef {ref.path}: its shards do not hash to {ref.sha256}")
            return ref
        path = UPath(ref.path)
        if not self._inside_root(path):
            raise FileRefError(f"FileRef {ref.path} points outside the storage root {self.root}")
        if not path.exists():
            raise FileRefError(f"FileRef {ref.path} no longer exists")
        if verify_hash:
            actual = file_sha256(path)
            if actual != ref.sha256:
                raise FileRefError(f"FileRef {ref.path} was modified: sha256 is {actual}, expected {ref.sha256}")
        elif path.stat().st_size != ref.bytes:
            raise FileRefError(f"FileRef {ref.path} was modified: size differs from {ref.bytes} bytes")
        return ref

    def _inside_root(self, path: UPath) -> bool:
        root = self.root_path
        if root.protocol != path.protocol:
            return False
        if root.protocol in ("", "file", "local"):
            real_root, real_path = os.path.realpath(root.path), os.path.realpath(path.path)
            return os.path.commonpath([real_root, real_path]) == real_root
        root_s = root.path.rstrip("/") + "/"
        return path.path.startswith(root_s) and ".." not in path.parts

    def iter_batches(self, ref: FileRef, batch_size: int = 4096,
                     columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Stream a FileRef's rows (a sharded one's shard after shard); the ref must have passed `check`."""
        for part in ref.files():
            with UPath(part.path).open("rb") as fh:
                yield from pq.ParquetFile(fh).iter_batches(batch_size=batch_size, columns=columns)

    def parquet_schema(self, ref: FileRef) -> pa.Schema:
        with UPath(ref.files()[0].path).open("rb") as fh:
            return pq.read_schema(fh)

    def read_table(self, ref: FileRef, columns: list[str] | None = None) -> pa.Table:
        tables = []
        for part in ref.files():
            with UPath(part.path).open("rb") as fh:
                tables.append(pq.read_table(fh, columns=columns))
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]

    # References on disk are relative to the storage root they live in: a root that is copied, restored or
    # mounted elsewhere keeps working. (A reference outside the root stays absolute, and `check` refuses it.)
    def _relative(self, path: str) -> str | None:
        target, root = UPath(path), self.root_path
        if target.protocol != root.protocol:
            return None
        if is_local(root):
            real_root, real_path = os.path.realpath(root.path), os.path.realpath(target.path)
            inside = os.path.commonpath([real_root, real_path]) == real_root
            return os.path.relpath(real_path, real_root).replace(os.sep, "/") if inside else None
        prefix = root.path.rstrip("/") + "/"
        return target.path[len(prefix):] if target.path.startswith(prefix) and ".." not in target.parts else None

    def _to_stored(self, ref: FileRef) -> dict[str, Any]:
        def stored(path: str) -> str:
            relative = self._relative(path)
            return relative if relative is not None else path

        return {**ref.as_dict(), "path": stored(ref.path),
                "parts": [[stored(path), *rest] for path, *rest in ref.parts]}

    def _from_stored(self, stored: dict[str, Any]) -> FileRef:
        def absolute(path: str) -> str:
            if "://" not in path and not path.startswith("/"):
                parts = path.split("/")
                if ".." in parts or "" in parts:
                    raise FileRefError(f"FileRef {path!r} is not a path inside the storage root {self.root}")
                path = str(self.root_path.joinpath(*parts))
            return path

        return from_dict({**stored, "path": absolute(str(stored["path"])),
                          "parts": [[absolute(str(path)), *rest] for path, *rest in stored.get("parts") or ()]})

    # The latest materialization of each asset partition, for downstream loads on any machine.
    def write_latest(self, asset: Iterable[str], partition: str | None, ref: FileRef) -> None:
        write_text_atomic(self.asset_dir(asset, partition) / LATEST_POINTER,
                          json.dumps(self._to_stored(ref), sort_keys=True))

    def read_latest(self, asset: Iterable[str], partition: str | None) -> FileRef | None:
        pointer = self.asset_dir(asset, partition) / LATEST_POINTER
        return self._from_stored(json.loads(pointer.read_text())) if pointer.exists() else None

    # Stage-output cache: key -> JSON payload describing a finished output.
    def _cache_path(self, asset: Iterable[str], partition: str | None, key: str) -> UPath:
        return self.root_path.joinpath("_cache", *asset, _partition_part(partition), f"{key}.json")

    def cache_get(self, asset: Iterable[str], partition: str | None, key: str) -> dict[str, Any] | None:
        path = self._cache_path(asset, partition, key)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            return None

    def cache_put(self, asset: Iterable[str], partition: str | None, key: str, payload: dict[str, Any]) -> None:
        write_text_atomic(self._cache_path(asset, partition, key), json.dumps(payload, sort_keys=True))

    def remember_fileref(self, asset: Iterable[str], partition: str | None, key: str, ref: FileRef,
                         made: dict[str, Any] | None = None) -> None:
        """Record ref as the output for key, with how it was made (`made`: the run, when, its figures), so a
        cache hit can name the materialization it reuses; `cached_fileref` finds it again."""
        self.cache_put(asset, partition, key, {"fileref": self._to_stored(ref), "made": made or {}})

    def remember_refs(self, asset: Iterable[str], partition: str | None, name: str, refs: dict[str, FileRef],
                      facts: dict[str, Any]) -> None:
        """Record named FileRefs with facts about them under `name` (not a cache key: `remembered_refs` reads it)."""
        self.cache_put(asset, partition, name, {"refs": {k: self._to_stored(r) for k, r in refs.items()},
                                                "facts": facts})

    def remembered_refs(self, asset: Iterable[str], partition: str | None, name: str,
                        max_bytes: int | None = None) -> tuple[dict[str, FileRef], dict[str, Any]] | None:
        """What `remember_refs` recorded under `name`, if every file is still there, unchanged, and together at
        most `max_bytes` (checked before any file is hashed); else None."""
        payload = self.cache_get(asset, partition, name)
        try:
            stored = {k: self._from_stored(v) for k, v in payload["refs"].items()} if payload else None
            if stored is not None and max_bytes is not None and sum(r.bytes for r in stored.values()) > max_bytes:
                return None
            refs = {k: self.check(r) for k, r in stored.items()} if stored is not None else None
        except (FileRefError, TypeError, KeyError, AttributeError):
            return None
        return (refs, dict(payload.get("facts") or {})) if refs is not None and payload else None

    def cached_fileref(self, asset: Iterable[str], partition: str | None, key: str) -> FileRef | None:
        """The cached output for a key if its file is still there, unchanged; else None."""
        found = self.cached_output(asset, partition, key)
        return found[0] if found else None

    def cached_output(self, asset: Iterable[str], partition: str | None,
                      key: str) -> tuple[FileRef, dict[str, Any]] | None:
        """The cached output for a key and how it was made (empty for an entry written before that was
        kept), if its file is still there, unchanged; else None."""
        payload = self.cache_get(asset, partition, key)
        if not payload or "fileref" not in payload:
            return None
        try:
            return self.check(self._from_stored(payload["fileref"])), dict(payload.get("made") or {})
        except (FileRefError, TypeError):
            return None


def _partition_part(partition: str | None) -> str:
    """A partition key as a path component: only names that follow the source-name rule (a key added from the
    UI or GraphQL is checked here too), so no path outside the storage root is ever built from one."""
    return UNPARTITIONED if partition is None else check_source_name(partition, "partition key")
