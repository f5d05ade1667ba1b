"""The nightly maintenance schedules (off until turned on; they act only while `dagster-daemon run` runs)."""

from datetime import UTC, datetime

from dagster import DefaultScheduleStatus, RunRequest, ScheduleEvaluationContext, SkipReason, schedule

from assets.common import judged_sources_partitions
from platform_defs.jobs import eval_job, index_job
from quiver.beir import has_relevance_data
from resources.faiss_store import FaissStore
from resources.sources import SourceRegistry

# What a user needs to know before expecting a tick: nothing runs by itself until both are true.
DAEMON_HINT = ("Off until turned on (UI, or `dagster schedule start`), and acts only while `dagster-daemon run` is "
               "running (`dagster dev` starts one).")


def _day(context: ScheduleEvaluationContext) -> str:
    moment = context.scheduled_execution_time or datetime.now(UTC)
    return moment.strftime("%Y-%m-%d")


@schedule(cron_schedule="0 2 * * *", job=index_job, default_status=DefaultScheduleStatus.STOPPED,
          description="Nightly index maintenance (02:00): rebuilds an IVF index changed since its clusters were "
                      "trained, and compacts the Milvus collection. " + DAEMON_HINT)
def index_maintenance_schedule(context: ScheduleEvaluationContext, faiss_store: FaissStore) -> RunRequest:
    rebuild = False
    version = faiss_store.current_version()
    if version and faiss_store.has_version(version):
        manifest = faiss_store.manifest(version)
        # Flat needs nothing; HNSW is rebuilt on every change already; IVF drifts from its trained clusters.
        rebuild = manifest.get("index_type") == "ivf" and manifest.get("changes_since_rebuild", 0) > 0
    return RunRequest(run_key=f"maintenance:{_day(context)}", tags={"quiver/maintenance": "index"}, run_config={
        "ops": {"faiss_index": {"config": {"rebuild": rebuild, "force": rebuild}},
                "milvus_collection": {"config": {"compact": True}}}})


@schedule(cron_schedule="0 3 * * *", job=eval_job, default_status=DefaultScheduleStatus.STOPPED,
          description="Nightly retrieval evaluation (03:00) of every source that has queries and qrels, after the "
                      "index maintenance. " + DAEMON_HINT)
def evaluation_schedule(context: ScheduleEvaluationContext, sources: SourceRegistry) -> list[RunRequest] | SkipReason:
    names = [s.name for s in sources.all() if s.kind == "beir" and has_relevance_data(s.path)]
    if not names:
        return SkipReason("no source has queries.jsonl and qrels/test.tsv to evaluate")
    # A source registered before the evaluation had partitions of its own gets its partition now.
    evaluated = set(context.instance.get_dynamic_partitions(judged_sources_partitions.name))
    if missing := [n for n in names if n not in evaluated]:
        context.instance.add_dynamic_partitions(judged_sources_partitions.name, missing)
    return [RunRequest(partition_key=name, run_key=f"evaluation:{name}:{_day(context)}",
                       tags={"quiver/maintenance": "evaluation"}) for name in names]
