"""`quiver serve`: the search service, a FastAPI app on uvicorn, over the same resources the pipeline writes.

The model is the model pool's, loaded once in this process (the pipeline's fingerprint, so a query is encoded
as the chunks were); queries are micro-batched (quiver/serving/batching.py); the FAISS version served follows
CURRENT (quiver/serving/watcher.py); Milvus is read through the Milvus store resource.
"""

import asyncio
import hmac
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from quiver.errors import BusyError
from quiver.serving.batching import BatchSettings, MicroBatcher
from quiver.serving.engine import SearchEngine
from quiver.serving.metrics import ServerMetrics
from quiver.serving.requests import FIELDS, Limits, SearchRequest, ServeError, parse_search
from quiver.serving.watcher import IndexWatcher, RefusedVersion, model_mismatch
from quiver.vectors import SearchHit

log = logging.getLogger("quiver.serve")
REGISTRY_TTL_S = 5.0  # how long the list of registered sources is reused


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8765
    batching: BatchSettings = field(default_factory=BatchSettings)
    limits: Limits = field(default_factory=Limits)
    poll_s: float = 0.5
    milvus_wait_s: float = 2.0
    token: str | None = None
    access_log: bool = False
    log_level: str = "info"


@dataclass
class MilvusReader:
    """The Milvus store resource as the engine reads it: brief turns on a Milvus Lite database, and errors as
    503s that say what to do."""

    store: Any  # resources.milvus_store.MilvusStore
    wait_s: float

    @property
    def name(self) -> str:
        return f"{self.store.collection} at {self.store.uri}"

    @contextmanager
    def turn(self) -> Iterator[None]:
        try:
            with self.store.brief_turn(self.wait_s):
                yield
        except BusyError as exc:
            raise ServeError(503, f"{exc}: ask again soon, or serve from a Milvus server (QUIVER_MILVUS_URI)",
                             {"Retry-After": "2"}) from exc

    def search(self, queries: np.ndarray, k: int, source: str | None) -> list[list[SearchHit]]:
        try:
            return self.store.search(queries, k, source)
        except Exception as exc:  # noqa: BLE001 - said to the client as what it is
            try:
                missing = not self.store.exists()
            except Exception:  # noqa: BLE001
                missing = False
            if missing:
                raise ServeError(503, f"no Milvus collection {self.name} yet: materialize milvus_collection "
                                      "first") from exc
            raise ServeError(503, f"Milvus search failed ({self.name}): {type(exc).__name__}: {exc}") from exc


class Service:
    """The model, the served index, the batcher and the metrics of one server process."""

    def __init__(self, settings: ServeSettings, resources: dict[str, Any]) -> None:
        self.settings = settings
        # One forward pass per micro-batch: the pool's batch is as large as the largest batch.
        self.pool = resources["model_pool"].model_copy(
            update={"batch_size": max(settings.batching.max_batch, settings.limits.max_queries)})
        self.fingerprint = self.pool.fingerprint()
        self.faiss_store = resources["faiss_store"]
        self.registry = resources["sources"]
        self.metrics = ServerMetrics()
        self.watcher = IndexWatcher(self.faiss_store, check=self._check_model, poll_s=settings.poll_s,
                                    listener=self._on_index_event)
        milvus = resources["milvus"].model_copy(update={"retry_attempts": 2, "retry_deadline_s": 5.0})
        self.engine = SearchEngine(self.pool.encode, self.watcher, MilvusReader(milvus, settings.milvus_wait_s),
                                   self._registered_sources)
        self.batcher: MicroBatcher[SearchRequest, dict[str, Any]] = MicroBatcher(
            self.engine.run_batch, settings.batching, size=lambda r: len(r.queries), on_batch=self._on_batch)
        self.model_ready = False
        self.model_problem: str | None = None
        self.threads: dict[str, Any] = {}  # how the model computes, once loaded (/readyz)
        self._registered: tuple[float, set[str]] = (0.0, set())

    @property
    def model(self) -> str:
        return f"{self.pool.model}, backend {self.pool.backend}"

    # -- loading and watching -----------------------------------------------------------------------
    def load(self) -> None:
        """Load the model (and warm it), open the index, then watch CURRENT; /readyz says when it is done."""
        self.watcher.refresh()  # the index opens without the model: /readyz says at once if there is none
        if self.watcher.problem:
            log.warning(f"not ready yet: {self.watcher.problem}")
        self.watcher.start()
        started = time.perf_counter()
        try:
            self.pool.loaded()
            # Every batch encodes with the model this server's fingerprint names, found once here.
            self.engine.encode = self.pool.encoder(self.fingerprint)
            self.engine.encode(["warm up"])
        except Exception as exc:  # noqa: BLE001 - the server stays up, not ready, and says why
            self.model_problem = f"the model could not be loaded: {type(exc).__name__}: {exc}"
            log.error(self.model_problem)
            return
        from resources.model_state import pool_facts

        self.threads = {"model_threads": pool_facts(self.pool, self.pool.loaded_state())["model_threads"],
                        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
        self.model_ready = True
        log.info(f"model {self.model} loaded in {time.perf_counter() - started:.1f}s ({self.threads})")
        self._update_ready()

    def _check_model(self, version: str, opened: Any) -> None:
        problem = model_mismatch(version, opened.manifest, self.fingerprint, self.model)
        if problem:
            raise RefusedVersion(problem)

    def _on_index_event(self, event: str, facts: dict[str, Any]) -> None:
        self.metrics.on_index_event(event, facts)
        if event == "swap":
            was = f" in place of {facts['previous']}" if facts["previous"] else ""
            log.info(f"serving FAISS version {facts['version']} ({facts['vectors']} vectors, opened in "
                     f"{facts['open_seconds']:.2f}s){was}")
        elif event in ("failed", "refused"):
            log.error(f"FAISS version {facts['version']} not served: {facts['reason']}")
        elif event == "closed":
            log.info(f"closed FAISS version {facts['version']}: its last batch is done")
        self._update_ready()

    def _on_batch(self, requests: list[SearchRequest], seconds: float) -> None:
        self.metrics.on_batch(len(requests), sum(len(r.queries) for r in requests), seconds)

    def _update_ready(self) -> None:
        self.metrics.ready.set(1 if not self.not_ready() else 0)

    def _registered_sources(self) -> set[str]:
        at, names = self._registered
        if time.monotonic() - at > REGISTRY_TTL_S:
            names = {spec.name for spec in self.registry.all()}
            self._registered = (time.monotonic(), names)
        return names

    def not_ready(self) -> list[str]:
        """Why the service cannot answer yet (empty: ready)."""
        reasons = []
        if not self.model_ready:
            reasons.append(self.model_problem or f"the model ({self.model}) is loading")
        if self.watcher.current is None:
            reasons.append(self.watcher.problem or "the FAISS index is not open yet")
        return reasons

    # -- requests ------------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        """A bearer token, compared in constant time, when the server has one."""
        token = self.settings.token
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ServeError(401, "this server needs a bearer token: send the header Authorization: Bearer <token>",
                             {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise ServeError(401, "the bearer token is not valid", {"WWW-Authenticate": 'Bearer error="invalid_token"'})

    async def search(self, request: Request) -> Response:
        started = time.perf_counter()
        store = "none"  # until the request says
        try:
            self.authorize(request)
            asked = parse_search(await _read_body(request, self.settings.limits.max_body_bytes), self.settings.limits)
            store = asked.store
            if not self.model_ready:
                raise ServeError(503, f"not ready: {'; '.join(self.not_ready())}", {"Retry-After": "5"})
            answer = await self.batcher.submit(asked)
            answer["took_ms"] = round((time.perf_counter() - started) * 1000, 3)
            response: Response = JSONResponse(answer)
            self.metrics.queries.labels(store=store).inc(len(asked.queries))
        except ServeError as exc:
            response = self.error(exc)
        except Exception as exc:  # noqa: BLE001 - logged here with its traceback; the client gets no traceback
            log.exception("search failed")
            self.metrics.errors.labels(kind="internal").inc()
            response = JSONResponse({"error": f"internal error ({type(exc).__name__}); see the server's log"}, 500)
        self.metrics.requests.labels(store=store, status=str(response.status_code)).inc()
        self.metrics.latency.labels(store=store).observe(time.perf_counter() - started)
        return response

    def error(self, exc: ServeError) -> Response:
        kind = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                413: "too_large", 422: "invalid", 503: "unavailable"}.get(exc.status, "other")
        self.metrics.errors.labels(kind=kind).inc()
        return JSONResponse({"error": exc.message}, exc.status, headers=exc.headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 past the limit before more of it is read."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise ServeError(413, f"the body is {length} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServeError(413, f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


SEARCH_SCHEMA = {"type": "object", "additionalProperties": False, "properties": {
    "query": {"type": "string"}, "queries": {"type": "array", "items": {"type": "string"}},
    "k": {"type": "integer", "minimum": 1, "default": 5}, "source": {"type": "string"},
    "store": {"enum": ["faiss", "milvus"], "default": "faiss"},
    "documents": {"type": "boolean", "default": False, "description": "documents (each shown by its best chunk) "
                  "instead of chunks"},
    "aggregation": {"enum": ["max", "sum", "mean"], "default": "max"}}}
assert set(SEARCH_SCHEMA["properties"]) == set(FIELDS)  # type: ignore[arg-type]


def create_app(service: Service) -> FastAPI:
    """The HTTP API: POST /search, GET /healthz, /readyz and /metrics; every error is JSON {"error": ...}."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.batcher.start()
        loading = threading.Thread(target=service.load, name="quiver-model-load", daemon=True)
        loading.start()
        yield
        service.watcher.stop()
        await service.batcher.stop()
        await asyncio.to_thread(service.engine.milvus.store.release)

    app = FastAPI(title="Quiver search", lifespan=lifespan,
                  description="Searches the FAISS index and the Milvus collection the Quiver pipeline keeps fresh.")

    @app.post("/search", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": SEARCH_SCHEMA}}}})
    async def search(request: Request) -> Response:
        """The k best chunks (or documents) of each query, and the index version that answered."""
        return await service.search(request)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is alive (it may still be loading)."""
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> Response:
        """200 once the model is loaded and an index is open; 503, with the reasons, before."""
        reasons = service.not_ready()
        served = service.watcher.current
        facts: dict[str, Any] = {"model": service.model, "model_fingerprint": service.fingerprint,
                                 "index_version": served.name if served else None,
                                 "vectors": served.vectors if served else 0, **service.threads}
        if service.watcher.problem and not reasons:
            facts["newest_version_problem"] = service.watcher.problem
        if reasons:
            return JSONResponse({"status": "not ready", "reasons": reasons, **facts}, 503)
        return JSONResponse({"status": "ready", **facts})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        """Prometheus text format."""
        try:
            service.authorize(request)
        except ServeError as exc:
            return service.error(exc)
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: f"no such path {request.url.path}: the API is POST /search, GET /healthz, /readyz and "
                        "/metrics", 405: f"{request.method} is not allowed on {request.url.path}"}
        return service.error(ServeError(exc.status_code, message.get(exc.status_code, str(exc.detail)),
                                        dict(exc.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        return service.error(ServeError(422, "; ".join(str(e.get("msg")) for e in exc.errors())))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> Response:
        service.metrics.errors.labels(kind="internal").inc()
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the server's log"}, 500)

    return app
