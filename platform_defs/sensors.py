"""Automation: an inbox sensor that turns files into sources, and the sensor that keeps the indexes fresh.

The sensor watches a directory. A new file (or directory) adds its source partition and requests an
ingest run for it; a file whose content hash changed requests a run for its partition only (when it is the
only change of a tick, one run that refreshes the indexes too, so it is searchable seconds later); a file that
disappeared removes its partition and requests an index run, which deletes its vectors from FAISS and
Milvus. The cursor records the content hash of each file the sensor has acted on, so ticks are
idempotent, and a burst of files gives one run per partition. The index assets follow the ingest runs
by their eager automation condition, which `index_automation_sensor` evaluates. Both act only while
`dagster-daemon run` runs.
"""

import json
import os
import time

from dagster import (
    AddDynamicPartitionsRequest,
    AssetSelection,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    DeleteDynamicPartitionsRequest,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)
from upath import UPath

from assets.common import judged_sources_partitions, sources_partitions
from platform_defs.jobs import index_job, ingest_job, refresh_job
from quiver.beir import is_judged
from quiver.inbox import InboxUnavailableError, scan_inbox
from resources.sources import Inbox, SourceRegistry

INBOX_TAG = "quiver/inbox"

# The index assets' eager automation conditions are evaluated by this sensor (with dagster-daemon running):
# once no source is being ingested, it materializes the indexes, and their blocking checks with them.
index_automation_sensor = AutomationConditionSensorDefinition(
    "index_automation_sensor", target=AssetSelection.assets("faiss_index", "milvus_collection"),
    default_status=DefaultSensorStatus.STOPPED,
    description="Brings the FAISS index and the Milvus collection up to date once sources have been (re)ingested. "
                "Off until turned on (UI, or `dagster sensor start -m platform_defs index_automation_sensor`), and "
                "acts only while `dagster-daemon run` is running (`dagster dev` starts one).")


# Seconds between two looks at the inbox (QUIVER_INBOX_INTERVAL_S where the definitions load; 15 by default).
INBOX_INTERVAL_S = int(os.environ.get("QUIVER_INBOX_INTERVAL_S", "15"))


@sensor(jobs=[ingest_job, index_job, refresh_job], minimum_interval_seconds=INBOX_INTERVAL_S,
        default_status=DefaultSensorStatus.STOPPED,
        description="Files in the inbox directory ($QUIVER_INBOX, default $DAGSTER_HOME/inbox) are sources: added, "
                    "changed and removed files are ingested, re-ingested and dropped (with their vectors). A missing "
                    "or unreadable inbox changes nothing. Off until turned on (UI, or `dagster sensor start -m "
                    "platform_defs inbox_sensor`), and acts only while `dagster-daemon run` is running "
                    "(`dagster dev` starts one).")
def inbox_sensor(context: SensorEvaluationContext, inbox: Inbox, sources: SourceRegistry) -> SensorResult | SkipReason:
    cursor = json.loads(context.cursor) if context.cursor else {}
    # The cursor: {"inbox": the directory its sources came from, "sources": {name: content hash acted on}}
    # (an older cursor is the bare {name: hash}).
    acted: dict[str, str] = cursor.get("sources", {}) if "sources" in cursor else cursor
    watched = str(UPath(inbox.directory).absolute())
    if acted and cursor.get("inbox") not in (None, watched):
        message = (f"the inbox is now {watched}, but {len(acted)} sources came from {cursor['inbox']}: nothing is "
                   "added or removed (a mistyped QUIVER_INBOX would otherwise remove them all). To watch another "
                   "directory, move the files there or reset this sensor's cursor.")
        context.log.warning(message)
        return SkipReason(message)
    try:
        scan = scan_inbox(inbox.directory, inbox.settle_seconds)
    except InboxUnavailableError as exc:
        # Never read a vanished inbox as "every source was deleted": skip the tick, keep the cursor.
        message = f"{exc}; skipping this tick, no source is added or removed ({len(acted)} known from the inbox)"
        context.log.warning(message)
        return SkipReason(message)
    if acted and not scan.present and not inbox.remove_all_when_empty:
        message = (f"the inbox {inbox.directory} is empty, but {len(acted)} sources came from it: an unmounted "
                   "directory looks like this, so nothing is removed (set remove_all_when_empty on the inbox "
                   "resource, or use `quiver source remove`, to remove them all)")
        context.log.warning(message)
        return SkipReason(message)
    runs: list[RunRequest] = []
    added: list[str] = []
    known = {spec.name: spec for spec in sources.all()}
    for name, entry in scan.settled.items():
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
    removed = sorted(set(acted) - scan.present)
    for name in removed:
        sources.remove(name)
        del acted[name]
    if removed:
        context.log.info(f"removed from the inbox: {', '.join(removed)}; an index run drops their vectors")
        runs.append(RunRequest(job_name=index_job.name, run_key=f"inbox-removed:{','.join(removed)}:{time.time_ns()}",
                               tags={INBOX_TAG: ",".join(removed)}))
    if len(runs) == 1 and not removed:  # one source changed: one run ingests it and updates both indexes
        [only] = runs
        runs = [RunRequest(job_name=refresh_job.name, partition_key=only.partition_key, run_key=only.run_key,
                           tags=only.tags)]
    requests = []
    if added:
        requests.append(AddDynamicPartitionsRequest(sources_partitions.name, added))
    judged = [n for n in added if scan.settled[n].kind == "beir" and is_judged(scan.settled[n].path)]
    if judged:  # the evaluation's partitions: only the sources it can score
        requests.append(AddDynamicPartitionsRequest(judged_sources_partitions.name, judged))
    if removed:
        requests.append(DeleteDynamicPartitionsRequest(sources_partitions.name, removed))
        evaluated = set(context.instance.get_dynamic_partitions(judged_sources_partitions.name))
        if gone := [n for n in removed if n in evaluated]:
            requests.append(DeleteDynamicPartitionsRequest(judged_sources_partitions.name, gone))
    if scan.settling:
        context.log.info(f"still being written, next tick: {', '.join(scan.settling)}")
    for name, why in scan.unreadable.items():
        context.log.warning(f"inbox entry of source {name!r} cannot be read now ({why}); it is kept, not removed")
    return SensorResult(run_requests=runs, dynamic_partitions_requests=requests,
                        cursor=json.dumps({"inbox": watched, "sources": acted}, sort_keys=True))
