"""The Milvus collection as a Dagster resource: Milvus Lite by default, a server by URI, token and TLS.

Every write clears the exact mark of the sources it touches first (a collection property per source,
`quiver.exact.<source>`, holding the digest of its ids and vector keys); `mark_exact` sets one only after
reading the collection back, so a mark always records what the collection held.
"""

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
from dagster import ConfigurableResource, InitResourceContext, get_dagster_logger
from pydantic import Field

from quiver.errors import BusyError, ConfigError, QuiverError
from quiver.retry import RetrySettings, call_with_retries
from quiver.settings import default_milvus_uri
from quiver.vectors import (
    HIT_FIELDS,
    MILVUS_MAX_REQUEST_BYTES,
    MILVUS_MAX_TOPK,
    PAYLOAD,
    SearchHit,
    request_batches,
    source_filter,
)
from resources.env import env_flag, env_value, from_env
from resources.milvus_clients import (
    client_for,
    close_milvus_clients,
    forget_client,
    forget_loaded,
    hold_lite,
    lite_holder,
    loaded,
)
from resources.milvus_keys import MilvusKeys

T = TypeVar("T")
_LITE_TURN_ENDED: dict[str, float] = {}  # Milvus Lite URI -> when this process's last brief turn on it ended
# Collection property prefix of the per-source exact marks (property value: that source's KeyDigest).
EXACT_MARK = "quiver.exact."


class MilvusStore(MilvusKeys, ConfigurableResource):
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
    key_page_rows: int = Field(default=4096, ge=1, le=16384, description="Most rows per page of a key listing "
                               "(and ids per lookup): what a listing holds in memory at once.")
    max_request_bytes: int = Field(default=16 * 2**20, ge=2**16, le=MILVUS_MAX_REQUEST_BYTES // 2,
                                   description="Most bytes per request, well under Milvus's 64 MB limit.")
    create_database: bool = Field(default=True, description="Create db_name on the server if it is missing.")
    secure: bool = Field(default_factory=env_flag("QUIVER_MILVUS_TLS"),
                         description="TLS to the server (QUIVER_MILVUS_TLS=1).")
    server_pem_path: str = Field(default_factory=from_env("QUIVER_MILVUS_TLS_SERVER_PEM"),
                                 description="The server's certificate, for one-way TLS.")
    server_name: str = Field(default_factory=from_env("QUIVER_MILVUS_TLS_SERVER_NAME"),
                             description="The name the server's certificate is issued to.")
    ca_pem_path: str = Field(default_factory=from_env("QUIVER_MILVUS_TLS_CA_PEM"),
                             description="The CA that signed the server's certificate (one-way TLS; with a client "
                                         "certificate and key, mutual TLS).")
    client_pem_path: str = Field(default_factory=from_env("QUIVER_MILVUS_TLS_CLIENT_PEM"),
                                 description="Client certificate, for mutual TLS.")
    client_key_path: str = Field(default_factory=from_env("QUIVER_MILVUS_TLS_CLIENT_KEY"),
                                 description="Client key, for mutual TLS.")
    retry_attempts: int = Field(default=6, ge=1, description="Attempts of a call that fails transiently.")
    retry_max_wait_s: float = Field(default=10.0, description="Longest wait between two attempts (exponential "
                                                              "backoff with jitter below it).")
    retry_deadline_s: float = Field(default=120.0, description="No new attempt after this long.")

    @property
    def is_lite(self) -> bool:
        return "://" not in self.uri

    def client(self) -> Any:
        """One client per process and URI. Milvus Lite admits one process per database: this process first
        takes the database's lock, waiting (and saying so in the log) as long as another process holds it."""
        key = (self.uri, env_value(self.token), self.db_name)
        if self.is_lite:
            hold_lite(self.uri, wait=True, log=get_dagster_logger())
        return client_for(key, self._connect)

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

    @contextmanager
    def brief_turn(self, wait_s: float, yield_s: float = 0.06) -> Iterator[None]:
        """A turn for a reader that must answer quickly (`quiver serve`): a Milvus Lite database is taken within
        wait_s (BusyError, naming its holder, otherwise) and given back at the end, so that a pipeline step waits
        for one request batch at most. A new turn starts `yield_s` after the last one ended at the soonest: a
        step waiting for the database polls its lock every 50 ms and gets in between. A server needs no turn."""
        if not self.is_lite:
            yield
            return
        time.sleep(max(0.0, _LITE_TURN_ENDED.get(self.uri, 0.0) + yield_s - time.monotonic()))
        deadline = time.monotonic() + wait_s
        while not hold_lite(self.uri, wait=False):
            if time.monotonic() >= deadline:
                raise BusyError(f"the Milvus Lite database {self.uri} is held by another process "
                                f"({lite_holder(self.uri)}); it admits one process at a time")
            time.sleep(0.02)
        try:
            yield
        finally:
            self.release()
            _LITE_TURN_ENDED[self.uri] = time.monotonic()

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

        # A connection of its own: pymilvus shares one per address and token otherwise, whatever the TLS settings,
        # so a client with another CA would ride on a connection that verified with the first one.
        kwargs: dict[str, Any] = {"uri": self.uri, "dedicated": True, **self._server_options()}
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
            if self.server_name:
                options["server_name"] = self.server_name
            if self.client_pem_path and self.client_key_path:  # mutual TLS: the CA, and this client's certificate
                options.update(ca_pem_path=self.ca_pem_path, client_pem_path=self.client_pem_path,
                               client_key_path=self.client_key_path)
            elif self.server_pem_path or self.ca_pem_path:  # one-way: what the server's certificate must verify by
                options["server_pem_path"] = self.server_pem_path or self.ca_pem_path
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
        forget_client((self.uri, env_value(self.token), self.db_name), self.collection)

    def drop(self) -> None:
        """Drop the collection (and forget that this process had it loaded)."""
        self._call("drop collection", lambda c: c.drop_collection(self.collection) if c.has_collection(
            self.collection) else None)
        forget_loaded(self.uri, self.db_name, self.collection)

    def exists(self) -> bool:
        return bool(self._call("has_collection", lambda c: c.has_collection(self.collection)))

    def _loaded(self, client: Any) -> Any:
        """The client, with the collection loaded for search and query (a new process finds it released)."""
        return loaded(client, self.uri, self.db_name, self.collection)

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
        for field in PAYLOAD[1:]:  # vector_id is the primary key "id"
            schema.add_field(field.name, DataType.VARCHAR, max_length=field.max_bytes)
        index_params = client.prepare_index_params()
        index_params.add_index(field_name="vector", index_type=self.index_type, metric_type="IP")
        client.create_collection(self.collection, schema=schema, index_params=index_params,
                                 consistency_level="Strong")

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
        if self.held_digest(source) != expected:
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

    def compact(self, timeout_s: float = 600) -> str:
        """Merge segments and purge deleted rows, and wait for it: returns the compaction's final state
        ("Completed"; Milvus Lite compacts after every flush and answers at once)."""
        job = self._call("compact", lambda c: c.compact(self.collection))
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            state = str(self._call("compaction state", lambda c: c.get_compaction_state(job)))
            if state in ("Completed", "UndefiedState"):
                break
            time.sleep(1)
        return state

    def count(self, source: str | None = None, excluding: set[str] | None = None) -> int:
        """Vectors held (of one source, or of every source but the excluded ones)."""
        expression = source_filter(source, excluding=excluding)
        result = self._call("count", lambda c: self._loaded(c).query(
            self.collection, filter=expression, output_fields=["count(*)"]))
        return int(result[0]["count(*)"])

    def search(self, queries: np.ndarray, k: int, source: str | None = None,
               fields: tuple[str, ...] = HIT_FIELDS) -> list[list[SearchHit]]:
        """The k nearest chunks of each query (at most Milvus's limit of 16384); of one source only when given.
        Hits carry the payload fields asked for (fetching fewer is faster)."""
        result = self._call("search", lambda c: self._loaded(c).search(
            self.collection, data=[q.tolist() for q in queries], limit=min(k, MILVUS_MAX_TOPK),
            filter=source_filter(source), output_fields=list(fields), search_params={"metric_type": "IP"},
        ))
        return [[SearchHit(float(h["distance"]), int(h["id"]), *(h["entity"].get(c, "") for c in HIT_FIELDS))
                 for h in row] for row in result]
