"""Milvus connections of this process, and the turns processes take on a Milvus Lite database.

One client per process and URI (a connection pool must not cross a fork). Milvus Lite admits one process
per database, so processes take turns through a lock file beside it: a step that needs the database waits
for as long as the holder works, logging who holds it; one that can defer its writes asks without waiting.
"""

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from filelock import FileLock, Timeout
from upath import UPath

from quiver.atomic import write_text_atomic

_log = logging.getLogger("quiver.milvus")

_CLIENTS: dict[tuple[str, str, str], Any] = {}
_LOCK = threading.Lock()
_LOADED: set[tuple[str, str, str]] = set()  # (uri, database, collection) this process has loaded


def client_for(key: tuple[str, str, str], connect: Callable[[], Any]) -> Any:
    """This process's client for (uri, token, database), connected on first use."""
    with _LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            client = _CLIENTS[key] = connect()
        return client


def forget_client(key: tuple[str, str, str], collection: str) -> None:
    """Drop a client that failed (a reconnect follows); a server's connection is closed."""
    with _LOCK:
        client = _CLIENTS.pop(key, None)
        _LOADED.discard((key[0], key[2], collection))
    if client is not None and "://" in key[0]:
        try:
            client.close()
        except Exception:  # noqa: BLE001 - the connection is being replaced anyway
            pass


def loaded(client: Any, uri: str, database: str, collection: str) -> Any:
    """The client, with the collection loaded for search and query once per process (a new one finds it
    released)."""
    key = (uri, database, collection)
    if key not in _LOADED:
        client.load_collection(collection)
        with _LOCK:
            _LOADED.add(key)
    return client


def forget_loaded(uri: str, database: str, collection: str) -> None:
    with _LOCK:
        _LOADED.discard((uri, database, collection))


def close_milvus_clients(uri: str | None = None) -> None:
    """Release this process's Milvus connections (of one URI, or all); a Milvus Lite database is closed and
    its lock released, so that another process can open it (Lite admits one process at a time)."""
    with _LOCK:
        for key in [k for k in _CLIENTS if uri is None or k[0] == uri]:
            client = _CLIENTS.pop(key)
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
        for done in [k for k in _LOADED if uri is None or k[0] == uri]:
            _LOADED.discard(done)
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
    with _LOCK:
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
