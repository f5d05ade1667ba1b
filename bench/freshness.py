"""Freshness benchmark: a deterministic 300-document edit history replayed through `quiver run` (cold, and with
the warm host) and through the inbox sensor with a real `dagster-daemon`; per cycle the wall time, the texts
embedded and both stores' exactness against the current documents; and where one small update's time goes.

    python bench/freshness.py [--cycles 5] [--documents 300] [--skip-daemon]
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PROJECT, fresh_home, median, print_table, write_results  # noqa: E402
from bench.freshness_history import History, exactness  # noqa: E402

BIN = Path(sys.executable).parent
SOURCE = "fresh"
NOOP_TARGET_S, UPDATE_TARGET_S, SENSOR_TARGET_S = 3.0, 4.0, 5.0


def quiver(*args: str, env: dict[str, str] | None = None,
           tree: Path = PROJECT) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall-clock start, seconds, the finished command) of `quiver` as a user runs it (from another checkout:
    its own code, this environment's libraries)."""
    wall, started = time.time(), time.perf_counter()
    command = [str(BIN / "quiver")] if tree == PROJECT else [sys.executable, "-m", "platform_defs.cli"]
    env = {**(env or os.environ), **({"PYTHONPATH": str(tree)} if tree != PROJECT else {})}
    proc = subprocess.run([*command, *args], capture_output=True, text=True, env=env, cwd=tree)
    if proc.returncode:
        raise RuntimeError(f"quiver {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return wall, time.perf_counter() - started, proc


def latest_run(instance: Any) -> Any:
    return instance.get_run_records(limit=1)[0]


def run_facts(instance: Any, run_id: str) -> dict[str, Any]:
    """Texts embedded, steps and their seconds, and the model's loads, from the run's own events."""
    from dagster import DagsterEventType

    facts: dict[str, Any] = {"texts_embedded": 0, "steps": {}, "model_loaded": False}
    starts: dict[str, float] = {}
    first = last = None
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is None:
            continue
        first = first if first is not None else record.timestamp
        last = record.timestamp
        if event.event_type == DagsterEventType.STEP_START:
            starts[event.step_key] = record.timestamp
        elif event.event_type == DagsterEventType.STEP_SUCCESS:
            facts["steps"][event.step_key] = round(record.timestamp - starts.get(event.step_key, record.timestamp), 3)
        elif event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            mat = event.event_specific_data.materialization
            meta = {k: v.value for k, v in mat.metadata.items()}
            if mat.asset_key.path[-1] == "embeddings":
                facts["texts_embedded"] = int(meta.get("texts_encoded", 0) or 0)
                facts["model_loaded"] = bool(meta.get("details", {}).get("model", {}).get("model_loaded", False))
    facts["run_first_event"], facts["run_last_event"] = first, last
    return facts


def measure(instance: Any, env: dict[str, str], resources: dict[str, Any], history: History, label: str,
            cycle: dict[str, int] | None, tree: Path = PROJECT) -> dict[str, Any]:
    known = {r.dagster_run.run_id for r in instance.get_run_records()}
    wall, seconds, _proc = quiver("run", "--source", SOURCE, env=env, tree=tree)
    new = [r for r in reversed(instance.get_run_records()) if r.dagster_run.run_id not in known]
    facts = run_facts(instance, new[0].dagster_run.run_id)
    for later in new[1:]:  # an older checkout: an ingest run, then an index run
        more = run_facts(instance, later.dagster_run.run_id)
        facts["steps"].update(more["steps"])
        facts["run_last_event"] = more["run_last_event"]
        facts["texts_embedded"] += more["texts_embedded"]
    steps_s = sum(facts["steps"].values())
    row = {"mode": label, "cycle": cycle, "seconds": round(seconds, 2), "texts_embedded": facts["texts_embedded"],
           "dagster_runs": len(new),
           "model_loaded": facts["model_loaded"], "steps": facts["steps"],
           "phases": {"cli start to first run event": round(facts["run_first_event"] - wall, 3),
                      "steps": round(steps_s, 3),
                      "dagster between steps": round(facts["run_last_event"] - facts["run_first_event"] - steps_s, 3),
                      "after the run (summary, exit)": round(wall + seconds - facts["run_last_event"], 3)},
           "exactness": exactness(resources, SOURCE, history.doc_ids())}
    print(f"{label:>6} {str(cycle or ''):<58} {seconds:6.2f} s  embedded {facts['texts_embedded']:>4}  "
          f"exact {row['exactness']['exact']}", flush=True)
    return row


def cli_history(args: argparse.Namespace) -> dict[str, Any]:
    home = fresh_home("quiver-bench-freshness-")
    from dagster import DagsterInstance

    from platform_defs.resources import build_resources

    history = History(home / "docs", documents=args.documents)
    history.create()
    env = {**os.environ, "QUIVER_WARM_HOST": "off"}
    quiver("source", "add", SOURCE, str(history.directory))
    instance = DagsterInstance.get()
    resources = build_resources(resolve_env=True)
    rows = [measure(instance, env, resources, history, "first", None)]
    for _ in range(args.noops):
        rows.append(measure(instance, env, resources, history, "cold", None))
    rows.append(measure(instance, env, resources, history, "cold", history.cycle()))
    _, start_s, proc = quiver("warm", "start")
    print(proc.stdout.strip(), flush=True)
    warm_env = {**os.environ}
    try:
        for _ in range(args.noops):
            rows.append(measure(instance, warm_env, resources, history, "warm", None))
        for _ in range(args.cycles):
            rows.append(measure(instance, warm_env, resources, history, "warm", history.cycle()))
            rows.append(measure(instance, warm_env, resources, history, "warm", None))
    finally:
        quiver("warm", "stop")
    return {"home": str(home), "warm_host_start_s": round(start_s, 1), "runs": rows}


def baseline_history(args: argparse.Namespace) -> dict[str, Any] | None:
    """The same history through an earlier commit's `quiver run` (a worktree of it), in this run."""
    if not args.baseline_commit:
        return None
    tree = Path(tempfile.mkdtemp(prefix="quiver-baseline-")) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.baseline_commit], cwd=PROJECT,
                   check=True, capture_output=True)
    try:
        home = fresh_home("quiver-bench-freshness-baseline-")
        from dagster import DagsterInstance

        from platform_defs.resources import build_resources

        history = History(home / "docs", documents=args.documents)
        history.create()
        quiver("source", "add", SOURCE, str(history.directory), tree=tree)
        instance = DagsterInstance.get()
        resources = build_resources(resolve_env=True)
        rows = [measure(instance, dict(os.environ), resources, history, "before", None, tree)]
        for _ in range(args.baseline_repeats):
            rows.append(measure(instance, dict(os.environ), resources, history, "before", None, tree))
            rows.append(measure(instance, dict(os.environ), resources, history, "before", history.cycle(), tree))
        return {"commit": args.baseline_commit, "runs": rows}
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=PROJECT, capture_output=True)


def import_seconds(repeats: int = 3) -> dict[str, float]:
    """What a cold `quiver run` pays before any work: each import, in a new interpreter (median)."""
    found = {}
    for label, code in (("python alone", "pass"), ("dagster", "import dagster"),
                        ("the definitions (dagster included)", "import platform_defs.definitions"),
                        ("model libraries (torch, sentence-transformers)", "import sentence_transformers")):
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, cwd=PROJECT)
            times.append(time.perf_counter() - started)
        found[label] = round(median(times), 2)
    return found


def sensor_history(args: argparse.Namespace) -> dict[str, Any]:
    """The inbox path: the sensor (with the daemon) sees each cycle's files and launches one run in the warm host."""
    home = fresh_home("quiver-bench-freshness-daemon-")
    (home / "dagster.yaml").write_text((home / "dagster.yaml").read_text() + (
        "run_launcher:\n  module: platform_defs.launcher\n  class: WarmRunLauncher\n"))
    from dagster import DagsterInstance

    from platform_defs.resources import build_resources

    inbox = home / "inbox"
    inbox.mkdir()
    history = History(home / "staging", documents=args.documents)
    history.create()
    env = {**os.environ, "QUIVER_INBOX": str(inbox), "QUIVER_INBOX_INTERVAL_S": str(args.sensor_interval),
           "PYTHONPATH": str(PROJECT)}
    os.environ.update({k: env[k] for k in ("QUIVER_INBOX", "QUIVER_INBOX_INTERVAL_S", "PYTHONPATH")})
    quiver("warm", "start", env=env)
    subprocess.run([str(BIN / "dagster"), "sensor", "start", "-m", "platform_defs", "inbox_sensor"], cwd=PROJECT,
                   env=env, check=True, capture_output=True, timeout=180)
    daemon = subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-m", "platform_defs"], cwd=PROJECT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    instance = DagsterInstance.get()
    resources = build_resources(resolve_env=True)
    rows = []
    try:
        shutil.move(str(history.directory), str(inbox / SOURCE))  # the source appears in the inbox
        history.directory = inbox / SOURCE
        rows.append(wait_for_sensor_run(instance, resources, history, None, time.time(), 0))
        for _ in range(args.cycles):
            known = len(instance.get_run_records())
            changed_at = time.time()
            cycle = history.cycle()
            rows.append(wait_for_sensor_run(instance, resources, history, cycle, changed_at, known))
    finally:
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait()
        quiver("warm", "stop", env=env)
    return {"home": str(home), "sensor_interval_s": args.sensor_interval, "settle_s": 2.0, "runs": rows}


def wait_for_sensor_run(instance: Any, resources: dict[str, Any], history: History, cycle: dict[str, int] | None,
                        changed_at: float, known: int, timeout_s: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        records = instance.get_run_records()
        if len(records) > known and all(r.dagster_run.is_finished for r in records):
            break
        if time.monotonic() > deadline:
            statuses = [r.dagster_run.status for r in records]
            raise RuntimeError(f"no finished sensor run in {timeout_s:.0f} s: {statuses}")
        time.sleep(0.1)
    record = records[0]
    if not record.dagster_run.is_success:
        raise RuntimeError(f"sensor run {record.dagster_run.run_id} failed")
    facts = run_facts(instance, record.dagster_run.run_id)
    created = record.create_timestamp.timestamp()
    row = {"cycle": cycle, "job": record.dagster_run.job_name, "runs": len(records) - known,
           "launched_in_warm_host": "quiver/warm_child_pid" in record.dagster_run.tags,
           "change_to_run_created_s": round(created - changed_at, 2),
           "run_created_to_done_s": round(facts["run_last_event"] - created, 2),
           "change_to_searchable_s": round(facts["run_last_event"] - changed_at, 2),
           "texts_embedded": facts["texts_embedded"], "exactness": exactness(resources, SOURCE, history.doc_ids())}
    print(f"sensor {str(cycle or 'first'):<58} created +{row['change_to_run_created_s']:5.2f} s, done "
          f"+{row['run_created_to_done_s']:5.2f} s, embedded {row['texts_embedded']:>4}, exact "
          f"{row['exactness']['exact']}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--documents", type=int, default=300)
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--noops", type=int, default=3, help="no-op runs measured cold and warm")
    parser.add_argument("--sensor-interval", type=int, default=15, help="the inbox sensor's interval (seconds)")
    parser.add_argument("--skip-daemon", action="store_true")
    parser.add_argument("--baseline-commit", default="", help="also replay the history through this commit")
    parser.add_argument("--baseline-repeats", type=int, default=2, help="no-op + cycle pairs of the baseline")
    args = parser.parse_args()
    imports = import_seconds()
    baseline = baseline_history(args)
    cli = cli_history(args)
    sensor = None if args.skip_daemon else sensor_history(args)
    payload = summarize(args, cli, sensor, baseline, imports)
    write_results("freshness", payload)


def summarize(args: argparse.Namespace, cli: dict[str, Any], sensor: dict[str, Any] | None,
              baseline: dict[str, Any] | None, imports: dict[str, float]) -> dict[str, Any]:
    runs = cli["runs"] + (baseline["runs"] if baseline else [])

    def pick(mode: str, update: bool) -> list[dict[str, Any]]:
        return [r for r in runs if r["mode"] == mode and bool(r["cycle"]) == update]

    rows = []
    before = f"before ({baseline['commit'][:7]}, two runs)" if baseline else ""
    for mode, update, label in (("before", False, f"no-op, {before}"), ("before", True, f"one cycle, {before}"),
                                ("first", False, "first run"), ("cold", False, "no-op, cold CLI"),
                                ("cold", True, "one cycle, cold CLI"), ("warm", False, "no-op, warm host"),
                                ("warm", True, "one cycle, warm host")):
        chosen = pick(mode, update)
        if mode == "before":
            chosen = chosen[1:] if not update else chosen  # the baseline's first run is its first run
        if chosen:
            seconds = [r["seconds"] for r in chosen]
            rows.append([label, len(chosen), f"{median(seconds):.2f}", f"{min(seconds):.2f}-{max(seconds):.2f}",
                         f"{median([r['texts_embedded'] for r in chosen]):.0f}",
                         "yes" if all(r["exactness"]["exact"] for r in chosen) else "NO"])
    sensor_rows = [r for r in (sensor or {}).get("runs", []) if r["cycle"]]
    if sensor_rows:
        done = [r["run_created_to_done_s"] for r in sensor_rows]
        rows.append([f"one cycle, inbox sensor (interval {sensor['sensor_interval_s']} s): run created to "
                     "searchable", len(sensor_rows), f"{median(done):.2f}", f"{min(done):.2f}-{max(done):.2f}",
                     f"{median([r['texts_embedded'] for r in sensor_rows]):.0f}",
                     "yes" if all(r["exactness"]["exact"] for r in sensor_rows) else "NO"])
        waits = [r["change_to_searchable_s"] for r in sensor_rows]
        rows.append(["one cycle, inbox sensor: file change to searchable", len(sensor_rows), f"{median(waits):.2f}",
                     f"{min(waits):.2f}-{max(waits):.2f}", "", ""])
    table = print_table(f"Freshness: {args.documents} documents, cycles of 10 edited (a third shortened), 3 deleted, "
                        "3 added", ["per `quiver run --source S`", "runs", "median s", "range s", "texts embedded",
                                    "both stores exact"], rows)
    update = pick("warm", True)
    phases = {name: median([r["phases"][name] for r in update]) for name in update[0]["phases"]} if update else {}
    steps = {step: median([r["steps"].get(step, 0.0) for r in update]) for step in update[0]["steps"]} if update else {}
    phase_rows = [[name, f"{s:.3f}"] for name, s in phases.items()] + [[f"  step {k}", f"{v:.3f}"]
                                                                         for k, v in steps.items()]
    phase_rows += [[f"import in a new process: {k}", f"{v:.2f}"] for k, v in imports.items()]
    for label, chosen in (("cold CLI", pick("cold", True)), ("before", pick("before", True))):
        if chosen:
            phase_rows += [[f"{label}: {name}", f"{value:.3f}"] for name, value in chosen[0]["phases"].items()]
    phase_table = print_table("Where one small update's time goes (warm host: median of the cycles; a cold CLI "
                              "and the baseline: one cycle; imports: median of 3)", ["phase", "seconds"], phase_rows)
    cold_update = pick("cold", True)
    cold_phases = cold_update[0]["phases"] if cold_update else {}
    noop_warm = [r["seconds"] for r in pick("warm", False)]
    update_warm = [r["seconds"] for r in update]
    targets = [
        ["no-op run, warm host, median", f"{median(noop_warm):.2f} s" if noop_warm else "-", f"<= {NOOP_TARGET_S} s",
         bool(noop_warm) and median(noop_warm) <= NOOP_TARGET_S],
        ["no-op run, warm host, slowest", f"{max(noop_warm):.2f} s" if noop_warm else "-", f"<= {NOOP_TARGET_S} s",
         bool(noop_warm) and max(noop_warm) <= NOOP_TARGET_S],
        ["one cycle, warm host, median", f"{median(update_warm):.2f} s" if update_warm else "-",
         f"<= {UPDATE_TARGET_S} s", bool(update_warm) and median(update_warm) <= UPDATE_TARGET_S],
        ["one cycle, warm host, slowest", f"{max(update_warm):.2f} s" if update_warm else "-",
         f"<= {UPDATE_TARGET_S} s", bool(update_warm) and max(update_warm) <= UPDATE_TARGET_S],
        ["every run: both stores exact", str(all(r["exactness"]["exact"] for r in runs)), "True",
         all(r["exactness"]["exact"] for r in runs)],
    ]
    if sensor_rows:
        interval = sensor["sensor_interval_s"]
        beyond = [r["change_to_searchable_s"] - interval for r in sensor_rows]
        targets.append([f"inbox sensor: file change to searchable beyond the {interval} s interval, slowest",
                        f"{max(beyond):.2f} s", f"<= {SENSOR_TARGET_S} s", max(beyond) <= SENSOR_TARGET_S])
        slowest = max(r["run_created_to_done_s"] for r in sensor_rows)
        targets.append(["inbox sensor: run created to searchable, slowest", f"{slowest:.2f} s", "", ""])
        targets.append(["inbox sensor: every run launched in the warm host, stores exact",
                        str(all(r["launched_in_warm_host"] and r["exactness"]["exact"] for r in sensor_rows)), "True",
                        all(r["launched_in_warm_host"] and r["exactness"]["exact"] for r in sensor_rows)])
    if baseline:
        pairs = [(b["seconds"], w["seconds"]) for b, w in zip(pick("before", True), update, strict=False)]
        noops = [(b["seconds"], w["seconds"]) for b, w in zip(pick("before", False)[1:], pick("warm", False),
                                                             strict=False)]
        for label, pair in (("one cycle", pairs), ("no-op", noops)):
            if pair:
                targets.append([f"{label}: before / warm host, median of ratios; ratio of medians",
                                f"{median([b / w for b, w in pair]):.1f}x; "
                                f"{median([b for b, _ in pair]) / median([w for _, w in pair]):.1f}x", "", ""])
    target_table = print_table("Targets", ["target", "measured", "goal", "met"], targets)
    return {"args": vars(args), "cli": cli, "sensor": sensor, "baseline": baseline, "imports": imports,
            "phases_warm_update": phases,
            "steps_warm_update": steps, "phases_cold_update": cold_phases, "targets": targets,
            "table": "\n".join([table, phase_table, target_table])}


if __name__ == "__main__":
    main()
