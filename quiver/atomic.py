"""Writes that are whole or absent: a temp file beside the target, flushed, then renamed over it.

Temp files are named `.tmp-*`: every reader of a directory skips them, and cleaners remove the ones a
dead writer left behind once they are old enough not to be in progress.
"""

import io
import os
import time
import uuid
from collections.abc import Iterable
from typing import Any

from upath import UPath

TEMP_PREFIX = ".tmp-"


def is_local(path: UPath) -> bool:
    return path.protocol in ("", "file", "local")


def is_temporary(path: UPath) -> bool:
    return path.name.startswith(TEMP_PREFIX)


def temp_path(target: UPath) -> UPath:
    """A temp file beside the target, in the same directory (so the rename is atomic)."""
    return target.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex}-{target.name}")


def flush_to_disk(handle: Any) -> None:
    """fsync a local file; an object store's file is durable once it is closed."""
    handle.flush()
    try:
        os.fsync(handle.fileno())
    except (AttributeError, OSError, io.UnsupportedOperation):
        pass


def atomic_replace(tmp: UPath, final: UPath) -> None:
    if is_local(tmp):
        os.replace(tmp.path, final.path)
    else:  # object stores: a single put is atomic; rename is copy + delete
        tmp.rename(final)


def write_bytes_atomic(path: UPath, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    with tmp.open("wb") as fh:
        fh.write(data)
        flush_to_disk(fh)
    atomic_replace(tmp, path)


def write_text_atomic(path: UPath, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def remove_stale_temporaries(entries: Iterable[UPath], older_than_s: float, now: float | None = None) -> int:
    """Deletes the temp files among entries that are older than a write in progress could be; returns how many."""
    now = time.time() if now is None else now
    removed = 0
    for entry in entries:
        if not is_temporary(entry):
            continue
        try:
            if now - float(entry.stat().st_mtime) > older_than_s and entry.is_file():
                entry.unlink()
                removed += 1
        except (OSError, AttributeError, KeyError, TypeError):
            continue
    return removed
