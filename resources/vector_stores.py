"""Vector stores as Dagster resources: a versioned FAISS index on the storage root, and Milvus.

Both hold one vector per current chunk under the same deterministic int64 id, with the chunk's
document id, title and text beside it so that a search can print results without another lookup.
"""

import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, TypeVar

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from dagster import ConfigurableResource, InitResourceContext, get_dagster_logger
from filelock import FileLock, Timeout
from pydantic import Field, PrivateAttr
from upath import UPath

from quiver.atomic import atomic_replace, is_local, write_text_atomic
from quiver.errors import ConfigError, QuiverError
from quiver.hashing import KeyDigest
from quiver.retry import RetrySettings, call_with_retries
from quiver.settings import default_milvus_uri, default_storage_root, env_value, from_env
from quiver.vector_index import IndexSettings, build_index, search_index

T = TypeVar("T")
_log = logging.getLogger("quiver.milvus")
SNIPPET_CHARS = 2000
MILVUS_MAX_REQUEST_BYTES = 64 * 2**20  # gRPC message limit of a Milvus server
MILVUS_MAX_TOPK = 16384
# Collection property prefix of the per-source exact marks (property value: that source's KeyDigest).
EXACT_MARK = "quiver.exact."
CURRENT_POINTER = "CURRENT"
# Columns every vector store keeps beside the vector.
PAYLOAD_COLUMNS = ("vector_id", "chunk_id", "doc_id", "source", "title", "text", "vector_key")
HIT_FIELDS = PAYLOAD_COLUMNS[1:6]  # what a search hit carries


@dataclass(frozen=True)
class SearchHit:
    score: float
    vector_id: int
    chunk_id: str
    doc_id: str
    source: str
    title: str
    text: str


_local = is_local


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
        rows = pa.array([self.row_of[vid] for hits in found for _, vid in hits], pa.int64())
        values = {name: self.payload.column(name).take(rows).to_pylist() for name in fields}
        results, at = [], 0
        for hits in found:
            results.append([SearchHit(score, vid, *(values[c][at + i] if c in values else "" for c in HIT_FIELDS))
                            for i, (score, vid) in enumerate(hits)])
            at += len(hits)
        return results


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
            self.add_payload(pa.table({c: pa.array([], pa.int64() if c == "vector_id" else pa.string())
                                       for c in PAYLOAD_COLUMNS}))
        assert self._writer is not None
        self._writer.close()
        self._handle.close()
        if self.rows != self.index.ntotal:
            raise QuiverError(f"FAISS version {self.version}: {self.index.ntotal} vectors but {self.rows} payload rows")
        if _local(self.directory):
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
        local = _local(final)
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
        if not _local(self.root):
            yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root.path) + "/.current.lock", thread_local=False):
            yield

    def make_current(self, version: str) -> None:
        """Point CURRENT at a complete version (atomically), then prune versions no reader can still need."""
        if not self.has_version(version):
            raise QuiverError(f"FAISS index version {version} is incomplete or missing")
        with self._pointer_turn():
            previous = self.current_version()
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
        if _local(directory):
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
        for batch in self.iter_payload(version, columns=["vector_id", "vector_key", "source"]):
            batch = batch.filter(pc.is_in(batch.column("source"), value_set=wanted))
            found.update(zip(batch.column("vector_id").to_pylist(), batch.column("vector_key").to_pylist(),
                             strict=True))
        return found

    def payload_keys(self, version: str) -> dict[int, str]:
        """{vector id: vector key} of a version, from its payload."""
        found: dict[int, str] = {}
        for batch in self.iter_payload(version, columns=["vector_id", "vector_key"]):
            found.update(zip(batch.column("vector_id").to_pylist(), batch.column("vector_key").to_pylist(),
                             strict=True))
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
        if _local(path):
            shutil.rmtree(path.path, ignore_errors=True)
        else:
            path.fs.rm(path.path, recursive=True)


_MILVUS_CLIENTS: dict[tuple[str, str, str], Any] = {}
_MILVUS_LOCK = threading.Lock()
_LOADED_COLLECTIONS: set[tuple[str, str, str]] = set()


class MilvusStore(ConfigurableResource):
    """A Milvus collection through MilvusClient: Milvus Lite by default, a server by URI and token."""

    uri: str = Field(default_factory=default_milvus_uri,
                     description="Milvus Lite file path, or http(s)://host:19530 for a server.")
    token: str = Field(default_factory=from_env("QUIVER_MILVUS_TOKEN"),
                       description="user:password or API key for a server (QUIVER_MILVUS_TOKEN, kept out of the UI).")
    db_name: str = Field(default_factory=from_env("QUIVER_MILVUS_DB"), description="Database (QUIVER_MILVUS_DB).")
    collection: str = Field(default_factory=from_env("QUIVER_MILVUS_COLLECTION", "quiver_chunks"),
                            description="Collection (QUIVER_MILVUS_COLLECTION).")
    index_type: str = Field(default="FLAT", description="FLAT (exact), HNSW, IVF_FLAT or AUTOINDEX.")
    insert_batch_size: int = Field(default=512, ge=1, description="Most rows per insert or upsert request.")
    max_request_bytes: int = Field(default=16 * 2**20, ge=2**16, le=MILVUS_MAX_REQUEST_BYTES // 2,
                                   description="Most bytes per request, well under Milvus's 64 MB limit.")
    create_database: bool = Field(default=True, description="Create db_name on the server if it is missing.")
    secure: bool = Field(default_factory=lambda: os.environ.get("QUIVER_MILVUS_TLS", "") in ("1", "true", "yes"),
                         description="TLS to the server (QUIVER_MILVUS_TLS=1).")
    server_pem_path: str = Field(default_factory=from_env("QUIVER_MILVUS_TLS_SERVER_PEM"),
                                 description="The server's certificate, for one-way TLS.")
    server_name: str = Field(default_factory=from_env("QUIVER_MILVUS_TLS_SERVER_NAME"),
                             description="The name the server's certificate is issued to.")
    ca_pem_path: str = Field(default_factory=from_env("QUIVER_MILVUS_TLS_CA_PEM"), description="CA, for mutual TLS.")
    client_pem_path: str = Field(default_factory=from_env("QUIVER_MILVUS_TLS_CLIENT_PEM"),
                                 description="Client certificate, for mutual TLS.")
    client_key_path: str = Field(default_factory=from_env("QUIVER_MILVUS_TLS_CLIENT_KEY"),
                                 description="Client key, for mutual TLS.")
    retry_attempts: int = Field(default=6, ge=1, description="Attempts of a call that fails transiently.")
    retry_max_wait_s: float = Field(default=10.0, description="Longest wait between two attempts (exponential "
                                                              "backoff with jitter below it).")
    retry_deadline_s: float = Field(default=120.0, description="No new attempt after this long.")

    _client: Any = PrivateAttr(default=None)

    @property
    def is_lite(self) -> bool:
        return "://" not in self.uri

    def client(self) -> Any:
        """One client per process and URI. Milvus Lite admits one process per database: this process first
        takes the database's lock, waiting (and saying so in the log) as long as another process holds it."""
        key = (self.uri, env_value(self.token), self.db_name)
        if self.is_lite:
            hold_lite(self.uri, wait=True, log=get_dagster_logger())
        with _MILVUS_LOCK:
            client = _MILVUS_CLIENTS.get(key)
            if client is None:
                client = self._connect()
                _MILVUS_CLIENTS[key] = client
            return client

    def busy_reason(self) -> str | None:
        """Why this process cannot write now without waiting (a Milvus Lite database another process holds),
        or None. A step that can defer its writes to milvus_collection asks this instead of waiting."""
        if self.is_lite and not hold_lite(self.uri, wait=False):
            return f"Milvus Lite database {self.uri} is held by another process ({lite_holder(self.uri)})"
        return None

    def release(self) -> None:
        """Give the Milvus Lite database back to the other processes (a server needs nothing)."""
        if self.is_lite:
            close_milvus_clients(self.uri)

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        """A step's end releases the Milvus Lite database for the next process, if nothing did before."""
        self.release()

    def _connect(self) -> Any:
        from pymilvus import MilvusClient
        from pymilvus.exceptions import MilvusException

        # Milvus Lite answers the query iterator's timestamp probe with "not implemented"; pymilvus then
        # logs a warning and the embedded gRPC server an error, though the iterator works. (Set after the
        # import: pymilvus configures its loggers when imported.)
        logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
        logging.getLogger("pymilvus.client.iterator.query_iterator").setLevel(logging.ERROR)

        kwargs: dict[str, Any] = {"uri": self.uri, **self._server_options()}
        lite = "://" not in self.uri
        if lite:
            os.makedirs(os.path.dirname(os.path.abspath(self.uri)), exist_ok=True)
            # The in-process Lite server allows a keepalive ping every 5 minutes only; pymilvus pings every 10 s
            # and, between inserts of a long embedding run, is sent GOAWAY "too_many_pings" and reconnects.
            kwargs["grpc_options"] = {"grpc.keepalive_time_ms": 360_000, "grpc.keepalive_permit_without_calls": 0}
        if self.db_name and not lite:
            return self._connect_to_database(MilvusClient, kwargs)
        try:
            return MilvusClient(**kwargs)
        except MilvusException as exc:
            if lite:
                raise QuiverError(f"cannot open the Milvus Lite database {self.uri}: {exc}") from exc
            raise

    def _server_options(self) -> dict[str, Any]:
        """Credentials and TLS for a server: the same client and code paths as Milvus Lite otherwise."""
        options: dict[str, Any] = {}
        if env_value(self.token):
            options["token"] = env_value(self.token)
        if self.secure:
            options["secure"] = True
            for name in ("server_pem_path", "server_name", "ca_pem_path", "client_pem_path", "client_key_path"):
                if getattr(self, name):
                    options[name] = getattr(self, name)
        return options

    def _connect_to_database(self, client_class: Any, kwargs: dict[str, Any]) -> Any:
        """A client on db_name, which is created first when it does not exist yet and create_database is on."""
        admin = client_class(**kwargs)
        if self.db_name not in admin.list_databases():
            if not self.create_database:
                raise ConfigError(f"Milvus database {self.db_name!r} does not exist at {self.uri} (create it, or "
                                  "set create_database)")
            admin.create_database(self.db_name)
        admin.close()
        return client_class(**kwargs, db_name=self.db_name)

    def _call(self, what: str, call: Callable[[Any], T]) -> T:
        """call(client), retried on transient errors (a reconnect before each new attempt); permanent errors
        fail at once."""
        if self.is_lite:  # waiting for the turn is not part of the call's retry deadline
            hold_lite(self.uri, wait=True, log=get_dagster_logger())
        return call_with_retries(f"Milvus {what} ({self.uri}, collection {self.collection!r})",
                                 lambda: call(self.client()), self.retry_settings(), on_retry=self._forget_client,
                                 log=get_dagster_logger())

    def retry_settings(self) -> RetrySettings:
        return RetrySettings(attempts=self.retry_attempts, max_wait_s=self.retry_max_wait_s,
                             deadline_s=self.retry_deadline_s)

    def _forget_client(self) -> None:
        with _MILVUS_LOCK:
            client = _MILVUS_CLIENTS.pop((self.uri, env_value(self.token), self.db_name), None)
            _LOADED_COLLECTIONS.discard((self.uri, self.db_name, self.collection))
        if client is not None and "://" in self.uri:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - the connection is being replaced anyway
                pass

    def exists(self) -> bool:
        return bool(self._call("has_collection", lambda c: c.has_collection(self.collection)))

    def _loaded(self, client: Any) -> Any:
        """The client, with the collection loaded for search and query (a new process finds it released)."""
        key = (self.uri, self.db_name, self.collection)
        if key not in _LOADED_COLLECTIONS:
            client.load_collection(self.collection)
            _LOADED_COLLECTIONS.add(key)
        return client

    def loaded_client(self) -> Any:
        return self._call("load", self._loaded)

    def ensure_collection(self, dimension: int) -> None:
        self._call("create collection", lambda c: self._ensure_collection(c, dimension))

    def _ensure_collection(self, client: Any, dimension: int) -> None:
        from pymilvus import DataType, MilvusClient

        if client.has_collection(self.collection):
            described = client.describe_collection(self.collection)
            dims = [f.get("params", {}).get("dim") for f in described["fields"] if f["name"] == "vector"]
            if dims and int(dims[0]) != dimension:
                raise ConfigError(
                    f"Milvus collection {self.collection!r} holds {dims[0]}-d vectors but the model gives "
                    f"{dimension}-d: drop it or use another collection name")
            return
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dimension)
        schema.add_field("chunk_id", DataType.VARCHAR, max_length=4096)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=4096)
        schema.add_field("source", DataType.VARCHAR, max_length=512)
        schema.add_field("title", DataType.VARCHAR, max_length=8192)
        schema.add_field("text", DataType.VARCHAR, max_length=65535)
        schema.add_field("vector_key", DataType.VARCHAR, max_length=64)
        index_params = client.prepare_index_params()
        index_params.add_index(field_name="vector", index_type=self.index_type, metric_type="IP")
        client.create_collection(self.collection, schema=schema, index_params=index_params,
                                 consistency_level="Strong")

    def existing_keys(self, source: str | None = None) -> dict[int, str]:
        """{vector id: vector key} of what the collection holds (optionally for one source)."""
        return {vid: key for vid, key, _ in self.key_rows(_source_filter(source))}

    def iter_keys(self, source: str | None = None) -> list[tuple[int, str]]:
        """Every (vector id, vector key) row the collection holds, optionally for one source."""
        return [(vid, key) for vid, key, _ in self.key_rows(_source_filter(source))]

    def key_rows(self, expression: str = "", including: set[str] | None = None,
                 excluding: set[str] | None = None) -> list[tuple[int, str, str]]:
        """(vector id, vector key, source) of every row matching the filter (and of the included sources, or of
        every source but the excluded ones); read whole, so that a transient error restarts the listing
        rather than leaving it half read."""
        if including is not None:
            if not including:
                return []
            expression = f"source in [{', '.join(_quoted(s) for s in sorted(including))}]"
        expression = expression or _excluding_filter(excluding) or "id >= 0"
        if not self.exists():
            return []
        return self._call("list vectors", lambda c: list(self._keys(c, expression)))

    def _keys(self, client: Any, expression: str) -> Iterator[tuple[int, str, str]]:
        iterator = self._loaded(client).query_iterator(
            self.collection, batch_size=4096, filter=expression, output_fields=["id", "vector_key", "source"])
        try:
            while True:
                page = iterator.next()
                if not page:
                    break
                for row in page:
                    yield int(row["id"]), row["vector_key"], row["source"]
        finally:
            iterator.close()

    # -- exact marks: a digest per source, kept with the collection ---------------------------------------
    def exact_marks(self) -> dict[str, str]:
        """{source: digest of its (id, vector key) pairs} for each source whose last writer left it exact; a
        source written since (by anything that did not finish) has no mark."""
        if not self.exists():
            return {}
        described = self._call("describe", lambda c: c.describe_collection(self.collection))
        properties = described.get("properties") or {}
        return {k[len(EXACT_MARK):]: v for k, v in properties.items() if k.startswith(EXACT_MARK) and v}

    def mark_exact(self, source: str, expected: str) -> bool:
        """Mark a source exact if what the collection now holds of it is the expected set of (id, vector key)
        pairs: the collection itself is read, so a mark never records what a writer only meant to write.
        Returns whether it was marked."""
        held = KeyDigest().update((vid, key) for vid, key, _ in self.key_rows(_source_filter(source))).hexdigest()
        if held != expected:
            return False
        self._call("mark exact", lambda c: c.alter_collection_properties(
            self.collection, properties={f"{EXACT_MARK}{source}": expected}))
        return True

    def _unmark(self, sources: set[str] | None) -> None:
        """Before a write: the sources it touches (None: any) are no longer known to be exact. (Marks are
        emptied, not dropped: Milvus 2.3 cannot drop a collection property.)"""
        marked = set(self.exact_marks())
        stale = marked if sources is None else marked & sources
        if stale:
            self._call("unmark", lambda c: c.alter_collection_properties(
                self.collection, properties={f"{EXACT_MARK}{s}": "" for s in stale}))

    def upsert_rows(self, rows: list[dict[str, Any]]) -> int:
        """Upserts in requests of at most insert_batch_size rows and max_request_bytes bytes; an upsert is
        idempotent, so a retried request never duplicates."""
        if rows:
            self._unmark({row["source"] for row in rows})
        written = 0
        for batch in request_batches(rows, self.insert_batch_size, self.max_request_bytes):
            self._call("upsert", lambda c, b=batch: c.upsert(self.collection, b))
            written += len(batch)
        return written

    def delete_ids(self, ids: Iterable[int], sources: set[str] | None = None) -> int:
        """Deletes by id; `sources` names the sources the ids belong to, when known (their marks are dropped;
        otherwise every mark is)."""
        ids = list(ids)
        if ids:
            self._unmark(sources)
        for start in range(0, len(ids), 4096):
            part = ids[start:start + 4096]
            self._call("delete", lambda c, p=part: c.delete(self.collection, ids=p))
        return len(ids)

    def compact(self) -> None:
        """Merge segments and purge deleted rows (a server does the work; Milvus Lite compacts after every
        flush and answers at once)."""
        job = self._call("compact", lambda c: c.compact(self.collection))
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and self._call(
                "compaction state", lambda c: c.get_compaction_state(job)) not in ("Completed", "UndefiedState"):
            time.sleep(1)

    def count(self, source: str | None = None, excluding: set[str] | None = None) -> int:
        """Vectors held (of one source, or of every source but the excluded ones)."""
        expression = _source_filter(source) or _excluding_filter(excluding)
        result = self._call("count", lambda c: self._loaded(c).query(
            self.collection, filter=expression, output_fields=["count(*)"]))
        return int(result[0]["count(*)"])

    def search(self, queries: np.ndarray, k: int, source: str | None = None,
               fields: tuple[str, ...] = HIT_FIELDS) -> list[list[SearchHit]]:
        """The k nearest chunks of each query (at most Milvus's limit of 16384); of one source only when given.
        Hits carry the payload fields asked for (fetching fewer is faster)."""
        result = self._call("search", lambda c: self._loaded(c).search(
            self.collection, data=[q.tolist() for q in queries], limit=min(k, MILVUS_MAX_TOPK),
            filter=_source_filter(source), output_fields=list(fields), search_params={"metric_type": "IP"},
        ))
        return [[SearchHit(float(h["distance"]), int(h["id"]), *(h["entity"].get(c, "") for c in HIT_FIELDS))
                 for h in row] for row in result]


def row_bytes(row: dict[str, Any]) -> int:
    """What a row weighs in a request: 4 bytes a float, UTF-8 strings, and a little framing per field."""
    size = 0
    for value in row.values():
        if isinstance(value, str):
            size += len(value.encode("utf-8")) + 8
        elif isinstance(value, list | tuple):
            size += 4 * len(value) + 8
        else:
            size += 16
    return size


def request_batches(rows: list[dict[str, Any]], max_rows: int, max_bytes: int) -> Iterator[list[dict[str, Any]]]:
    """Consecutive slices of rows, each within both limits (a single oversized row goes alone)."""
    batch: list[dict[str, Any]] = []
    size = 0
    for row in rows:
        weight = row_bytes(row)
        if batch and (len(batch) >= max_rows or size + weight > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(row)
        size += weight
    if batch:
        yield batch


def _source_filter(source: str | None) -> str:
    return f"source == {_quoted(source)}" if source is not None else ""


def _excluding_filter(sources: set[str] | None) -> str:
    if not sources:
        return ""
    return f"source not in [{', '.join(_quoted(s) for s in sorted(sources))}]"


def _quoted(value: str) -> str:
    return f'"{_escape(value)}"'


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def rows_for_milvus(batch: pa.RecordBatch) -> Iterator[dict[str, Any]]:
    """Milvus rows of an embeddings batch; text is cut to the snippet length Milvus stores."""
    vectors = batch.column("vector").flatten().to_numpy().reshape(batch.num_rows, -1)
    columns = {name: batch.column(name).to_pylist() for name in PAYLOAD_COLUMNS}
    for i in range(batch.num_rows):
        yield {
            "id": columns["vector_id"][i],
            "vector": vectors[i].tolist(),
            "chunk_id": columns["chunk_id"][i],
            "doc_id": columns["doc_id"][i],
            "source": columns["source"][i],
            "title": columns["title"][i][:2000],
            "text": columns["text"][i][:SNIPPET_CHARS],
            "vector_key": columns["vector_key"][i],
        }


def close_milvus_clients(uri: str | None = None) -> None:
    """Release this process's Milvus connections (of one URI, or all); a Milvus Lite database is closed and
    its lock released, so that another process can open it (Lite admits one process at a time)."""
    with _MILVUS_LOCK:
        for key in [k for k in _MILVUS_CLIENTS if uri is None or k[0] == uri]:
            client = _MILVUS_CLIENTS.pop(key)
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
            if "://" not in key[0]:
                try:
                    from milvus_lite.server_manager import server_manager_instance

                    server_manager_instance.release_server(key[0])
                except Exception:  # noqa: BLE001 - an older milvus-lite, or nothing to release
                    pass
        for loaded in [k for k in _LOADED_COLLECTIONS if uri is None or k[0] == uri]:
            _LOADED_COLLECTIONS.discard(loaded)
        for path in [p for p in _LITE_LOCKS if uri is None or p == _lock_path(uri)]:
            lock = _LITE_LOCKS.pop(path)
            lock.release(force=True)


# Milvus Lite admits one process per database: processes take turns through a lock file beside it.
_LITE_LOCKS: dict[str, FileLock] = {}
_WAIT_LOG_EVERY_S = 30.0


def _lock_path(uri: str) -> str:
    return os.path.abspath(uri) + ".quiver-lock"


def lite_holder(uri: str) -> str:
    """Who holds a Milvus Lite database's lock, as its holder wrote it."""
    try:
        return UPath(_lock_path(uri) + ".holder").read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def hold_lite(uri: str, wait: bool, log: Any = None) -> bool:
    """Take this process's turn on a Milvus Lite database (re-entrant within the process). With wait, blocks
    for as long as another process works with it, logging who holds it every 30 s; without, returns False
    at once when it is taken."""
    path = _lock_path(uri)
    with _MILVUS_LOCK:
        lock = _LITE_LOCKS.get(path)
        if lock is not None and lock.is_locked:
            return True
        if lock is None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            lock = _LITE_LOCKS[path] = FileLock(path, thread_local=False)
    started = time.monotonic()
    timeout = 0.0
    while True:
        try:
            lock.acquire(timeout=timeout)
            break
        except Timeout:
            if not wait:
                return False
            (log or _log).info(f"waiting for the Milvus Lite database {uri}: another process holds it "
                               f"({lite_holder(uri)}), {time.monotonic() - started:.0f}s so far")
            timeout = _WAIT_LOG_EVERY_S
    command = " ".join(sys.argv)[:200]
    holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}: {command}"
    write_text_atomic(UPath(path + ".holder"), holder)
    if time.monotonic() - started > 1:
        (log or _log).info(f"took the Milvus Lite database {uri} after waiting {time.monotonic() - started:.0f}s")
    return True
