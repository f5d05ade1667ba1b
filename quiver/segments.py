"""The embedding cache's disk level: immutable segment files of (text hash -> vector entry), bounded in bytes.

A segment holds a header, its keys (sha256 of the texts, sorted) and then the entries in key order; it is
written once, through a temp file and a rename, and never changed. A lookup searches the sorted keys of
each segment (memory-mapped when local, so a large cache costs address space, not memory). The directory
is looked at again at most every `refresh_interval_s` (a miss is never wrong, only slower), and listed again only
when it changed: locally, its modification time says so in one stat, so a miss costs O(1), not a listing of
every segment; this process's own writes are added without a listing, and a full listing is still made every
`relist_interval_s` (an object store, which has no directory times, is listed each time). Temp files are
never read. Small segments (one per batch of misses) are merged once there are many, and the oldest
segments are evicted while the total passes `max_bytes`; one process at a time does that maintenance.
"""

import logging
import os
import struct
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from filelock import FileLock, Timeout
from upath import UPath

from quiver.atomic import atomic_replace, flush_to_disk, is_local, is_temporary, remove_stale_temporaries, temp_path

SEGMENT_SUFFIX = ".qvseg"
MAGIC_UNSORTED = b"QVSEG001"  # an earlier layout: keys in the order written
MAGIC = b"QVSEG002"  # keys sorted, entries in key order
HEADER = struct.Struct("<8sII")  # magic, dimension, count
KEY = np.dtype("S32")
_log = logging.getLogger("quiver.segments")


@dataclass
class Segment:
    name: str
    keys: np.ndarray  # sorted text hashes
    rows: np.ndarray | None  # entry row of each sorted key; None when entries are in key order
    count: int
    size: int

    @property
    def base(self) -> int:
        return HEADER.size + 32 * self.count

    def find(self, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in wanted, entry rows here) of the wanted keys this segment holds."""
        at = np.searchsorted(self.keys, wanted)
        at = np.minimum(at, self.count - 1)
        hit = self.keys[at] == wanted
        rows = at[hit] if self.rows is None else self.rows[at[hit]]
        return np.nonzero(hit)[0], rows


@dataclass
class MaintenanceReport:
    merged_segments: int = 0
    evicted_segments: int = 0
    evicted_bytes: int = 0
    removed_temporaries: int = 0


class SegmentStore:
    """One model's (fingerprint's) segments in one directory."""

    def __init__(self, directory: UPath, dimension: int, entry_size: int, *, max_bytes: int = 8 * 2**30,
                 refresh_interval_s: float = 5.0, merge_at_segments: int = 16, small_segment_entries: int = 4096,
                 stale_temp_after_s: float = 3600.0, relist_interval_s: float = 60.0) -> None:
        self.directory = directory
        self.dimension = dimension
        self.entry_size = entry_size
        self.max_bytes = max_bytes
        self.refresh_interval_s = refresh_interval_s
        self.merge_at_segments = merge_at_segments
        self.small_segment_entries = small_segment_entries
        self.stale_temp_after_s = stale_temp_after_s
        self.relist_interval_s = relist_interval_s
        self._segments: dict[str, Segment] = {}
        self._listed_at = float("-inf")  # when the directory was last looked at
        self._relisted_at = float("-inf")  # when it was last listed
        self._stamp: int | None = None  # its modification time then (None: unknown, list it)
        self.listings = 0  # directory listings made (a test's and a benchmark's counter)
        self._lock = threading.Lock()

    # -- reading -----------------------------------------------------------------------------------------
    def _open(self, name: str) -> Segment | None:
        path = self.directory / name
        try:
            size = int(path.stat().st_size)
            with path.open("rb") as fh:
                magic, dim, count = HEADER.unpack(fh.read(HEADER.size))
                if magic not in (MAGIC, MAGIC_UNSORTED) or dim != self.dimension or count == 0:
                    return None  # not ours, or of another dimension: its entries simply miss
                if size != HEADER.size + count * (32 + self.entry_size):
                    return None  # truncated
                if is_local(path) and magic == MAGIC:
                    keys = np.memmap(path.path, dtype=KEY, mode="r", offset=HEADER.size, shape=(count,))
                else:
                    keys = np.frombuffer(fh.read(32 * count), dtype=KEY)
        except (OSError, struct.error, ValueError):
            return None
        if magic == MAGIC:
            return Segment(name, keys, None, count, size)
        order = np.argsort(keys, kind="stable")
        return Segment(name, keys[order], order, count, size)

    def refresh(self, force: bool = False) -> list[UPath]:
        """See segments other processes wrote (and forget removed ones), at most every refresh_interval_s.
        Returns the directory's entries when it was listed now (else [])."""
        with self._lock:
            now = time.monotonic()
            if not force and now - self._listed_at < self.refresh_interval_s:
                return []
            self._listed_at = now
            stamp = self._directory_stamp()
            if (not force and stamp is not None and stamp == self._stamp
                    and now - self._relisted_at < self.relist_interval_s):
                return []  # unchanged since the last listing (or changed only by this process's own writes)
            self._stamp, self._relisted_at = stamp, now
            self.listings += 1
            try:
                entries = list(self.directory.iterdir())
            except (FileNotFoundError, NotADirectoryError):
                entries = []
            names = {p.name for p in entries if p.name.endswith(SEGMENT_SUFFIX) and not is_temporary(p)}
            for gone in set(self._segments) - names:
                del self._segments[gone]
            for name in sorted(names - set(self._segments)):
                segment = self._open(name)
                if segment is not None:
                    self._segments[name] = segment
            return entries

    def get_many(self, text_shas: Sequence[bytes]) -> dict[int, bytes]:
        """Raw entries found for the given text hashes, by position (to be verified by the caller)."""
        if not text_shas:
            return {}
        self.refresh()
        wanted = np.array(list(text_shas), dtype=KEY)
        pending = np.arange(len(wanted))
        found: dict[int, bytes] = {}
        with self._lock:
            segments = sorted(self._segments.values(), key=lambda s: s.name, reverse=True)  # newest first
        for segment in segments:
            if not len(pending):
                break
            positions, rows = segment.find(wanted[pending])
            if not len(positions):
                continue
            try:
                with (self.directory / segment.name).open("rb") as fh:
                    for position, row in sorted(zip(pending[positions].tolist(), rows.tolist(), strict=True),
                                                key=lambda pr: pr[1]):
                        fh.seek(segment.base + row * self.entry_size)
                        found[position] = fh.read(self.entry_size)
            except OSError:
                with self._lock:  # merged or evicted meanwhile: list again next time
                    self._listed_at, self._stamp = float("-inf"), None
                continue
            pending = pending[~np.isin(pending, pending[positions])]
        return found

    # -- writing -----------------------------------------------------------------------------------------
    def put_many(self, text_shas: Sequence[bytes], entries: Sequence[bytes]) -> int:
        """Writes one new segment (keys sorted); merges and evicts when due. Returns the entries written."""
        if not text_shas:
            return 0
        order = sorted(range(len(text_shas)), key=lambda i: text_shas[i])
        unique = [i for n, i in enumerate(order) if n == 0 or text_shas[i] != text_shas[order[n - 1]]]
        name = self._write([text_shas[i] for i in unique], (entries[i] for i in unique))
        segment = self._open(name)
        with self._lock:
            if segment is not None:
                self._segments[name] = segment
            due = (sum(s.count < self.small_segment_entries for s in self._segments.values()) >= self.merge_at_segments
                   or sum(s.size for s in self._segments.values()) > self.max_bytes)
        if due:
            try:
                self.maintain()
            except OSError as exc:  # another process merged or evicted the same segments meanwhile
                _log.warning("embedding cache maintenance in %s skipped: %s", self.directory, exc)
        return len(unique)

    def _write(self, keys: Sequence[bytes], entries: Iterable[bytes]) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}{SEGMENT_SUFFIX}"
        before = self._directory_stamp()
        tmp = temp_path(self.directory / name)
        with tmp.open("wb") as fh:
            fh.write(HEADER.pack(MAGIC, self.dimension, len(keys)) + b"".join(keys))
            for entry in entries:
                fh.write(entry)
            flush_to_disk(fh)
        atomic_replace(tmp, self.directory / name)
        self._own_change(before)
        return name

    def _directory_stamp(self) -> int | None:
        """The directory's modification time (ns) where the file system keeps one (locally), else None."""
        if not is_local(self.directory):
            return None
        try:
            return os.stat(self.directory.path).st_mtime_ns
        except OSError:
            return -1

    def _own_change(self, before: int | None) -> None:
        """After this process added or removed a segment itself (and recorded it): the directory as it is now
        needs no listing, if nothing else had changed it since the last one."""
        with self._lock:
            if before is not None and before == self._stamp:
                self._stamp = self._directory_stamp()

    def distinct_keys(self) -> int:
        """How many different texts the segments hold (a text may be in several segments)."""
        self.refresh(force=True)
        with self._lock:
            keys = [s.keys for s in self._segments.values()]
        return len(np.unique(np.concatenate(keys))) if keys else 0

    def total_bytes(self) -> int:
        with self._lock:
            return sum(s.size for s in self._segments.values())

    # -- maintenance -------------------------------------------------------------------------------------
    def maintain(self) -> MaintenanceReport:
        """Evict the oldest segments beyond max_bytes, merge small segments into one, remove temp files of
        dead writers. One process at a time; another that finds it busy skips it."""
        report = MaintenanceReport()
        lock = FileLock(str((self.directory / ".maintenance.lock").path), thread_local=False) \
            if is_local(self.directory) else None
        try:
            if lock is not None:
                lock.acquire(timeout=0)
        except Timeout:
            return report
        try:
            entries = self.refresh(force=True)  # one listing: the segments, and the temp files of dead writers
            report.removed_temporaries = remove_stale_temporaries(entries, self.stale_temp_after_s)
            self._evict(report)
            self._merge_small(report)
        finally:
            if lock is not None:
                lock.release()
        return report

    def _evict(self, report: MaintenanceReport) -> None:
        with self._lock:
            oldest_first = sorted(self._segments.values(), key=lambda s: s.name)
        total = sum(s.size for s in oldest_first)
        for segment in oldest_first:
            if total <= self.max_bytes:
                break
            before = self._directory_stamp()
            (self.directory / segment.name).unlink(missing_ok=True)
            self._own_change(before)
            total -= segment.size
            report.evicted_segments += 1
            report.evicted_bytes += segment.size
            with self._lock:
                self._segments.pop(segment.name, None)

    def _merge_small(self, report: MaintenanceReport) -> None:
        with self._lock:
            small = sorted((s for s in self._segments.values() if s.count < self.small_segment_entries),
                           key=lambda s: s.name)
        if len(small) < self.merge_at_segments:
            return
        keys = np.concatenate([s.keys for s in small])
        owner = np.concatenate([np.full(s.count, i) for i, s in enumerate(small)])
        rows = np.concatenate([np.arange(s.count) if s.rows is None else s.rows for s in small])
        unique, first = np.unique(keys, return_index=True)
        handles = [(self.directory / s.name).open("rb") for s in small]
        try:
            def entries() -> Iterator[bytes]:
                for i in first.tolist():
                    handle = handles[int(owner[i])]
                    handle.seek(small[int(owner[i])].base + int(rows[i]) * self.entry_size)
                    yield handle.read(self.entry_size)

            merged = self._write([bytes(k).ljust(32, b"\0") for k in unique.tolist()], entries())
        finally:
            for handle in handles:
                handle.close()
        segment = self._open(merged)
        with self._lock:
            if segment is not None:
                self._segments[merged] = segment
        for old in small:
            before = self._directory_stamp()
            (self.directory / old.name).unlink(missing_ok=True)
            self._own_change(before)
            with self._lock:
                self._segments.pop(old.name, None)
        report.merged_segments += len(small)

