"""What is in an inbox directory: each entry (a JSONL or Parquet file, or a directory of text files or a
BEIR dataset) is a source.

A scan separates entries that are settled (safe to ingest) from entries that are present but still being
written or unreadable: only an entry that is gone from a present, readable inbox counts as removed. An
inbox that is missing, is not a directory or cannot be listed is an error, never an empty inbox: an
unmounted or renamed directory must not read as "every source was deleted".
"""

import os
import re
import time
from dataclasses import dataclass, field

from upath import UPath

from quiver.errors import InputError, QuiverError
from quiver.names import SOURCE_NAME
from quiver.sources import FILE_SUFFIXES, detect_kind, source_fingerprint

# Names of files still being written by a downloader or an editor: never sources.
IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", "~", ".swp")


class InboxUnavailableError(QuiverError):
    """The inbox directory is missing, not a directory, or cannot be listed: nothing can be concluded."""


@dataclass(frozen=True)
class InboxEntry:
    name: str
    kind: str
    path: str
    fingerprint: str


@dataclass
class InboxScan:
    """One look at the inbox: settled entries by source name, and every source name that is present at all
    (settled, still being written, or unreadable), so that only a name absent from `present` is removed."""

    settled: dict[str, InboxEntry] = field(default_factory=dict)
    present: set[str] = field(default_factory=set)
    settling: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)  # name -> why


def source_name(entry_name: str) -> str | None:
    """The source name of an inbox entry: its name without the source suffix, in the allowed characters."""
    lowered = entry_name.lower()
    stem = entry_name
    for suffix in FILE_SUFFIXES:
        if lowered.endswith(suffix):
            stem = entry_name[: -len(suffix)]
            break
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", stem).strip("-.")[:64]
    return name if SOURCE_NAME.match(name) else None


def _newest_mtime(entry: UPath) -> float:
    if not entry.is_dir():
        return float(entry.stat().st_mtime)
    return max((p.stat().st_mtime for p in entry.rglob("*") if p.is_file()), default=entry.stat().st_mtime)


def list_inbox(directory: str) -> list[UPath]:
    """The inbox's entries; InboxUnavailableError when the directory cannot be trusted to show them."""
    root = UPath(directory)
    try:
        if not root.exists():
            raise InboxUnavailableError(f"the inbox {directory} does not exist (unmounted, renamed or mistyped?)")
        if not root.is_dir():
            raise InboxUnavailableError(f"the inbox {directory} is not a directory")
        if root.protocol in ("", "file", "local") and not os.access(root.path, os.R_OK | os.X_OK):
            raise InboxUnavailableError(f"the inbox {directory} cannot be read (permissions)")
        return sorted(root.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        raise InboxUnavailableError(f"the inbox {directory} cannot be listed: {exc}") from exc


def scan_inbox(directory: str, settle_seconds: float, now: float | None = None) -> InboxScan:
    """The sources in the inbox; entries changed in the last `settle_seconds` are still settling."""
    now = time.time() if now is None else now
    scan = InboxScan()
    for entry in list_inbox(directory):
        if entry.name.startswith(".") or entry.name.endswith(IGNORED_SUFFIXES):
            continue
        name = source_name(entry.name)
        if name is None:
            continue
        try:
            kind = detect_kind(str(entry))
        except InputError as exc:
            if exc.problem.startswith("cannot tell"):
                continue  # not a kind of source (a stray file): neither a source nor a removal
            scan.present.add(name)  # there, but not readable now (a broken link, a vanished mount below it)
            scan.unreadable[name] = str(exc)
            continue
        except OSError as exc:
            scan.present.add(name)
            scan.unreadable[name] = f"{entry}: {exc}"
            continue
        if kind == "stdlib":
            continue
        scan.present.add(name)
        try:
            if now - _newest_mtime(entry) < settle_seconds:
                scan.settling.append(name)
                continue
            fingerprint = source_fingerprint(kind, str(entry))
        except (OSError, QuiverError) as exc:
            scan.unreadable[name] = f"{entry}: {exc}"
            continue
        scan.settled[name] = InboxEntry(name, kind, str(entry), fingerprint)
    return scan
