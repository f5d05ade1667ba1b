"""What a small run pays that is not work: the SQLite files of the instance held open through a run (no
checkpoint of their log for every event), and the Milvus client imported once, before the fork."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from dagster import OpExecutionContext, execute_job, job, op, reconstructable

from platform_defs.executor import job_executor
from tests.conftest import PROJECT


@op
def wal_probe(context: OpExecutionContext) -> dict[str, bool]:
    """Whether the run's own event shard and the index shard keep their write-ahead log while a step runs (the
    events before it were stored, and their connections closed)."""
    storage = context.instance.event_log_storage
    return {name: os.path.exists(storage.path_for_shard(shard) + "-wal")
            for name, shard in (("run", context.run_id), ("index", "index"))}


@job(executor_def=job_executor(preload_model=False))
def probe_job() -> None:
    wal_probe()


def _open_files() -> set[str]:
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return found


def test_a_run_holds_the_instance_sqlite_files_open_until_it_ends(quiver_home: Path, instance: Any) -> None:
    with execute_job(reconstructable(probe_job), instance=instance,
                     run_config={"execution": {"config": {"mode": "in_process"}}}) as result:
        assert result.success
        seen = result.output_for_node("wal_probe")
        run_id = result.run_id
    # While the step ran, a held connection kept each file's log: no checkpoint and deletion per event.
    assert seen == {"run": True, "index": True}
    # At the run's end the held connections are closed: the log is checkpointed into the run's file, and this
    # process keeps none of the files open.
    shard = instance.event_log_storage.path_for_shard(run_id)
    assert not os.path.exists(shard + "-wal")
    assert not {f for f in _open_files() if f.startswith(str(quiver_home))}


def test_the_preload_imports_the_milvus_client_for_every_step(quiver_home: Path) -> None:
    """The forkserver and the warm host import platform_defs.preload before they fork: a step (or a warm run) that
    opens Milvus finds its client and the Milvus Lite server imported, instead of importing them each time."""
    code = ("import sys, platform_defs.preload as p; "
            "print(p.PRELOADED is not None, all(m in sys.modules for m in "
            "('pymilvus', 'milvus_lite.server_manager', 'milvus_lite.adapter.grpc.server')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=PROJECT,
                          env={**os.environ, "PYTHONPATH": str(PROJECT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "True"]
