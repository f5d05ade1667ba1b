"""Memory-bound concurrency benchmark: a backfill of N partitions whose heavy step each holds a known amount
of memory, through a real instance (run queue + dagster-daemon), capped and uncapped.

Each partition is one run (Dagster's default backfill): its orchestrator, its forkserver and its step,
which holds QUIVER_BALLAST_MB, computes QUIVER_BALLAST_CPU_S and keeps its memory for QUIVER_BALLAST_HOLD_S in all
(waiting, as a step waiting on a vector store does). A calibration run measures what one
such run needs (peak summed RSS, less the idle daemon's); the budget is set below what all N at once need. Capped: the
model-class pool limit computed from that budget holds runs in the queue (the queued run coordinator's
`block_op_concurrency_limited_runs`, as deploy/production/dagster.yaml has it). Uncapped: no pool limit and a
run queue that allows every run at once, so it really goes over the budget. Printed for both: peak summed
RSS of all processes (the daemon included), wall time; the capped runs' peak (less the idle daemon) is
compared with what the limits promise the model class (its 60% share of the budget), not the whole budget.

    python bench/concurrency.py [--partitions 16] [--ballast-mb 500] [--cpu-s 6] [--hold-s 20] [--repeats 3]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PROJECT, Sampler, median, print_table, wait_for_runs, write_results  # noqa: E402

INSTANCE_YAML = """\
storage:
  sqlite:
    base_dir:
      env: DAGSTER_HOME
telemetry:
  enabled: false
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
  config:
    max_concurrent_runs: -1
    dequeue_interval_seconds: 1
    block_op_concurrency_limited_runs:
      enabled: true
      op_concurrency_slot_buffer: 0
"""
BIN = Path(sys.executable).parent


def tree_rss(root: psutil.Process) -> int:
    """Summed RSS of a process and its descendants (0 for any that ended meanwhile)."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


class RssSampler(Sampler):
    """Peak of the summed RSS of a process and all its descendants, sampled every 0.1 s."""

    def __init__(self, root: psutil.Process) -> None:
        super().__init__()
        self.root = root
        self.peak = 0

    def sample(self) -> None:
        self.peak = max(self.peak, tree_rss(self.root))


def idle_rss(daemon: psutil.Process, settle_s: float = 15.0) -> int:
    """The daemon's own footprint once it has started all its threads (no run yet), largest of a few samples."""
    time.sleep(settle_s)
    samples = []
    for _ in range(5):
        samples.append(tree_rss(daemon))
        time.sleep(0.2)
    return max(samples)


def backfill(partitions: list[str], env: dict[str, str], capped_limit: int | None) -> dict[str, Any]:
    """One backfill through a fresh instance with its own daemon; returns wall time and peak RSS."""
    home = Path(tempfile.mkdtemp(prefix="quiver-bench-concurrency-"))
    (home / "dagster.yaml").write_text(INSTANCE_YAML)
    env = {**env, "DAGSTER_HOME": str(home), "QUIVER_MANAGE_POOLS": "1" if capped_limit else "0"}
    from dagster import DagsterInstance

    os.environ["DAGSTER_HOME"] = str(home)
    with DagsterInstance.get() as instance:
        if capped_limit:
            instance.event_log_storage.set_concurrency_slots("quiver-model", capped_limit)
        daemon = subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-m", "bench.memory_job"], cwd=PROJECT, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            idle = idle_rss(psutil.Process(daemon.pid))
            with RssSampler(psutil.Process(daemon.pid)) as sampler:
                started = time.perf_counter()
                submit = subprocess.run([str(BIN / "dagster"), "job", "backfill", "-m", "bench.memory_job", "-j",
                                         "ballast_job", "--partitions", ",".join(partitions), "--noprompt"],
                                        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)
                if submit.returncode != 0:
                    raise RuntimeError(submit.stderr[-3000:])
                runs = wait_for_runs(instance, len(partitions), started)
                wall = time.perf_counter() - started
        finally:
            os.killpg(daemon.pid, 9)
            daemon.wait()
        failed = [r.run_id for r in runs if not r.is_success]
    shutil.rmtree(home, ignore_errors=True)
    return {"wall_s": wall, "peak_rss": sampler.peak, "idle_daemon_rss": idle, "failed_runs": len(failed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--ballast-mb", type=int, default=500)
    parser.add_argument("--cpu-s", type=float, default=6.0)
    parser.add_argument("--hold-s", type=float, default=20.0, help="seconds each step keeps its memory in all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--capped-runs", type=int, default=4, help="runs the budget is sized for")
    args = parser.parse_args()
    partitions = [f"p{i:02d}" for i in range(args.partitions)]
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "QUIVER_BALLAST_MB": str(args.ballast_mb),
           "QUIVER_BALLAST_CPU_S": str(args.cpu_s),
           "QUIVER_BALLAST_HOLD_S": str(args.hold_s), "QUIVER_BALLAST_PARTITIONS": str(args.partitions),
           "OMP_NUM_THREADS": "1"}

    # What one run needs, measured: the peak summed RSS of a one-partition backfill less the idle daemon's
    # footprint (the daemon is there once, whatever the number of runs).
    calibration = backfill(partitions[:1], env, None)
    measured_run = calibration["peak_rss"] - calibration["idle_daemon_rss"]
    # The need given to the limits: the measured run with 5% headroom, as a step's need must cover a run that
    # peaks a little higher than the calibration's did.
    per_run = int(measured_run * 1.05)
    # A budget for capped_runs runs at once (the model class gets 60% of it), well below all N at once.
    budget = int(per_run * args.capped_runs / 0.6) + 2**20  # 1 MiB over, so the floor gives capped_runs
    from quiver.memory import compute_limits, format_size, memory_settings

    needs = {"model": (per_run, "measured (one run)"), "io": (per_run, "unused"), "light": (per_run, "unused")}
    limits = compute_limits(memory_settings(needs, env={
        **env, "QUIVER_MEMORY_BUDGET": str(budget), "QUIVER_CPU_COUNT": str(args.partitions)}))
    limit, share = limits.classes["model"].limit, int(budget * limits.settings.shares["model"])
    capped_env = {**env, "QUIVER_MEMORY_BUDGET": str(budget), "QUIVER_MEMORY_NEED_MODEL": str(per_run),
                  "QUIVER_CPU_COUNT": str(args.partitions)}
    print(f"one run needs {format_size(per_run)} (daemon {format_size(calibration['idle_daemon_rss'])}); budget "
          f"{format_size(budget)}; model-class limit {limit}; uncapped needs about "
          f"{format_size(calibration['idle_daemon_rss'] + per_run * args.partitions)}", flush=True)

    results: dict[str, list[dict[str, Any]]] = {"capped": [], "uncapped": []}
    for repeat in range(args.repeats):
        for mode in ("capped", "uncapped") if repeat % 2 == 0 else ("uncapped", "capped"):
            r = backfill(partitions, capped_env if mode == "capped" else env, limit if mode == "capped" else None)
            r["runs_peak_rss"] = r["peak_rss"] - r["idle_daemon_rss"]
            r["within_share"] = r["runs_peak_rss"] <= share
            r["within_budget"] = r["runs_peak_rss"] <= budget
            results[mode].append(r)
            print(f"repeat {repeat + 1} {mode}: {r['wall_s']:.1f}s, peak summed RSS {format_size(r['peak_rss'])}, "
                  f"failed runs {r['failed_runs']}", flush=True)
    capped_wall = median([r["wall_s"] for r in results["capped"]])
    uncapped_wall = median([r["wall_s"] for r in results["uncapped"]])
    rows = []
    for mode, runs in results.items():
        rows.append([mode, f"{median([r['wall_s'] for r in runs]):.1f}",
                     format_size(median([r["peak_rss"] for r in runs])),
                     format_size(max(r["runs_peak_rss"] for r in runs)),
                     "yes" if all(r["within_share"] for r in runs) else "no",
                     "yes" if all(r["within_budget"] for r in runs) else "no",
                     sum(r["failed_runs"] for r in runs)])
    ratio = capped_wall / uncapped_wall
    table = print_table(
        f"Backfill of {args.partitions} partitions, each step holding {args.ballast_mb} MiB and computing "
        f"{args.cpu_s} s of CPU, {args.hold_s} s in all; one run needs {format_size(per_run)}; budget "
        f"{format_size(budget)}, model-class share {format_size(share)} (limit {limit}); medians of {args.repeats}",
        ["mode", "wall s", "peak summed RSS (median)", "runs' peak less daemon (max)", "within share every time",
         "within budget every time", "failed runs"], rows)
    capped_max = max(r["runs_peak_rss"] for r in results["capped"])
    uncapped_min = min(r["runs_peak_rss"] for r in results["uncapped"])
    table += "\n" + print_table("Targets", ["measure", "value", "target", "met"], [
        ["capped runs' peak within the model share, every repeat", f"{format_size(capped_max)} / "
         f"{format_size(share)}", "<= share", capped_max <= share],
        ["uncapped baseline over the budget, every repeat", f"{format_size(uncapped_min)} / {format_size(budget)}",
         "> budget", uncapped_min > budget],
        ["capped / uncapped wall", f"{capped_wall:.1f}s / {uncapped_wall:.1f}s = {ratio:.2f}x", "<= 1.3x",
         ratio <= 1.3],
    ])
    write_results("concurrency", {"args": vars(args), "measured_run_bytes": measured_run,
                                  "per_run_bytes": per_run, "calibration": calibration,
                                  "budget_bytes": budget, "share_bytes": share, "limit": limit,
                                  "results": results, "ratio": ratio, "table": table})


if __name__ == "__main__":
    main()
