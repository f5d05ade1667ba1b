"""The inbox sensor on real files, the index's eager automation, and the maintenance schedules."""

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from dagster import (
    AddDynamicPartitionsRequest,
    AssetKey,
    DeleteDynamicPartitionsRequest,
    SensorResult,
    build_schedule_context,
    build_sensor_context,
    evaluate_automation_conditions,
)

from platform_defs.schedules import evaluation_schedule, index_maintenance_schedule
from platform_defs.sensors import inbox_sensor
from resources.sources import Inbox
from tests.conftest import PROJECT
from tests.helpers import assert_stores_exact, index, ingest, scifact_docs, write_jsonl

NIGHT = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)


def _tick(instance: Any, resources: dict[str, Any], inbox: Inbox, cursor: str | None) -> SensorResult:
    context = build_sensor_context(instance=instance, cursor=cursor,
                                   resources={"inbox": inbox, "sources": resources["sources"]})
    result = inbox_sensor(context)
    for request in result.dynamic_partitions_requests or []:  # what the daemon does with the result
        if isinstance(request, AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        elif isinstance(request, DeleteDynamicPartitionsRequest):
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)
    return result


def _ingest_requested(instance: Any, resources: dict[str, Any], result: SensorResult) -> list[str]:
    done = []
    for request in result.run_requests or []:
        if request.job_name in ("ingest_job", "refresh_job"):  # a refresh run's index part: index() below
            ingest(instance, resources, request.partition_key)
            done.append(request.partition_key)
    return done


def _sources_in_milvus(resources: dict[str, Any]) -> set[str]:
    milvus = resources["milvus"]
    rows = milvus.loaded_client().query(milvus.collection, filter="id >= 0", output_fields=["source"])
    return {r["source"] for r in rows}


def test_inbox_add_change_burst_and_remove(tmp_path: Path, instance: Any, resources: dict[str, Any]) -> None:
    box = tmp_path / "inbox"
    box.mkdir()
    inbox = Inbox(directory=str(box), settle_seconds=0)
    first = _tick(instance, resources, inbox, None)
    assert first.run_requests == [] and json.loads(first.cursor) == {"inbox": str(box), "sources": {}}

    docs = scifact_docs(12)
    write_jsonl(box / "alpha.jsonl", docs[:4])
    added = _tick(instance, resources, inbox, first.cursor)
    [run] = added.run_requests
    # the only change of the tick: one run ingests it and updates both indexes
    assert (run.job_name, run.partition_key, run.tags["quiver/inbox"]) == ("refresh_job", "alpha", "alpha")
    assert added.dynamic_partitions_requests == [AddDynamicPartitionsRequest("sources", ["alpha"])]
    assert resources["sources"].get("alpha").path == str(box / "alpha.jsonl")
    assert instance.get_dynamic_partitions("sources") == ["alpha"]
    _ingest_requested(instance, resources, added)
    index(instance, resources)
    assert _sources_in_milvus(resources) == {"alpha"}

    # Idempotent: nothing changed, nothing requested; a touch that keeps the content is no change either.
    again = _tick(instance, resources, inbox, added.cursor)
    assert again.run_requests == [] and again.cursor == added.cursor
    os.utime(box / "alpha.jsonl")
    assert _tick(instance, resources, inbox, added.cursor).run_requests == []

    # Changed content: a run for that partition only.
    write_jsonl(box / "alpha.jsonl", docs[:5])
    changed = _tick(instance, resources, inbox, added.cursor)
    assert [(r.job_name, r.partition_key) for r in changed.run_requests] == [("refresh_job", "alpha")]
    assert changed.run_requests[0].run_key != run.run_key and not changed.dynamic_partitions_requests

    # A burst: four new sources of three kinds, one run per partition.
    write_jsonl(box / "beta.jsonl", docs[5:7])
    write_jsonl(box / "gamma.ndjson", docs[7:8])
    pq.write_table(pa.Table.from_pylist(docs[8:10]), box / "delta.parquet")
    (box / "epsilon").mkdir()
    (box / "epsilon" / "note.md").write_text(f"# {docs[10]['title']}\n\n{docs[10]['text']}", encoding="utf-8")
    (box / "zeta.jsonl.part").write_text("half written")  # a download in progress: ignored
    burst = _tick(instance, resources, inbox, changed.cursor)
    assert sorted(r.partition_key for r in burst.run_requests) == ["beta", "delta", "epsilon", "gamma"]
    assert {r.job_name for r in burst.run_requests} == {"ingest_job"}
    assert sorted(burst.dynamic_partitions_requests[0].partition_keys) == ["beta", "delta", "epsilon", "gamma"]
    assert {s.name: s.kind for s in resources["sources"].all()} == {
        "alpha": "jsonl", "beta": "jsonl", "gamma": "jsonl", "delta": "parquet", "epsilon": "files"}
    assert sorted(_ingest_requested(instance, resources, burst)) == ["beta", "delta", "epsilon", "gamma"]
    index(instance, resources)
    assert _sources_in_milvus(resources) == {"alpha", "beta", "gamma", "delta", "epsilon"}

    # A file still being written waits for the next tick, and is not mistaken for a removal either.
    patient = Inbox(directory=str(box), settle_seconds=3600)
    write_jsonl(box / "beta.jsonl", docs[5:8])
    waiting = _tick(instance, resources, patient, burst.cursor)
    assert waiting.run_requests == [] and waiting.cursor == burst.cursor

    # Removed: its partition goes, and the requested index run deletes its vectors from both stores.
    (box / "alpha.jsonl").unlink()
    removed = _tick(instance, resources, inbox, waiting.cursor)
    assert [r.partition_key for r in removed.run_requests if r.job_name == "ingest_job"] == ["beta"]
    [drop] = [r for r in removed.run_requests if r.job_name == "index_job"]
    assert drop.tags["quiver/inbox"] == "alpha"
    assert DeleteDynamicPartitionsRequest("sources", ["alpha"]) in removed.dynamic_partitions_requests
    assert "alpha" not in instance.get_dynamic_partitions("sources")
    assert "alpha" not in json.loads(removed.cursor)["sources"]
    assert "alpha" not in {s.name for s in resources["sources"].all()}
    index(instance, resources)
    assert _sources_in_milvus(resources) == {"beta", "gamma", "delta", "epsilon"}
    faiss_sources = set(resources["faiss_store"].open_current().payload.column("source").to_pylist())
    assert faiss_sources == {"beta", "gamma", "delta", "epsilon"}


def test_an_inbox_entry_never_takes_over_another_source(tmp_path: Path, instance: Any,
                                                         resources: dict[str, Any]) -> None:
    elsewhere = write_jsonl(tmp_path / "papers.jsonl", scifact_docs(2))
    resources["sources"].add("papers", str(elsewhere))
    box = tmp_path / "inbox"
    box.mkdir()
    write_jsonl(box / "papers.jsonl", scifact_docs(3))
    result = _tick(instance, resources, Inbox(directory=str(box), settle_seconds=0), None)
    assert result.run_requests == []
    assert resources["sources"].get("papers").path == str(elsewhere)


def test_index_assets_follow_ingested_sources_by_automation(tmp_path: Path, instance: Any,
                                                            resources: dict[str, Any]) -> None:
    from platform_defs.definitions import defs
    from tests.helpers import add_source

    add_source(instance, resources, "auto", write_jsonl(tmp_path / "auto.jsonl", scifact_docs(3)))
    # The daemon's first tick only takes stock (eager does not fire on what existed before it started).
    initial = evaluate_automation_conditions(defs=defs, instance=instance)
    assert initial.get_num_requested(AssetKey("faiss_index")) == 0
    ingest(instance, resources, "auto")
    result = evaluate_automation_conditions(defs=defs, instance=instance, cursor=initial.cursor)
    requested = {key for key in (AssetKey("faiss_index"), AssetKey("milvus_collection"))
                 if result.get_num_requested(key)}
    assert requested == {AssetKey("faiss_index"), AssetKey("milvus_collection")}
    index(instance, resources)
    after = evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
    assert after.get_num_requested(AssetKey("faiss_index")) == 0  # up to date: nothing to do


def _night(instance: Any, **resources: Any) -> Any:
    return build_schedule_context(instance=instance, scheduled_execution_time=NIGHT, resources=resources)


def test_maintenance_schedules(tmp_path: Path, instance: Any, resources: dict[str, Any]) -> None:
    from resources.faiss_store import FaissStore
    from tests.helpers import add_source

    beir = PROJECT / "tests" / "fixtures" / "tiny_beir"
    add_source(instance, resources, "tiny", beir)
    add_source(instance, resources, "plain", write_jsonl(tmp_path / "plain.jsonl", scifact_docs(3)))
    evaluations = evaluation_schedule(_night(instance, sources=resources["sources"]))
    assert [(r.partition_key, r.run_key.rsplit(":", 1)[0]) for r in evaluations] == [("tiny", "evaluation:tiny")]

    ivf = FaissStore(index_type="ivf")
    for name in ("tiny", "plain"):
        ingest(instance, resources, name)
    index(instance, {**resources, "faiss_store": ivf})
    fresh = index_maintenance_schedule(_night(instance, faiss_store=ivf))
    ops = fresh.run_config["ops"]
    assert ops["faiss_index"]["config"]["rebuild"] is False  # just trained: nothing to rebuild
    assert ops["milvus_collection"]["config"]["compact"] is True
    write_jsonl(tmp_path / "plain.jsonl", scifact_docs(4))
    ingest(instance, resources, "plain")
    assert ivf.manifest(ivf.current_version())["changes_since_rebuild"] == 0
    index(instance, {**resources, "faiss_store": ivf})
    assert ivf.manifest(ivf.current_version())["changes_since_rebuild"] > 0  # updated in place since training
    due = index_maintenance_schedule(_night(instance, faiss_store=ivf))
    assert due.run_config["ops"]["faiss_index"]["config"] == {"rebuild": True, "force": True}
    rebuilt = index(instance, {**resources, "faiss_store": ivf}, run_config=due.run_config)
    from tests.helpers import metadata

    assert metadata(rebuilt, "faiss_index")["mode"] == "rebuild"
    assert ivf.manifest(ivf.current_version())["changes_since_rebuild"] == 0


def test_a_vanished_inbox_removes_nothing_and_a_deleted_file_removes_only_its_source(
        tmp_path: Path, instance: Any, resources: dict[str, Any]) -> None:
    box = tmp_path / "inbox"
    box.mkdir()
    docs = scifact_docs(3)
    for i, name in enumerate(("alpha", "beta", "gamma")):
        write_jsonl(box / f"{name}.jsonl", docs[i:i + 1])
    inbox = Inbox(directory=str(box), settle_seconds=0)
    added = _tick(instance, resources, inbox, None)
    assert sorted(json.loads(added.cursor)["sources"]) == ["alpha", "beta", "gamma"]

    def unchanged_after(result: Any) -> None:
        from dagster import SkipReason

        assert isinstance(result, SkipReason), result
        assert sorted(s.name for s in resources["sources"].all()) == ["alpha", "beta", "gamma"]
        assert sorted(instance.get_dynamic_partitions("sources")) == ["alpha", "beta", "gamma"]

    # Unmounted or renamed: the directory is gone. The tick skips; no source, partition or vector is dropped.
    box.rename(tmp_path / "inbox-away")
    gone = inbox_sensor(build_sensor_context(instance=instance, cursor=added.cursor,
                                             resources={"inbox": inbox, "sources": resources["sources"]}))
    unchanged_after(gone)
    assert "does not exist" in gone.skip_message and "no source is added or removed" in gone.skip_message
    # A file where the directory was, and an empty mount point, change nothing either.
    box.write_text("not a directory")
    unchanged_after(inbox_sensor(build_sensor_context(instance=instance, cursor=added.cursor,
                                                      resources={"inbox": inbox, "sources": resources["sources"]})))
    box.unlink()
    box.mkdir()
    empty = inbox_sensor(build_sensor_context(instance=instance, cursor=added.cursor,
                                              resources={"inbox": inbox, "sources": resources["sources"]}))
    unchanged_after(empty)
    assert "is empty" in empty.skip_message
    box.rmdir()

    # Pointed at another directory that exists (a mistyped QUIVER_INBOX): nothing is added or removed.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_jsonl(elsewhere / "stranger.jsonl", docs[:1])
    mistyped = inbox_sensor(build_sensor_context(instance=instance, cursor=added.cursor, resources={
        "inbox": Inbox(directory=str(elsewhere), settle_seconds=0), "sources": resources["sources"]}))
    unchanged_after(mistyped)
    assert "the inbox is now" in mistyped.skip_message

    # Back, with one entry turned into a link whose target vanished (a mount below the inbox) and one file
    # deleted: only the deleted one's source goes; the unreadable one is kept.
    (tmp_path / "inbox-away").rename(box)
    (box / "gamma.jsonl").rename(tmp_path / "gamma-elsewhere.jsonl")
    (box / "gamma.jsonl").symlink_to(tmp_path / "gone" / "gamma.jsonl")
    (box / "beta.jsonl").unlink()
    after = _tick(instance, resources, inbox, added.cursor)
    assert sorted(json.loads(after.cursor)["sources"]) == ["alpha", "gamma"]
    assert not [r for r in after.run_requests if r.job_name == "ingest_job"]
    assert [r.job_name for r in after.run_requests] == ["index_job"]
    assert after.dynamic_partitions_requests == [DeleteDynamicPartitionsRequest("sources", ["beta"])]
    assert sorted(s.name for s in resources["sources"].all()) == ["alpha", "gamma"]
    assert sorted(instance.get_dynamic_partitions("sources")) == ["alpha", "gamma"]

    # Emptied on purpose, with the resource saying so: every source goes.
    for entry in box.iterdir():
        entry.unlink()
    emptied = _tick(instance, resources, Inbox(directory=str(box), settle_seconds=0, remove_all_when_empty=True),
                    after.cursor)
    assert json.loads(emptied.cursor)["sources"] == {} and resources["sources"].all() == []


def test_a_burst_of_inbox_files_through_a_real_daemon_ends_in_exact_stores(tmp_path: Path, quiver_home: Path,
                                                                           instance: Any) -> None:
    """Three sources at once: three concurrent ingest runs on the default instance, each writing Milvus Lite or
    leaving it to the index run; all succeed, and the automation's index run finds both stores exact."""
    import signal
    import subprocess
    import sys
    import time

    bin_dir = Path(sys.executable).parent
    box = tmp_path / "inbox"
    box.mkdir()
    docs = scifact_docs(9)
    for i in range(3):
        write_jsonl(box / f"burst{i}.jsonl", docs[3 * i:3 * i + 3])
    env = {**os.environ, "DAGSTER_HOME": str(quiver_home), "QUIVER_INBOX": str(box), "PYTHONPATH": str(PROJECT)}
    for sensor_name in ("inbox_sensor", "index_automation_sensor"):
        subprocess.run([str(bin_dir / "dagster"), "sensor", "start", "-m", "platform_defs", sensor_name], cwd=PROJECT,
                       env=env, check=True, capture_output=True, timeout=120)
    daemon = subprocess.Popen([str(bin_dir / "dagster-daemon"), "run", "-m", "platform_defs"], cwd=PROJECT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            records = instance.get_run_records()
            ingests = [r for r in records if r.dagster_run.job_name == "ingest_job"]
            done = len(ingests) == 3 and all(r.dagster_run.is_finished for r in records)
            last_ingest = max((r.end_time or 0 for r in ingests), default=0)
            after = [r for r in records if r.dagster_run.job_name != "ingest_job" and r.dagster_run.is_success
                     and (r.start_time or 0) >= last_ingest]
            if done and after:  # an index run that began once every source was ingested
                break
            assert time.monotonic() < deadline, [(r.dagster_run.job_name, r.dagster_run.status) for r in records]
            time.sleep(1)
    finally:
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait()
    assert all(r.dagster_run.is_success for r in ingests), [(r.dagster_run.run_id, r.dagster_run.status)
                                                             for r in ingests]
    assert sorted(r.dagster_run.tags["dagster/partition"] for r in ingests) == [f"burst{i}" for i in range(3)]
    assert _checks(instance) == {"faiss_index:matches_chunks": True, "milvus_collection:matches_chunks": True}
    from platform_defs.resources import build_resources

    assert_stores_exact(build_resources(resolve_env=True), {
        f"burst{i}": {d["id"]: d for d in docs[3 * i:3 * i + 3]} for i in range(3)})


def _checks(instance: Any) -> dict[str, bool]:
    """{"asset:check": passed} of the latest evaluation of each asset check in the instance."""
    from dagster import DagsterEventType, EventRecordsFilter

    records = instance.get_event_records(EventRecordsFilter(event_type=DagsterEventType.ASSET_CHECK_EVALUATION),
                                         ascending=True)
    evaluations = [r.event_log_entry.dagster_event.event_specific_data for r in records]
    return {f"{e.asset_key.to_user_string()}:{e.check_name}": e.passed for e in evaluations}


def test_only_judged_inbox_sources_become_evaluation_partitions(tmp_path: Path, instance: Any,
                                                                resources: dict[str, Any]) -> None:
    """A BEIR directory with queries and qrels dropped into the inbox is also a partition of retrieval_eval; a
    JSONL file is not (it would show as an evaluation missing forever); removing the directory removes both."""
    import shutil

    box = tmp_path / "inbox"
    box.mkdir()
    inbox = Inbox(directory=str(box), settle_seconds=0)
    shutil.copytree(PROJECT / "tests" / "fixtures" / "tiny_beir", box / "tiny")
    write_jsonl(box / "plain.jsonl", scifact_docs(2))
    added = _tick(instance, resources, inbox, None)
    assert added.dynamic_partitions_requests == [AddDynamicPartitionsRequest("sources", ["plain", "tiny"]),
                                                 AddDynamicPartitionsRequest("judged_sources", ["tiny"])]
    assert instance.get_dynamic_partitions("judged_sources") == ["tiny"]
    shutil.rmtree(box / "tiny")
    removed = _tick(instance, resources, inbox, added.cursor)
    assert removed.dynamic_partitions_requests == [DeleteDynamicPartitionsRequest("sources", ["tiny"]),
                                                   DeleteDynamicPartitionsRequest("judged_sources", ["tiny"])]
    assert instance.get_dynamic_partitions("judged_sources") == []


def test_the_evaluation_schedule_gives_older_beir_sources_their_partition(instance: Any,
                                                                          resources: dict[str, Any]) -> None:
    """A BEIR source registered before retrieval_eval had partitions of its own (only a `sources` partition)
    gets its evaluation partition when the nightly evaluation requests its run."""
    resources["sources"].add("old", str(PROJECT / "tests" / "fixtures" / "tiny_beir"), "beir")
    instance.add_dynamic_partitions("sources", ["old"])
    [request] = evaluation_schedule(_night(instance, sources=resources["sources"]))
    assert request.partition_key == "old" and instance.get_dynamic_partitions("judged_sources") == ["old"]
