"""An idle connection to each SQLite file of the instance that a run writes, held for as long as the run.

The embedded default instance keeps its runs and events in SQLite files in WAL mode, and Dagster opens and
closes a connection for every event it stores (about 70 for a small run, several connections each). The
connection that closes last checkpoints the write-ahead log into the database and deletes it: two or three
fsyncs and a file created and removed again for every event, about 10 ms each here, which is not work. While
another connection to the file is open, a closing one is not the last, and the log is checkpointed only when it
grows past SQLite's threshold, or when the held connection itself closes at the run's end. Nothing is written
differently, and no durability is given up (each commit is as synchronous as before). An instance on Postgres
(or any other storage) is left alone.
"""

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from typing import Any

from sqlalchemy.engine import make_url

INDEX_SHARD = "index"  # SqliteEventLogStorage's cross-run shard (dagster's INDEX_SHARD_NAME)


def _sqlite_file(conn_string: str | None) -> str | None:
    if not conn_string:
        return None
    url = make_url(conn_string)
    return url.database if url.get_backend_name() == "sqlite" and url.database else None


def instance_sqlite_files(instance: Any, run_id: str | None) -> list[str]:
    """The SQLite files a run of this instance writes that exist now: the run storage, the event log's index
    shard and, given a run id, that run's own shard. Empty for an instance not on SQLite."""
    files: list[str | None] = []
    events = getattr(instance, "event_log_storage", None)
    path_for_shard = getattr(events, "path_for_shard", None)
    if callable(path_for_shard):  # SqliteEventLogStorage: a file per run, and the index shard
        files.append(path_for_shard(INDEX_SHARD))
        if run_id:
            files.append(path_for_shard(run_id))
    files.append(_sqlite_file(getattr(getattr(instance, "run_storage", None), "_conn_string", None)))
    return [f for f in dict.fromkeys(files) if f and os.path.isfile(f)]


@contextlib.contextmanager
def sqlite_files_held(instance: Any, run_id: str | None = None) -> Iterator[list[str]]:
    """Holds an idle connection to each of the instance's SQLite files a run writes (instance_sqlite_files)
    until the block ends; yields the files held. A file that cannot be opened is simply not held."""
    held: list[tuple[str, sqlite3.Connection]] = []
    for path in instance_sqlite_files(instance, run_id):
        try:
            connection = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=0.1, check_same_thread=False)
            # One read enters WAL mode and takes the shared lock that tells a closing connection it is not the
            # last; it ends at once (no transaction stays open, so nothing holds a checkpoint back).
            connection.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        except sqlite3.Error:
            continue
        held.append((path, connection))
    try:
        yield [path for path, _ in held]
    finally:
        for _, connection in held:
            with contextlib.suppress(sqlite3.Error):
                connection.close()
