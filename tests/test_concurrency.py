"""Memory-bound concurrency on real runs: limits from memory figures, the executor's tag limits within a
run, pools across the runs of a backfill, the preflight check, and a step killed for memory."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from quiver.memory import GiB, MemorySettings, MiB, compute_limits, memory_settings, parse_size, preflight
from tests.conftest import PROJECT

DAGSTER = str(Path(sys.executable).parent / "dagster")
BENCH_JOB = ["-m", "bench.memory_job"]


def test_limits_from_given_memory_figures() -> None:
    roomy = compute_limits(MemorySettings(available=20 * GiB, budget=16 * GiB, cores=8,
                                          needs={"model": 700 * MiB, "io": 768 * MiB, "light": 384 * MiB}))
    assert {c: (x.limit, x.bound_by) for c, x in roomy.classes.items()} == {
        "model": (8, "cores"),  # 16 GiB x 60% / 700 MiB = 14, but only 8 cores compute
        "io": (5, "memory"),  # 16 GiB x 25% / 768 MiB = 5.3
        "light": (6, "memory"),  # 16 GiB x 15% / 384 MiB = 6.4
    }
    assert roomy.worst_case() <= roomy.settings.budget
    assert roomy.tag_concurrency_limits() == [{"key": "quiver/memory", "value": "model", "limit": 8},
                                              {"key": "quiver/memory", "value": "io", "limit": 5},
                                              {"key": "quiver/memory", "value": "light", "limit": 6}]
    assert roomy.pool_limits() == {"quiver-model": 8, "quiver-io": 5, "quiver-light": 6}
    tight = compute_limits(MemorySettings(available=3 * GiB, budget=2 * GiB, cores=8,
                                          needs={"model": 700 * MiB, "io": 768 * MiB, "light": 384 * MiB}))
    assert {c: (x.limit, x.bound_by) for c, x in tight.classes.items()} == {
        "model": (1, "memory"), "io": (1, "does not fit"), "light": (1, "does not fit")}  # 307 MiB < 384 MiB


def test_environment_overrides_the_budget_and_needs() -> None:
    env = {"QUIVER_MEMORY_BUDGET": "6GiB", "QUIVER_MEMORY_NEED_IO": "1GiB", "QUIVER_CPU_COUNT": "4"}
    needs = {"model": (512 * MiB, "measured 2026-11-23"), "io": (768 * MiB, "computed"),
             "light": (384 * MiB, "computed")}
    settings = memory_settings(needs, env=env, available=10 * GiB)
    assert settings.budget == 6 * GiB and settings.available == 10 * GiB
    assert settings.needs == {"model": 512 * MiB, "io": GiB, "light": 384 * MiB}
    assert settings.sources["io"] == "QUIVER_MEMORY_NEED_IO" and settings.sources["model"] == "measured 2026-11-23"
    assert settings.sources["budget"] == "QUIVER_MEMORY_BUDGET"
    limits = compute_limits(settings)
    assert (limits.classes["model"].limit, limits.classes["io"].limit) == (4, 1)  # 7 by memory, 4 cores; 1.5
    assert memory_settings(needs, env={}, available=10 * GiB, cores=2).budget == 8 * GiB  # 80% of available
    assert [parse_size(v) for v in ("1024", "1.5GiB", "512MiB", "2G", "2GB")] == [1024, 3 * GiB // 2, 512 * MiB,
                                                                                  2 * GiB, 2 * 10**9]
    with pytest.raises(ValueError, match="not a size: 'lots'"):
        parse_size("lots")


def test_preflight_lowers_serializes_or_refuses() -> None:
    limits = compute_limits(MemorySettings(available=10 * GiB, budget=5 * GiB, cores=8,
                                           needs={"model": GiB, "io": 512 * MiB, "light": 256 * MiB}))
    assert limits.classes["model"].limit == 3
    fits = preflight(limits, {"model": 6}, max_concurrent=8, available_now=10 * GiB)
    assert not fits.refused and fits.concurrency["model"] == 3 and fits.needed == 3 * GiB
    lowered = preflight(limits, {"model": 6, "io": 2}, max_concurrent=8, available_now=int(2.9 * GiB))
    assert not lowered.refused and lowered.concurrency["model"] == 1 and lowered.concurrency["io"] == 2
    assert lowered.message.startswith("preflight: lowered concurrency to")
    refused = preflight(limits, {"model": 2}, max_concurrent=8, available_now=GiB)
    assert refused.refused
    assert refused.message == ("preflight refused the run: one 'model' step needs 1.00 GiB but only 819 MiB may be "
                               "used now (1.00 GiB available, budget 5.00 GiB): 205 MiB missing. Free memory, or "
                               "lower the need with QUIVER_MEMORY_NEED_MODEL if you know better.")


def _env(home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(PROJECT), "QUIVER_BALLAST_MB": "100",
            "QUIVER_BALLAST_CPU_S": "0.8", **extra}


def _steps(instance: Any, run_ids: list[str]) -> dict[tuple[str, str], tuple[float, float]]:
    """(run, step) -> (started, ended) from the event log."""
    from dagster import DagsterEventType

    spans: dict[tuple[str, str], list[float]] = {}
    for run_id in run_ids:
        for record in instance.all_logs(run_id, of_type={DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS,
                                                          DagsterEventType.STEP_FAILURE}):
            span = spans.setdefault((run_id, record.step_key), [0.0, 0.0])
            span[0 if record.dagster_event.event_type == DagsterEventType.STEP_START else 1] = record.timestamp
    return {key: (a, b) for key, (a, b) in spans.items()}


def max_overlap(spans: list[tuple[float, float]]) -> int:
    points = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans], key=lambda p: (p[0], p[1]))
    running = most = 0
    for _, delta in points:
        running += delta
        most = max(most, running)
    return most


def _run_messages(instance: Any, run_id: str) -> list[str]:
    """What a run's log says: its engine events and the executor's log lines."""
    messages = []
    for entry in instance.all_logs(run_id):
        text = entry.dagster_event.message if entry.dagster_event else entry.user_message
        if text:
            messages.append(text)
    return messages


def _execute(home: Path, env: dict[str, str], config: dict[str, Any] | None = None,
             expect_success: bool = True) -> tuple[str, subprocess.CompletedProcess[str]]:
    config_file = home / f"run-{uuid.uuid4().hex}.yaml"
    config_file.write_text(json.dumps(config or {}))
    proc = subprocess.run([DAGSTER, "job", "execute", *BENCH_JOB, "-j", "heavy_steps_job", "-c", str(config_file)],
                          cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)
    assert (proc.returncode == 0) == expect_success, proc.stderr[-3000:]
    from dagster import DagsterInstance

    with DagsterInstance.get() as instance:
        run = instance.get_runs(limit=1)[0]
    return run.run_id, proc


def test_a_run_never_runs_more_heavy_steps_than_its_limit(quiver_home: Path, instance: Any) -> None:
    # 300 MiB a model step, a 1500 MiB budget: 60% of it fits 3 at once. 8 cores and max_concurrent 6 are
    # not what binds: the memory limit is.
    env = _env(quiver_home, QUIVER_MEMORY_NEED_MODEL="300MiB", QUIVER_MEMORY_BUDGET="1500MiB", QUIVER_CPU_COUNT="8",
               QUIVER_MEMORY_NEED_IO="768MiB", QUIVER_MEMORY_NEED_LIGHT="384MiB")
    run_id, _ = _execute(quiver_home, env, {"execution": {"config": {"max_concurrent": 6}}})
    spans = _steps(instance, [run_id])
    assert len(spans) == 6
    assert max_overlap(list(spans.values())) == 3
    messages = _run_messages(instance, run_id)
    assert any(m.startswith("memory limits: model 3 (300 MiB each, by memory)") for m in messages), messages
    assert {p.name: p.limit for p in instance.event_log_storage.get_pool_limits()} == {
        "quiver-model": 3, "quiver-io": 1, "quiver-light": 1}  # 375 MiB < 768 MiB and 225 MiB < 384 MiB: minimum 1


def test_preflight_lowers_concurrency_when_memory_is_short_now(quiver_home: Path, instance: Any) -> None:
    env = _env(quiver_home, QUIVER_MEMORY_NEED_MODEL="300MiB", QUIVER_MEMORY_BUDGET="1500MiB", QUIVER_CPU_COUNT="8",
               QUIVER_MEMORY_AVAILABLE="800MiB")  # 80% of it: 640 MiB, two steps
    run_id, _ = _execute(quiver_home, env, {"execution": {"config": {"max_concurrent": 6}}})
    assert max_overlap(list(_steps(instance, [run_id]).values())) == 2
    messages = _run_messages(instance, run_id)
    assert any(m.startswith("preflight: lowered concurrency to {'model': 2") for m in messages), messages


def test_preflight_refuses_with_what_is_missing(quiver_home: Path, instance: Any) -> None:
    env = _env(quiver_home, QUIVER_MEMORY_NEED_MODEL="1TiB")
    run_id, proc = _execute(quiver_home, env, expect_success=False)
    assert _steps(instance, [run_id]) == {}  # no step started
    run = instance.get_run_by_id(run_id)
    assert run.is_failure
    text = proc.stdout + proc.stderr
    assert "preflight refused the run: one 'model' step needs 1024.00 GiB but only" in text
    assert "missing. Free memory, or lower the need with QUIVER_MEMORY_NEED_MODEL" in text


def test_backfill_across_runs_is_capped_by_the_pool(quiver_home: Path, instance: Any) -> None:
    env = _env(quiver_home, QUIVER_MEMORY_NEED_MODEL="300MiB", QUIVER_MEMORY_BUDGET="1000MiB")  # 600 / 300: 2
    partitions = ["p00", "p01", "p02", "p03", "p04"]
    proc = subprocess.run([DAGSTER, "job", "backfill", *BENCH_JOB, "-j", "ballast_job", "--partitions",
                           ",".join(partitions), "--noprompt"], cwd=PROJECT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    deadline = time.monotonic() + 300
    while True:
        runs = instance.get_runs()
        if len(runs) == 5 and all(r.is_finished for r in runs):
            break
        assert time.monotonic() < deadline, [(r.run_id, r.status) for r in runs]
        time.sleep(1)
    assert all(r.is_success for r in runs), [(r.run_id, r.status) for r in runs]
    assert sorted(r.tags["dagster/partition"] for r in runs) == partitions
    assert len({r.tags.get("dagster/backfill") for r in runs}) == 1  # one backfill
    spans = _steps(instance, [r.run_id for r in runs])
    assert len(spans) == 5
    assert max_overlap(list(spans.values())) <= 2
    assert {p.name: p.limit for p in instance.event_log_storage.get_pool_limits()}["quiver-model"] == 2


def _memory_cgroup(limit_bytes: int) -> Path | None:
    root = Path("/sys/fs/cgroup/memory")
    group = root / f"quiver-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        (group / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes)) if (
            group / "memory.memsw.limit_in_bytes").exists() else None
    except OSError:
        return None
    return group


def test_a_step_killed_for_memory_is_reported_as_such(quiver_home: Path, instance: Any) -> None:
    group = _memory_cgroup(900 * MiB)
    if group is None:
        pytest.skip("no writable memory cgroup (cgroup v1 at /sys/fs/cgroup/memory) to run a step out of memory in")
    try:
        env = _env(quiver_home, QUIVER_HEAVY_STEPS="1", QUIVER_BALLAST_MB="1500", QUIVER_BALLAST_CPU_S="30")
        config = quiver_home / "oom.yaml"
        config.write_text("{}")
        proc = subprocess.Popen([DAGSTER, "job", "execute", *BENCH_JOB, "-j", "heavy_steps_job", "-c", str(config)],
                                cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        (group / "cgroup.procs").write_text(str(proc.pid))  # the run, its forkserver and its step: all inside
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode != 0
        run_id = instance.get_runs(limit=1)[0].run_id
        report = [m for m in _run_messages(instance, run_id) if m.startswith("step heavy_0 ")]
        assert report, out[-3000:]
        assert report[0].startswith("step heavy_0 (memory class model, which needs ")
        assert "was killed by the kernel for lack of memory (OOM killer: " in report[0]
        assert "in the step's own memory cgroup during this run" in report[0]  # not the host's count
        assert "its resident memory peaked at " in report[0]
        assert "Limits in force: model " in report[0] and "budget " in report[0]
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.5)
        group.rmdir()


def test_a_step_killed_by_someone_else_is_not_blamed_on_memory(quiver_home: Path, instance: Any) -> None:
    import psutil

    env = _env(quiver_home, QUIVER_HEAVY_STEPS="1", QUIVER_BALLAST_CPU_S="60")
    config = quiver_home / "kill.yaml"
    config.write_text("{}")
    proc = subprocess.Popen([DAGSTER, "job", "execute", *BENCH_JOB, "-j", "heavy_steps_job", "-c", str(config)],
                            cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        steps = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "multiprocessing.forkserver" in " ".join(p.parent().cmdline())]
        if steps:
            time.sleep(1)
            os.kill(steps[0].pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    proc.communicate(timeout=120)
    run_id = instance.get_runs(limit=1)[0].run_id
    report = [m for m in _run_messages(instance, run_id) if m.startswith("step heavy_0 ")]
    assert report and "killed by SIGKILL, but the OOM-kill count of the cgroup " in report[0]
    assert "did not change: something else killed it" in report[0]


def test_loading_the_definitions_leaves_the_pools_alone(quiver_home: Path, instance: Any) -> None:
    """Pools change only by an explicit action (or a run's start sets one nobody set), never because a process
    imported the code or a later run read memory differently."""
    storage = instance.event_log_storage
    storage.set_concurrency_slots("quiver-model", 7)
    env = _env(quiver_home, QUIVER_MEMORY_NEED_MODEL="300MiB", QUIVER_MEMORY_BUDGET="1500MiB", QUIVER_CPU_COUNT="8")
    subprocess.run([sys.executable, "-c", "import platform_defs.definitions, platform_defs.preload"], cwd=PROJECT,
                   env=env, check=True, timeout=300, capture_output=True)
    assert {p.name: p.limit for p in storage.get_pool_limits()} == {"quiver-model": 7}
    applied = subprocess.run([str(Path(sys.executable).parent / "quiver"), "limits", "--apply"], cwd=PROJECT,
                             env=env, capture_output=True, text=True, timeout=300)
    assert applied.returncode == 0, applied.stderr[-2000:]
    assert {p.name: p.limit for p in storage.get_pool_limits()}["quiver-model"] == 3  # 60% of 1500 / 300
    # A run that starts while memory looks different leaves a pool that is set alone: pools do not flap with
    # each run's reading (a fresh instance's first run sets the unset ones: see the heavy-steps test).
    less = _env(quiver_home, QUIVER_MEMORY_NEED_MODEL="900MiB", QUIVER_MEMORY_BUDGET="1500MiB", QUIVER_CPU_COUNT="8",
                QUIVER_HEAVY_STEPS="1")
    run_id, _ = _execute(quiver_home, less)
    assert any(m.startswith("memory limits: model 1 (900 MiB each") for m in _run_messages(instance, run_id))
    assert {p.name: p.limit for p in storage.get_pool_limits()}["quiver-model"] == 3


def test_a_step_that_cannot_fit_on_its_machine_now_does_not_start(quiver_home: Path, tmp_path: Path,
                                                                   instance: Any, resources: dict[str, Any]) -> None:
    """The worker-side preflight: each step checks its class's need, recorded on the run, against the memory of
    the machine it runs on; it waits (retried) and then fails, saying why."""
    from tests.helpers import add_source, ingest, scifact_docs, write_jsonl

    add_source(instance, resources, "big", write_jsonl(tmp_path / "big.jsonl", scifact_docs(2)))
    from dagster import materialize

    from platform_defs.definitions import ALL_ASSETS

    result = materialize(ALL_ASSETS, instance=instance, resources=resources, partition_key="big",
                         selection=["documents", "chunks"], raise_on_error=False,
                         tags={"quiver/need/light": str(2**40), "quiver/need/io": str(2**20)})
    assert not result.success
    assert metadata_ok(result, "documents")
    failure = next(e for e in result.all_events if e.is_step_failure and e.step_key == "chunks")
    text = failure.step_failure_data.error.cause.message if failure.step_failure_data.error.cause else \
        failure.step_failure_data.error.message
    assert "a 'light' step needs 1024.00 GiB, but only " in text and "QUIVER_MEMORY_NEED_LIGHT" in text
    assert sum(1 for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY" and e.step_key == "chunks")
    assert ingest(instance, resources, "big").success  # without the impossible need it runs


def metadata_ok(result: Any, step: str) -> bool:
    return any(e.is_step_success and e.step_key == step for e in result.all_events)


def test_a_worker_runs_as_many_steps_as_its_memory_allows(quiver_home: Path) -> None:
    env = _env(quiver_home, QUIVER_MEMORY_NEED_MODEL="1GiB", QUIVER_MEMORY_BUDGET="5GiB", QUIVER_CPU_COUNT="8")
    quiver = str(Path(sys.executable).parent / "quiver")
    for queues, concurrency in (("model", 3), ("io,light", 2)):  # 60% of 5 GiB / 1 GiB; io,light: the smaller
        out = subprocess.run([quiver, "worker", queues, "--dry-run"], cwd=PROJECT, env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        command = out.stdout.split()
        assert command[command.index("-q") + 1] == queues and command[-2:] == ["-c", str(concurrency)], out.stdout
        assert ("-i" in command) == (queues == "model")  # the model worker preloads the model before it forks
        # its model steps share the 8 cores: 8 // 3 intra-op threads each
        assert ("2 model thread(s) each" in out.stderr) == (queues == "model"), out.stderr[-2000:]


def test_index_and_model_needs_are_computed_from_what_the_steps_will_hold(
        quiver_home: Path, tmp_path: Path, instance: Any, resources: dict[str, Any]) -> None:
    from platform_defs.limits import class_needs
    from quiver.needs import BOOKKEEPING_PER_VECTOR, PAYLOAD_PER_VECTOR
    from tests.helpers import add_source, ingest, scifact_docs, write_jsonl

    empty = class_needs(resources)
    add_source(instance, resources, "grow", write_jsonl(tmp_path / "grow.jsonl", scifact_docs(20)))
    vectors = metadata_rows(ingest(instance, resources, "grow"))
    grown = class_needs(resources)
    per_vector = 2 * 384 * 4 + PAYLOAD_PER_VECTOR + BOOKKEEPING_PER_VECTOR
    assert grown["io"].bytes - empty["io"].bytes == vectors * per_vector  # an IVF rebuild holds them twice
    assert f"{vectors} vectors x (2 x 384 x 4 B" in grown["io"].formula
    # The embedding step also holds its L1 cache at its bound, what is in flight, and Milvus Lite's collection.
    assert grown["model"].bytes - empty["model"].bytes == vectors * (384 * 4 + PAYLOAD_PER_VECTOR)
    assert "L1 cache bound 256 MiB" in grown["model"].formula and "Milvus Lite in the step" in grown["model"].formula


def metadata_rows(result: Any) -> int:
    from tests.helpers import metadata

    return int(metadata(result, "embeddings")["rows"])
