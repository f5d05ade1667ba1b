"""Model pool benchmark, all measured in one run on the same data:

1. the seed documents' naive baseline (a model loaded per task of 256 texts) against the pool;
2. four concurrent embedding steps, spawn against forkserver with the model preloaded: wall time and
   the summed PSS of the step processes (sampled with psutil while they run);
3. a re-run after 1% of the default corpus's documents changed: texts encoded and wall time.

    python bench/model_pool.py [--repeats 3] [--tasks 6] [--step-texts 128]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PROJECT, Sampler, fresh_home, median, print_table, write_results  # noqa: E402

FORKSERVER_MAIN = "from multiprocessing.forkserver import main"


def stdlib_texts(n: int) -> list[str]:
    from quiver.sources import read_documents

    texts = []
    for doc in read_documents("stdlib", "stdlib"):
        texts.append(f"{doc.title}\n{doc.text}"[:1500])
        if len(texts) == n:
            break
    return texts


TASK_TEXTS = 256  # texts per task in the seed's naive baseline


def naive_vs_pool(tasks: int, repeats: int) -> dict[str, Any]:
    """The seed's failure: every task builds its own SentenceTransformer. The pool loads once per repeat (its
    process-wide model is dropped before each). Both encode at the pool's batch size, interleaved, medians."""
    from sentence_transformers import SentenceTransformer

    from resources import model_pool
    from resources.model_pool import ModelPool

    texts = stdlib_texts(TASK_TEXTS * tasks)
    batches = [texts[i * TASK_TEXTS:(i + 1) * TASK_TEXTS] for i in range(tasks)]
    pool = ModelPool()
    naive, pooled = [], []
    for repeat in range(repeats):
        for mode in ("naive", "pool") if repeat % 2 == 0 else ("pool", "naive"):
            started = time.perf_counter()
            if mode == "naive":
                for batch in batches:
                    model = SentenceTransformer(pool.model_path, device="cpu")
                    model.encode(batch, batch_size=pool.batch_size, normalize_embeddings=True,
                                 show_progress_bar=False)
                    del model
                naive.append(time.perf_counter() - started)
            else:
                model_pool._STATES.pop(pool.fingerprint(), None)  # this repeat pays its own load
                for batch in batches:
                    pool.encode(batch)
                pooled.append(time.perf_counter() - started)
        print(f"naive repeat {repeat + 1}: load per task {naive[-1]:.1f}s, pool {pooled[-1]:.1f}s", flush=True)
    return {"tasks": tasks, "texts_per_task": [len(b) for b in batches], "batch_size": pool.batch_size,
            "naive_s": naive, "pool_s": pooled, "naive_median_s": median(naive), "pool_median_s": median(pooled),
            "ratio": median(naive) / median(pooled),
            "ratio_per_repeat": [a / b for a, b in zip(naive, pooled, strict=True)]}


class PssSampler(Sampler):
    """Samples the summed PSS of the step processes of one run (under `root`) until stopped."""

    interval_s = 0.25

    def __init__(self, mode: str, root: psutil.Process) -> None:
        super().__init__()
        self.mode = mode
        self.root = root
        self.peak_sum = 0
        self.peak_single = 0
        self.steps_seen: set[int] = set()

    def step_processes(self) -> list[psutil.Process]:
        """spawn: the spawn_main children. forkserver: the children of the run's forkserver itself
        (not the forkserver, and not the helpers a step starts)."""
        try:
            children = self.root.children(recursive=True)
        except psutil.Error:
            return []
        found = []
        servers = set()
        for proc in children:
            try:
                if FORKSERVER_MAIN in " ".join(proc.cmdline()) and proc.ppid() == self.root.pid:
                    servers.add(proc.pid)
            except psutil.Error:
                continue
        for child in children:
            try:
                cmd = " ".join(child.cmdline())
                parent_pid = child.ppid()
            except psutil.Error:
                continue
            if "resource_tracker" in cmd:
                continue
            if (self.mode == "spawn" and "spawn_main" in cmd) or (self.mode == "forkserver" and parent_pid in servers):
                found.append(child)
        return found

    def sample(self) -> None:
        total = 0
        for proc in self.step_processes():
            try:
                pss = proc.memory_full_info().pss
            except psutil.Error:
                continue
            self.steps_seen.add(proc.pid)
            total += pss
            self.peak_single = max(self.peak_single, pss)
        self.peak_sum = max(self.peak_sum, total)


def concurrent_steps(mode: str, texts_file: Path) -> dict[str, Any]:
    """Four embedding steps at once, in a fresh orchestrating process (one forkserver per run)."""
    start_method = ({"spawn": {}} if mode == "spawn" else
                    {"forkserver": {"preload_modules": ["bench.embed_steps_job", "platform_defs.preload"]}})
    # Four model steps share the cores: one intra-op thread each, in both modes, so none oversubscribes.
    threads = max(1, (os.cpu_count() or 1) // 4)
    config = {"execution": {"config": {"max_concurrent": 4, "start_method": start_method}},
              "resources": {"model_pool": {"config": {"threads": threads}}}}
    script = (
        "import json,sys,time\n"
        "from dagster import DagsterInstance, execute_job, reconstructable\n"
        "from bench.embed_steps_job import get_embed_steps_job\n"
        "t=time.perf_counter()\n"
        f"with execute_job(reconstructable(get_embed_steps_job), DagsterInstance.get(), run_config={config!r}) as r:\n"
        "    wall=time.perf_counter()-t\n"
        "    steps=[r.output_for_node(f'embed_{i}') for i in range(4)]\n"
        "print(json.dumps({'success': r.success, 'wall_s': wall, 'steps': steps}))\n"
    )
    env = {**os.environ, "QUIVER_BENCH_TEXTS": str(texts_file), "PYTHONPATH": str(PROJECT)}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=PROJECT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    with PssSampler(mode, psutil.Process(proc.pid)) as sampler:
        out, err = proc.communicate(timeout=900)
    wall = time.perf_counter() - started
    if proc.returncode != 0 or not out.strip():
        raise RuntimeError(f"{mode} run failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["success"], f"{mode} run failed"
    return {"wall_s": wall, "run_s": result["wall_s"], "pss_sum_mb": sampler.peak_sum / 2**20,
            "pss_single_mb": sampler.peak_single / 2**20, "steps": len(sampler.steps_seen),
            "step_reports": result["steps"]}


def one_percent_change(home: Path) -> dict[str, Any]:
    """Full ingest of the default corpus (as JSONL), then 1% of documents edited and ingested again."""
    from dagster import DagsterInstance, materialize

    from platform_defs.definitions import ALL_ASSETS
    from platform_defs.resources import build_resources
    from quiver.sources import read_documents

    docs = [{"id": d.doc_id, "title": d.title, "text": d.text} for d in read_documents("stdlib", "stdlib")]
    source = home / "stdlib.jsonl"
    source.write_text("".join(json.dumps(d) + "\n" for d in docs))
    res = build_resources(resolve_env=True)
    res["sources"].add("stdlib_copy", str(source))
    instance = DagsterInstance.get()
    instance.add_dynamic_partitions("sources", ["stdlib_copy"])

    def run() -> tuple[float, dict[str, Any]]:
        started = time.perf_counter()
        result = materialize(ALL_ASSETS, instance=instance, resources=res, partition_key="stdlib_copy",
                             selection=["documents", "chunks", "embeddings"])
        materialize(ALL_ASSETS, instance=instance, resources=res, selection=["faiss_index", "milvus_collection"])
        wall = time.perf_counter() - started
        event = next(e for e in result.get_asset_materialization_events()
                     if e.materialization.asset_key.to_user_string() == "embeddings")
        return wall, {k: v.value for k, v in event.materialization.metadata.items()}

    first_wall, first = run()
    step = 100  # every 100th document: 1%
    for i in range(0, len(docs), step):
        docs[i]["text"] += "\n\nRevised: this paragraph was added after the first indexing run."
    source.write_text("".join(json.dumps(d) + "\n" for d in docs))
    second_wall, second = run()
    return {"documents": len(docs), "changed_documents": len(range(0, len(docs), step)),
            "chunks": first["rows"], "first_encoded": first["texts_encoded"], "first_wall_s": first_wall,
            "second_encoded": second["texts_encoded"], "second_wall_s": second_wall,
            "text_fraction": second["texts_encoded"] / first["texts_encoded"],
            "time_fraction": second_wall / first_wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="spawn/forkserver run pairs (medians reported)")
    parser.add_argument("--tasks", type=int, default=6, help=f"tasks of {TASK_TEXTS} texts in the naive baseline")
    parser.add_argument("--step-texts", type=int, default=128, help="texts each concurrent step encodes")
    parser.add_argument("--skip-change", action="store_true", help="skip the 1%% change part")
    args = parser.parse_args()
    home = fresh_home("quiver-bench-pool-")

    naive = naive_vs_pool(args.tasks, args.repeats)
    print(f"naive {naive['naive_median_s']:.1f}s vs pool {naive['pool_median_s']:.1f}s (medians)", flush=True)

    texts_file = home / "step_texts.json"
    texts_file.write_text(json.dumps(stdlib_texts(args.step_texts)))
    runs: dict[str, list[dict[str, Any]]] = {"spawn": [], "forkserver": []}
    for i in range(args.repeats):
        for mode in ("spawn", "forkserver"):
            runs[mode].append(concurrent_steps(mode, texts_file))
            r = runs[mode][-1]
            print(f"repeat {i + 1} {mode}: {r['wall_s']:.1f}s, summed PSS {r['pss_sum_mb']:.0f} MB over "
                  f"{r['steps']} processes; steps' own PSS/USS at their end: "
                  f"{[(round(s['pss_mb']), round(s['uss_mb'])) for s in r['step_reports']]}", flush=True)
    med = {mode: {k: median([r[k] for r in rs]) for k in ("wall_s", "pss_sum_mb", "pss_single_mb")}
           for mode, rs in runs.items()}
    one_process = med["spawn"]["pss_single_mb"]
    pss_ratio = med["forkserver"]["pss_sum_mb"] / one_process
    speedup = med["spawn"]["wall_s"] / med["forkserver"]["wall_s"]
    speedup_per_repeat = [a["wall_s"] / b["wall_s"] for a, b in zip(runs["spawn"], runs["forkserver"], strict=True)]
    pss_per_repeat = [f["pss_sum_mb"] / s["pss_single_mb"] for s, f in zip(runs["spawn"], runs["forkserver"],
                                                                           strict=True)]

    change = None if args.skip_change else one_percent_change(home)

    rows = [
        ["naive load-per-task / pool, wall (medians; median of ratios)",
         f"{naive['naive_median_s']:.1f}s / {naive['pool_median_s']:.1f}s = {naive['ratio']:.2f}x; "
         f"{median(naive['ratio_per_repeat']):.2f}x", "pool faster",
         min(naive["ratio"], median(naive["ratio_per_repeat"])) > 1],
        ["4 steps: spawn wall (median)", f"{med['spawn']['wall_s']:.1f}s", "", ""],
        ["4 steps: forkserver+preload wall (median)", f"{med['forkserver']['wall_s']:.1f}s", "", ""],
        ["spawn / forkserver wall (ratio of medians; median of ratios)",
         f"{speedup:.2f}x; {median(speedup_per_repeat):.2f}x", ">= 2x", min(speedup, median(speedup_per_repeat)) >= 2],
        ["4 steps: spawn summed PSS (median)", f"{med['spawn']['pss_sum_mb']:.0f} MB", "", ""],
        ["4 steps: forkserver summed PSS (median)", f"{med['forkserver']['pss_sum_mb']:.0f} MB", "", ""],
        ["one model process's PSS (spawn step)", f"{one_process:.0f} MB", "", ""],
        ["forkserver summed PSS / one process (ratio of medians; median of ratios)",
         f"{pss_ratio:.2f}x; {median(pss_per_repeat):.2f}x", "<= 1.5x", max(pss_ratio, median(pss_per_repeat)) <= 1.5],
    ]
    if change:
        rows += [
            ["1% changed: texts encoded", f"{change['second_encoded']} / {change['first_encoded']} = "
             f"{change['text_fraction']:.2%}", "< 5%", change["text_fraction"] < 0.05],
            ["1% changed: wall vs first run", f"{change['second_wall_s']:.1f}s / {change['first_wall_s']:.1f}s = "
             f"{change['time_fraction']:.1%}", "< 15%", change["time_fraction"] < 0.15],
        ]
    table = print_table(f"Model pool (naive: {args.tasks} tasks x {TASK_TEXTS} texts at batch size "
                        f"{naive['batch_size']}, as the pool; 4 steps x {args.step_texts} texts each; "
                        f"{args.repeats} repeats, medians)", ["measure", "value", "target", "met"], rows)
    write_results("model_pool", {"naive": naive, "concurrent_runs": runs, "medians": med,
                                 "pss_ratio": pss_ratio, "pss_ratio_per_repeat": pss_per_repeat,
                                 "speedup": speedup, "speedup_per_repeat": speedup_per_repeat,
                                 "one_percent_change": change,
                                 "table": table})


if __name__ == "__main__":
    main()
