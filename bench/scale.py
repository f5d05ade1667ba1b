"""Scale benchmark: how each stage's time, memory and bytes grow with the corpus (10k, 100k, 1M documents).

Deterministic synthetic corpora (standard-library docstrings recombined, lengths varied) are written as JSONL
sources; the whole pipeline runs on the `static` backend (QUIVER_MODEL_BACKEND=static), one stage per fresh
process, so each stage's peak RSS is its own process's (sampled every 0.1 s, psutil), not inherited. Per
stage and size: wall time, rows/s, peak RSS, bytes written. At the largest size, a no-op re-run and a re-run
with 1% of the documents changed (edits, additions, deletions), and the reconciliation checks' time.

    python bench/scale.py --sizes 10000                       # what a shared development machine runs
    python bench/scale.py --sizes 10000 100000 1000000        # the full benchmark (an idle machine)
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PROJECT, fresh_home, print_table, write_results  # noqa: E402

STAGES = ("documents", "chunks", "embeddings", "faiss_index", "milvus_collection")
SOURCE = "synthetic"


def fragments(limit: int = 20_000) -> list[str]:
    """Sentences of standard-library docstrings, in a fixed order: the material the corpora recombine."""
    from quiver.sources import read_documents

    out: list[str] = []
    for doc in read_documents("stdlib", "stdlib"):
        for part in doc.text.replace("\n", " ").split(". "):
            part = " ".join(part.split())
            if 20 <= len(part) <= 400:
                out.append(part.rstrip(".") + ".")
        if len(out) >= limit:
            break
    return out


def document(i: int, parts: list[str], salt: str = "") -> dict[str, Any]:
    """Document i: 1 to ~60 sentences (a long-tailed length), chosen by a generator seeded by i (and salt)."""
    rng = random.Random(f"{i}:{salt}")
    count = min(60, max(1, int(rng.lognormvariate(1.6, 0.9))))
    text = " ".join(rng.choice(parts) for _ in range(count))
    return {"id": f"doc-{i:07d}", "title": rng.choice(parts)[:60], "text": text}


def write_corpus(path: Path, size: int, parts: list[str], changed: float = 0.0) -> dict[str, int]:
    """The corpus of `size` documents; with `changed`, that fraction changed: a third edited, a third deleted,
    a third added (ids past the end). Streams line by line."""
    rng = random.Random(f"changes:{size}")
    touched = set(rng.sample(range(size), int(size * changed))) if changed else set()
    edits = {i for i in touched if i % 3 == 0}
    deletes = {i for i in touched if i % 3 == 1}
    additions = len(touched) - len(edits) - len(deletes)
    with path.open("w", encoding="utf-8") as fh:
        for i in range(size + additions):
            if i in deletes:
                continue
            fh.write(json.dumps(document(i, parts, "edit" if i in edits else "")) + "\n")
    return {"edited": len(edits), "deleted": len(deletes), "added": additions}


def tree_bytes(*roots: Path) -> int:
    return sum(f.stat().st_size for root in roots if root.exists() for f in root.rglob("*") if f.is_file())


def run_stage(home: Path, stage: str, checks: bool = False) -> dict[str, Any]:
    """One stage materialized in a fresh process (bench/scale_stage.py), with what it measured of itself."""
    out = home / f"stage-{stage}.json"
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(PROJECT)}
    cmd = [sys.executable, "-m", "bench.scale_stage", stage, str(out), *(["--checks"] if checks else [])]
    proc = subprocess.run(cmd, cwd=PROJECT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage} failed:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def run_pipeline(home: Path, label: str, size: int, with_checks: bool) -> list[dict[str, Any]]:
    storage = home / "artifacts"
    rows = []
    for stage in STAGES:
        before = tree_bytes(storage, home / "milvus")
        measured = run_stage(home, stage, checks=with_checks and stage in ("faiss_index", "milvus_collection"))
        written = max(0, tree_bytes(storage, home / "milvus") - before)
        rows.append({"run": label, "documents": size, "stage": stage, **measured, "bytes_written": written})
        print(f"  {label} {size:>9,} {stage:<18} {measured['seconds']:>8.2f} s  peak {measured['peak_rss_mb']:.0f} MiB",
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--changed", type=float, default=0.01, help="fraction changed in the re-run")
    parser.add_argument("--name", default="scale", help="results file: bench/results/NAME.json")
    args = parser.parse_args()

    os.environ.setdefault("QUIVER_MODEL_BACKEND", "static")
    os.environ.setdefault("QUIVER_EXECUTION_MODE", "in_process")
    parts = fragments()
    fresh_home("quiver-bench-scale-warm-")
    from platform_defs.resources import build_resources

    warm = time.perf_counter()
    build_resources(resolve_env=True)["model_pool"].loaded()  # builds the backend's export once, outside the timings
    print(f"model backend {os.environ['QUIVER_MODEL_BACKEND']} ready in {time.perf_counter() - warm:.1f} s", flush=True)
    results: list[dict[str, Any]] = []
    changes: dict[str, int] = {}
    for size in sorted(args.sizes):
        home = fresh_home(f"quiver-bench-scale-{size}-")
        corpus = home / "corpus.jsonl"
        write_corpus(corpus, size, parts)
        build_resources(resolve_env=True)["sources"].add(SOURCE, str(corpus), "jsonl")
        largest = size == max(args.sizes)
        results += run_pipeline(home, "full", size, with_checks=largest)
        if largest:
            results += run_pipeline(home, "no-op", size, with_checks=True)
            changes = write_corpus(corpus, size, parts, changed=args.changed)
            results += run_pipeline(home, f"{args.changed:.0%} changed", size, with_checks=True)

    headers = ["run", "documents", "stage", "rows", "seconds", "rows/s", "peak RSS MiB", "bytes written",
               "texts encoded", "checks s"]
    table = [[r["run"], f"{r['documents']:,}", r["stage"], f"{r['rows']:,}", f"{r['seconds']:.2f}",
              f"{r['rows'] / r['seconds']:,.0f}" if r["seconds"] and r["rows"] else "-", f"{r['peak_rss_mb']:.0f}",
              f"{r['bytes_written']:,}", r.get("texts_encoded", "-"), r.get("checks_seconds", "-")] for r in results]
    print_table("Scale: each stage in its own process, static backend", headers, table)
    write_results(args.name, {"sizes": sorted(args.sizes), "changed": args.changed, "changes": changes,
                              "backend": os.environ["QUIVER_MODEL_BACKEND"], "stages": results,
                              "finished_at": time.time()})


if __name__ == "__main__":
    main()
