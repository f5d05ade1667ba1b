"""Automation: an inbox sensor that turns files into sources, and the nightly maintenance schedules.

The sensor watches a directory. A new file (or directory) adds its source partition and requests an
ingest run for it; a file whose content hash changed requests a run for its partition only; a file that
disappeared removes its partition and requests an index run, which deletes its vectors from FAISS and
Milvus. The cursor records the content hash of each file the sensor has acted on, so ticks are
idempotent, and a burst of files gives one run per partition. The index assets follow the ingest runs
by their eager automation condition.
"""

import json
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from dagster import (
    AddDynamicPartitionsRequest,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    DeleteDynamicPartitionsRequest,
    RunRequest,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    schedule,
    sensor,
)
from upath import UPath

from assets.common import sources_partitions
from platform_defs.jobs import eval_job, index_job, ingest_job
from quiver.beir import has_relevance_data
from quiver.sources import source_fingerprint
from resources.sources import SOURCE_NAME, Inbox, SourceRegistry
from resources.vector_stores import FaissStore

INBOX_TAG = "quiver/inbox"
SOURCE_SUFFIXES = {".jsonl.gz": "jsonl", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", "~", ".swp")


@dataclass(frozen=True)
class InboxEntry:
    name: str
    kind: str
    path: str
    fingerprint: str


def source_name(entry_name: str) -> str | None:
    """The source name of an inbox entry: its name without the source suffix, in the allowed characters."""
    lowered = entry_name.lower()
    stem = entry_name
    for suffix in SOURCE_SUFFIXES:
        if lowered.endswith(suffix):
            stem = entry_name[: -len(suffix)]
            break
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", stem).strip("-.")[:64]
    return name if SOURCE_NAME.match(name) else None


def scan_inbox(directory: str, settle_seconds: float, now: float | None = None) -> tuple[dict[str, InboxEntry], int]:
    """{source name: entry} of the settled sources in the inbox, and how many entries are still settling."""
    root = UPath(directory)
    now = time.time() if now is None else now
    found: dict[str, InboxEntry] = {}
    settling = 0
    if not root.exists():
        return found, 0
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.startswith(".") or entry.name.endswith(IGNORED_SUFFIXES):
            continue
        if entry.is_dir():
            kind = "beir" if (entry / "corpus.jsonl").exists() or (entry / "corpus.jsonl.gz").exists() else "files"
            newest = max((p.stat().st_mtime for p in entry.rglob("*") if p.is_file()), default=entry.stat().st_mtime)
        else:
            kind = next((k for suffix, k in SOURCE_SUFFIXES.items() if entry.name.lower().endswith(suffix)), "")
            newest = entry.stat().st_mtime
        name = source_name(entry.name)
        if not kind or name is None:
            continue
        if now - newest < settle_seconds:
            settling += 1
            continue
        found[name] = InboxEntry(name, kind, str(entry), source_fingerprint(kind, str(entry)))  # type: ignore[arg-type]
    return found, settling


@sensor(jobs=[ingest_job, index_job], minimum_interval_seconds=15, default_status=DefaultSensorStatus.STOPPED,
        description="Files in the inbox directory are sources: added, changed and removed files are ingested, "
                    "re-ingested and dropped (with their vectors).")
def inbox_sensor(context: SensorEvaluationContext, inbox: Inbox, sources: SourceRegistry) -> SensorResult:
    acted: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    entries, settling = scan_inbox(inbox.directory, inbox.settle_seconds)
    runs: list[RunRequest] = []
    added: list[str] = []
    known = {spec.name: spec for spec in sources.all()}
    for name, entry in entries.items():
        if acted.get(name) == entry.fingerprint:
            continue
        registered = known.get(name)
        if registered is not None and name not in acted and registered.path != str(UPath(entry.path).absolute()):
            context.log.error(f"inbox entry {entry.path} is named like the source {name!r} of {registered.path}: "
                              "rename one of them; the entry is ignored")
            continue
        if name not in acted:
            sources.add(name, entry.path, entry.kind)
            added.append(name)
        runs.append(RunRequest(job_name=ingest_job.name, partition_key=name,
                               run_key=f"inbox:{name}:{entry.fingerprint[:16]}", tags={INBOX_TAG: name}))
        acted[name] = entry.fingerprint
    removed = sorted(set(acted) - set(entries) - set(_pending_names(inbox, entries)))
    for name in removed:
        sources.remove(name)
        del acted[name]
    if removed:
        runs.append(RunRequest(job_name=index_job.name, run_key=f"inbox-removed:{','.join(removed)}:{time.time_ns()}",
                               tags={INBOX_TAG: ",".join(removed)}))
    requests = []
    if added:
        requests.append(AddDynamicPartitionsRequest(sources_partitions.name, added))
    if removed:
        requests.append(DeleteDynamicPartitionsRequest(sources_partitions.name, removed))
    if settling:
        context.log.info(f"{settling} inbox entries are still being written; next tick")
    return SensorResult(run_requests=runs, dynamic_partitions_requests=requests,
                        cursor=json.dumps(acted, sort_keys=True))


def _pending_names(inbox: Inbox, settled: dict[str, InboxEntry]) -> list[str]:
    """Names of entries that exist but are still settling: not removed."""
    root = UPath(inbox.directory)
    if not root.exists():
        return []
    return [n for n in (source_name(p.name) for p in root.iterdir()) if n and n not in settled]


def _day(context: ScheduleEvaluationContext) -> str:
    moment = context.scheduled_execution_time or datetime.now(UTC)
    return moment.strftime("%Y-%m-%d")


@schedule(cron_schedule="0 2 * * *", job=index_job, default_status=DefaultScheduleStatus.STOPPED,
          description="Nightly index maintenance: rebuilds an IVF index changed since its clusters were trained, "
                      "and compacts the Milvus collection.")
def index_maintenance_schedule(context: ScheduleEvaluationContext, faiss_store: FaissStore) -> RunRequest:
    rebuild = False
    key = faiss_store.current_key()
    if key and faiss_store.has_version(key):
        manifest = faiss_store.manifest(key)
        # Flat needs nothing; HNSW is rebuilt on every change already; IVF drifts from its trained clusters.
        rebuild = manifest.get("index_type") == "ivf" and manifest.get("changes_since_rebuild", 0) > 0
    return RunRequest(run_key=f"maintenance:{_day(context)}", tags={"quiver/maintenance": "index"}, run_config={
        "ops": {"faiss_index": {"config": {"rebuild": rebuild, "force": rebuild}},
                "milvus_collection": {"config": {"compact": True}}}})


@schedule(cron_schedule="0 3 * * *", job=eval_job, default_status=DefaultScheduleStatus.STOPPED,
          description="Nightly retrieval evaluation of every source that has queries and qrels (after the index "
                      "maintenance).")
def evaluation_schedule(context: ScheduleEvaluationContext, sources: SourceRegistry) -> list[RunRequest] | SkipReason:
    names = [s.name for s in sources.all() if s.kind == "beir" and has_relevance_data(s.path)]
    if not names:
        return SkipReason("no source has queries.jsonl and qrels/test.tsv to evaluate")
    return [RunRequest(partition_key=name, run_key=f"evaluation:{name}:{_day(context)}",
                       tags={"quiver/maintenance": "evaluation"}) for name in names]
