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
from typing import Any

from filelock import FileLock, Timeout
from upath import UPath

from quiver.atomic import write_text_atomic

_log = logging.getLogger("quiver.milvus")

CLIENTS: dict[tuple[str, str, str], Any] = {}
LOCK = threading.Lock()
LOADED_COLLECTIONS: set[tuple[str, str, str]] = set()


def close_milvus_clients(uri: str | None = None) -> None:
    """Release this process's Milvus connections (of one URI, or all); a Milvus Lite database is closed and
    its lock released, so that another process can open it (Lite admits one process at a time)."""
    with LOCK:
        for key in [k for k in CLIENTS if uri is None or k[0] == uri]:
            client = CLIENTS.pop(key)
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
        for loaded in [k for k in LOADED_COLLECTIONS if uri is None or k[0] == uri]:
            LOADED_COLLECTIONS.discard(loaded)
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
    with LOCK:
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
