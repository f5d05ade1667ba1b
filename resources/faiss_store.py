"""The FAISS index as a Dagster resource: immutable versions on the storage root, and a CURRENT pointer.

Every build is a directory of its own under `versions/`, written in full before CURRENT moves to it (one
process at a time moves it); the version CURRENT names is never deleted or rewritten, and one replaced is
kept `retain_replaced_s` for the readers that opened it just before. `by_key/<cache key>` names the version
last built for the same inputs and settings.
"""

import json
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, Literal

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from dagster import ConfigurableResource
from filelock import FileLock
from pydantic import Field
from upath import UPath

from quiver.atomic import atomic_replace, is_local, write_text_atomic
from quiver.errors import QuiverError
from quiver.retry import ServiceUnavailableError
from quiver.settings import default_storage_root
from quiver.vector_index import IndexSettings, build_index, search_index
from quiver.vectors import HIT_FIELDS, KEY_COLUMNS, PAYLOAD_COLUMNS, SearchHit, empty_payload, key_pairs

CURRENT_POINTER = "CURRENT"


@dataclass
class FaissVersion:
    """One immutable, fully written index version, and its payload table."""

    directory: UPath
    manifest: dict[str, Any]
    index: faiss.Index
    payload: pa.Table

    @cached_property
    def row_of(self) -> dict[int, int]:
        return {int(v): i for i, v in enumerate(self.payload.column("vector_id").to_numpy())}

    def ids_of_source(self, source: str) -> np.ndarray:
        column = self.payload.column("source")
        return self.payload.column("vector_id").filter(pc.equal(column, source)).to_numpy()

    def search(self, queries: np.ndarray, k: int, source: str | None = None,
               fields: tuple[str, ...] = HIT_FIELDS) -> list[list[SearchHit]]:
        """The k nearest chunks of each query; of one source only when given. Hits carry the payload fields
        asked for (the others are empty)."""
        only = None
        if source is not None and set(self.payload.column("source").unique().to_pylist()) != {source}:
            only = self.ids_of_source(source)
        scores, ids = search_index(self.index, queries, k, only)
        found = [[(float(score), int(vid)) for score, vid in zip(row_scores, row_ids, strict=True) if vid >= 0]
                 for row_scores, row_ids in zip(scores, ids, strict=True)]
        values = self._payload_of([vid for hits in found for _, vid in hits], fields)
        results, at = [], 0
        for hits in found:
            results.append([SearchHit(score, vid, *(values[c][at + i] if c in values else "" for c in HIT_FIELDS))
                            for i, (score, vid) in enumerate(hits)])
            at += len(hits)
        return results

    def filled(self, hits: Sequence[SearchHit], fields: tuple[str, ...] = HIT_FIELDS) -> list[SearchHit]:
        """The hits with these payload fields read in (one read for all of them): a search asks only for the
        fields it ranks by, then only the hits it shows are filled."""
        values = self._payload_of([h.vector_id for h in hits], fields)
        return [replace(hit, **{name: values[name][i] for name in fields}) for i, hit in enumerate(hits)]

    def _payload_of(self, vector_ids: list[int], fields: tuple[str, ...]) -> dict[str, list[Any]]:
        rows = pa.array([self.row_of[vid] for vid in vector_ids], pa.int64())
        return {name: self.payload.column(name).take(rows).to_pylist() for name in fields}


def _started_at(draft: UPath) -> float:
    """When a build began, from its version name (nanoseconds first); an unknown name counts as old."""
    stamp = draft.name.removeprefix(".tmp-").split("-", 1)[0]
    return int(stamp) / 1e9 if stamp.isdigit() else 0.0


def _mtime(path: UPath) -> float:
    try:
        return float(path.stat().st_mtime)
    except (AttributeError, KeyError, TypeError):  # some object stores report no mtime for prefixes
        return time.time()


class FaissDraft:
    """A version under construction: payload rows stream to Parquet; the index and manifest come last."""

    def __init__(self, directory: UPath, version: str) -> None:
        self.directory = directory
        self.version = version
        self.index: faiss.Index | None = None
        self.manifest: dict[str, Any] = {}
        self.rows = 0
        self._handle: Any = None
        self._writer: pq.ParquetWriter | None = None

    def add_payload(self, rows: pa.RecordBatch | pa.Table) -> None:
        rows = rows.select(list(PAYLOAD_COLUMNS))
        if self._writer is None:
            self._handle = (self.directory / "payload.parquet").open("wb")
            self._writer = pq.ParquetWriter(self._handle, rows.schema, compression="zstd")
        self._writer.write(rows)
        self.rows += rows.num_rows

    def complete(self, key: str) -> None:
        if self.index is None:
            raise QuiverError("a FAISS version needs an index")
        if self._writer is None:
            self.add_payload(empty_payload())
        assert self._writer is not None
        self._writer.close()
        self._handle.close()
        if self.rows != self.index.ntotal:
            raise QuiverError(f"FAISS version {self.version}: {self.index.ntotal} vectors but {self.rows} payload rows")
        if is_local(self.directory):
            faiss.write_index(self.index, str(self.directory.path) + "/index.faiss")
        else:
            (self.directory / "index.faiss").write_bytes(faiss.serialize_index(self.index).tobytes())
        self.manifest = {"key": key, "version": self.version, "ntotal": int(self.index.ntotal),
                         "dimension": int(self.index.d), "created": time.time(), **self.manifest}
        (self.directory / "manifest.json").write_text(json.dumps(self.manifest, sort_keys=True))

    def abort(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
                self._handle.close()
            except Exception:  # noqa: BLE001 - the directory is removed anyway
                pass


ANY_VERSION = object()  # make_current without a condition


class ConcurrentIndexUpdateError(ServiceUnavailableError):
    """Another run moved CURRENT while this one built on the old one: transient, the step's retry rebuilds."""


class FaissStore(ConfigurableResource):
    """Versioned FAISS indexes: each build is a new directory; CURRENT names the live one.

    A build is written to a temp directory, renamed into place, and only then made current, so a
    reader never sees a half-written index.
    """

    directory: str = Field(default_factory=lambda: f"{default_storage_root()}/faiss_index")
    index_type: Literal["auto", "flat", "ivf", "hnsw"] = "auto"
    auto_approximate_above: int = 200_000
    auto_approximate_type: Literal["ivf", "hnsw"] = "hnsw"
    ivf_nlist: int | None = None
    ivf_nprobe: int = 16
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 128
    keep_versions: int = Field(default=2, ge=1, description="Newest versions always kept.")
    retain_replaced_s: float = Field(default=600.0, ge=0, description="A version replaced less than this long "
                                     "ago is kept for the readers that opened it just before CURRENT moved.")
    abandoned_draft_after_s: float = Field(default=86400.0, description="A version directory without a manifest "
                                           "started longer ago than this is a build that died, and is removed.")

    def settings(self) -> IndexSettings:
        return IndexSettings(
            index_type=self.index_type, auto_approximate_above=self.auto_approximate_above,
            auto_approximate_type=self.auto_approximate_type, ivf_nlist=self.ivf_nlist,
            ivf_nprobe=self.ivf_nprobe, hnsw_m=self.hnsw_m, hnsw_ef_construction=self.hnsw_ef_construction,
            hnsw_ef_search=self.hnsw_ef_search,
        )

    @property
    def root(self) -> UPath:
        return UPath(self.directory)

    def version_dir(self, version: str) -> UPath:
        return self.root / "versions" / version

    def has_version(self, version: str) -> bool:
        """Whether the version is complete: its manifest, written last, is there."""
        return (self.version_dir(version) / "manifest.json").exists()

    def _key_pointer(self, key: str) -> UPath:
        return self.root / "by_key" / key

    def version_for(self, key: str) -> str | None:
        """The complete version last built for a cache key (the same inputs and settings), if it still exists."""
        pointer = self._key_pointer(key)
        if not pointer.exists():
            return None
        version = pointer.read_text().strip()
        return version if self.has_version(version) else None

    @contextmanager
    def writing_version(self, key: str) -> Iterator["FaissDraft"]:
        """A new version being written; nothing reads it until it is complete, and it never replaces or
        touches another version: every build gets a directory of its own. Locally it is written in a temp
        directory renamed into place; on an object store, which cannot rename a directory at once, it is
        written in place with its manifest last: a version without a manifest is never trusted."""
        self._remove_abandoned_drafts()
        version = f"{time.time_ns():020d}-{key[:12]}-{uuid.uuid4().hex[:8]}"
        final = self.version_dir(version)
        local = is_local(final)
        target = self.root / "versions" / f".tmp-{version}" if local else final
        target.mkdir(parents=True, exist_ok=True)
        draft = FaissDraft(target, version)
        try:
            yield draft
            draft.complete(key)
            if local:
                atomic_replace(target, final)
        except BaseException:
            draft.abort()
            self._remove(target)
            raise
        write_text_atomic(self._key_pointer(key), version)

    def write_version(self, key: str, vectors: np.ndarray, payload: pa.Table,
                      extra_manifest: dict[str, Any]) -> dict[str, Any]:
        """Build an index over vectors and store it as a new version built for key; returns its manifest."""
        ids = payload.column("vector_id").to_numpy()
        if len(np.unique(ids)) != len(ids):
            raise QuiverError("duplicate vector ids in the index input: a chunk id repeats")
        with self.writing_version(key) as draft:
            started = time.perf_counter()
            draft.index, kind = build_index(vectors, ids, self.settings())
            draft.add_payload(payload)
            draft.manifest = {"index_type": kind, "build_seconds": time.perf_counter() - started, **extra_manifest}
        return draft.manifest

    def _remove_abandoned_drafts(self) -> None:
        """Temp directories (local) and manifest-less directories (object stores) of builds that died (a killed
        step), old enough not to be in progress."""
        versions = self.root / "versions"
        if not versions.exists():
            return
        for entry in versions.iterdir():
            try:
                draft = entry.name.startswith(".tmp-") or not (entry / "manifest.json").exists()
                if draft and time.time() - _started_at(entry) > self.abandoned_draft_after_s:
                    self._remove(entry)
            except OSError:
                continue

    @contextmanager
    def _pointer_turn(self) -> Iterator[None]:
        """One process at a time moves CURRENT and prunes (locally; an object store has no locks to offer)."""
        if not is_local(self.root):
            yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root.path) + "/.current.lock", thread_local=False):
            yield

    def make_current(self, version: str, built_on: str | None | object = ANY_VERSION) -> None:
        """Point CURRENT at a complete version (atomically), then prune versions no reader can still need. A
        version built on another (`built_on`: the CURRENT it updated) becomes current only if CURRENT still is that
        one: a concurrent run that moved CURRENT meanwhile wins, and this one is retried on the newer version
        (last writer wins would drop the other run's changes)."""
        if not self.has_version(version):
            raise QuiverError(f"FAISS index version {version} is incomplete or missing")
        with self._pointer_turn():
            previous = self.current_version()
            if built_on is not ANY_VERSION and previous != built_on:
                raise ConcurrentIndexUpdateError(
                    f"FAISS CURRENT moved from {built_on} to {previous} while version {version} was built on the "
                    "former (a concurrent index run): this step is retried on the newer version")
            write_text_atomic(self.root / CURRENT_POINTER, version)
            if previous and previous != version:  # when it stopped being current: its readers' grace starts
                write_text_atomic(self.root / "retired" / previous, f"{time.time():.3f}")
            (self.root / "retired" / version).unlink(missing_ok=True)
            self._prune(keep=version)

    def current_version(self) -> str | None:
        pointer = self.root / CURRENT_POINTER
        return pointer.read_text().strip() if pointer.exists() else None

    def open_current(self) -> FaissVersion:
        """The live version. A reader that read CURRENT just before it moved and its old version was pruned
        reads CURRENT again."""
        for _ in range(3):
            version = self.current_version()
            if version is None:
                raise QuiverError(f"no FAISS index under {self.directory}: materialize faiss_index first")
            try:
                return self.open_version(version)
            except (FileNotFoundError, RuntimeError):  # faiss.read_index raises RuntimeError for a missing file
                if self.current_version() == version and self.has_version(version):
                    raise
        raise QuiverError(f"the FAISS index under {self.directory} changed three times while being opened")

    def open_version(self, version: str) -> FaissVersion:
        directory = self.version_dir(version)
        with (directory / "payload.parquet").open("rb") as fh:
            payload = pq.read_table(fh)
        return FaissVersion(directory, self.manifest(version), self.read_index(version), payload)

    def held_vectors(self, version: str) -> Iterator[tuple[int, str | None]]:
        """(vector id, vector key) of every vector in a version's index; the key comes from its payload."""
        keys = self.payload_keys(version)
        index = self.read_index(version)
        for vid in faiss.vector_to_array(index.id_map).tolist():
            yield vid, keys.get(vid)

    def manifest(self, version: str) -> dict[str, Any]:
        return json.loads((self.version_dir(version) / "manifest.json").read_text())

    def read_index(self, version: str) -> faiss.Index:
        """The version's index, as this process's own copy (changing it never changes the version)."""
        directory = self.version_dir(version)
        if is_local(directory):
            return faiss.read_index(str(directory.path) + "/index.faiss")
        return faiss.deserialize_index(np.frombuffer((directory / "index.faiss").read_bytes(), dtype=np.uint8))

    def iter_payload(self, version: str, batch_size: int = 8192,
                     columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        with (self.version_dir(version) / "payload.parquet").open("rb") as fh:
            yield from pq.ParquetFile(fh).iter_batches(batch_size=batch_size, columns=columns)

    def keys_of_sources(self, version: str, sources: set[str]) -> dict[int, str]:
        """{vector id: vector key} a version holds for the given sources, from its payload."""
        if not sources:
            return {}
        wanted = pa.array(sorted(sources), pa.string())
        found: dict[int, str] = {}
        for batch in self.iter_payload(version, columns=[*KEY_COLUMNS, "source"]):
            found.update(key_pairs(batch.filter(pc.is_in(batch.column("source"), value_set=wanted))))
        return found

    def payload_keys(self, version: str) -> dict[int, str]:
        """{vector id: vector key} of a version, from its payload."""
        found: dict[int, str] = {}
        for batch in self.iter_payload(version, columns=KEY_COLUMNS):
            found.update(key_pairs(batch))
        return found

    def _prune(self, keep: str) -> None:
        """Remove old versions, never the current one, the `keep_versions` newest, or one that stopped being
        current less than `retain_replaced_s` ago (a reader that opened it just before CURRENT moved is still
        reading it). Called with the pointer turn held."""
        versions = self.root / "versions"
        complete = sorted((d for d in versions.iterdir() if not d.name.startswith(".tmp-")
                           and (d / "manifest.json").exists()), key=lambda d: d.name)
        current, now = self.current_version(), time.time()
        for old in complete[:-self.keep_versions]:
            if old.name in (keep, current):
                continue
            retired = self.root / "retired" / old.name
            since = float(retired.read_text()) if retired.exists() else _mtime(old / "manifest.json")
            if now - since > self.retain_replaced_s:
                self._remove(old)
                retired.unlink(missing_ok=True)
        pointers = self.root / "by_key"
        for pointer in pointers.iterdir() if pointers.exists() else ():
            if not pointer.name.startswith(".tmp-") and not self.has_version(pointer.read_text().strip()):
                pointer.unlink(missing_ok=True)

    @staticmethod
    def _remove(path: UPath) -> None:
        if is_local(path):
            shutil.rmtree(path.path, ignore_errors=True)
        else:
            path.fs.rm(path.path, recursive=True)
