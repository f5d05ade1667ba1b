"""Hot swap: the served FAISS version follows the store's CURRENT pointer.

A thread reads CURRENT every `poll_s`; a new version is opened and checked in that thread, away from the
requests, then made the served one in a single assignment. A batch takes the served version for its whole run
(`use`), so requests in flight finish on the version they started on; a replaced version is closed once its
last batch is done. A version that cannot be opened is tried again with a growing pause; one that fails its
check (another model) is never served, and the one before stays.
"""

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from quiver.errors import QuiverError
from quiver.serving.requests import ServeError


class VersionStore(Protocol):
    """What the watcher needs of a versioned store (resources/faiss_store.FaissStore)."""

    directory: str

    def current_version(self) -> str | None: ...

    def open_version(self, version: str) -> Any: ...


class RefusedVersion(QuiverError):
    """A complete version that must not be served (its vectors come from another model)."""


@dataclass
class ServedVersion:
    """An opened version and the batches that use it."""

    name: str
    index: Any  # a FaissVersion: search(), manifest, payload
    sources: frozenset[str]
    opened_at: float
    open_seconds: float
    users: int = 0
    retired: bool = False
    closed: bool = False

    @property
    def vectors(self) -> int:
        return int(self.index.index.ntotal) if self.index is not None else 0


@dataclass
class _Failure:
    attempts: int = 0
    retry_at: float = 0.0
    message: str = ""


Listener = Callable[[str, dict[str, Any]], None]


@dataclass
class IndexWatcher:
    store: VersionStore
    check: Callable[[str, Any], None] = lambda name, opened: None  # raises RefusedVersion
    poll_s: float = 0.5
    listener: Listener = lambda event, facts: None
    _current: ServedVersion | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _refused: dict[str, str] = field(default_factory=dict)
    _failures: dict[str, _Failure] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    problem: str | None = None  # why the newest version is not served (None: it is)

    @property
    def current(self) -> ServedVersion | None:
        return self._current

    def refresh(self) -> bool:
        """Serve the version CURRENT names if it is new, openable and passes the check; whether it swapped."""
        try:
            name = self.store.current_version()
        except OSError as exc:
            self.problem = f"cannot read the FAISS CURRENT pointer under {self.store.directory}: {exc}"
            return False
        if name is None:
            self.problem = f"no FAISS index under {self.store.directory} yet: materialize faiss_index first"
            return False
        served = self._current
        if served is not None and served.name == name:
            self.problem = None
            return False
        if name in self._refused:
            self.problem = self._refused[name]
            return False
        failure = self._failures.get(name)
        if failure is not None and time.monotonic() < failure.retry_at:
            return False
        started = time.perf_counter()
        try:
            opened = self.store.open_version(name)
            self.check(name, opened)
            _ = opened.row_of  # built here, not by the first request
            sources = frozenset(opened.payload.column("source").unique().to_pylist())
        except RefusedVersion as exc:
            self._refused[name] = self.problem = str(exc)
            self.listener("refused", {"version": name, "reason": str(exc)})
            return False
        except Exception as exc:  # noqa: BLE001 - a version being pruned or damaged: the served one stays
            failure = self._failures.setdefault(name, _Failure())
            failure.attempts += 1
            failure.retry_at = time.monotonic() + min(30.0, self.poll_s * 2 ** failure.attempts)
            failure.message = self.problem = f"cannot open FAISS version {name}: {type(exc).__name__}: {exc}"
            self.listener("failed", {"version": name, "reason": failure.message})
            return False
        fresh = ServedVersion(name, opened, sources, time.time(), time.perf_counter() - started)
        self._swap(fresh)
        self._failures.pop(name, None)
        self.problem = None
        return True

    def _swap(self, fresh: ServedVersion) -> None:
        with self._lock:
            old, self._current = self._current, fresh
            close_now = old is not None and old.users == 0
            if old is not None:
                old.retired = True
        self.listener("swap", {"version": fresh.name, "previous": old.name if old else None,
                               "vectors": fresh.vectors, "open_seconds": fresh.open_seconds})
        if close_now:
            assert old is not None
            self._close(old)

    def _close(self, version: ServedVersion) -> None:
        version.closed = True
        version.index = None  # the index and payload are freed with their last reference
        self.listener("closed", {"version": version.name})

    @contextmanager
    def use(self) -> Iterator[ServedVersion]:
        """The served version, kept open until the block ends even if another replaces it meanwhile."""
        with self._lock:
            version = self._current
            if version is None:
                raise ServeError(503, f"no FAISS index is being served: {self.problem or 'not opened yet'}",
                                 {"Retry-After": "5"})
            version.users += 1
        try:
            yield version
        finally:
            with self._lock:
                version.users -= 1
                close = version.retired and version.users == 0 and not version.closed
            if close:
                self._close(version)

    def start(self) -> None:
        """Poll CURRENT in a daemon thread until `stop`."""
        self._thread = threading.Thread(target=self._loop, name="quiver-index-watcher", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - the watcher must outlive any one bad poll
                self.problem = f"watching the FAISS index failed: {type(exc).__name__}: {exc}"
                self.listener("failed", {"version": None, "reason": self.problem})

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def model_mismatch(version: str, manifest: dict[str, Any], fingerprint: str, model: str) -> str | None:
    """Why a version's vectors cannot be searched with queries encoded by this model (None: they can). The
    manifest records the fingerprints of the models that made its vectors."""
    found = manifest.get("model_fingerprints")
    if found is None or "" in found:
        return (f"FAISS version {version} does not record the model its vectors were made with (built before "
                "Quiver recorded it): run `quiver run` to write a version that does")
    if found and found != [fingerprint]:
        return (f"FAISS version {version} holds vectors of model fingerprint {', '.join(found)}, but this server's "
                f"model ({model}) has fingerprint {fingerprint}: its queries would be encoded differently from the "
                "chunks. Serve with the settings the pipeline ran with (QUIVER_MODEL, QUIVER_MODEL_BACKEND, "
                "QUIVER_MODEL_QUANTIZATION), or rebuild the index with this model")
    return None
