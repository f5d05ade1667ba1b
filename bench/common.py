"""Shared bench plumbing: a throwaway instance, a table printer and JSON results."""

import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from quiver.sampling import Sampler  # noqa: F401 - the benchmarks import it from here
from quiver.tables import markdown

PROJECT = Path(__file__).resolve().parent.parent
RESULTS = PROJECT / "bench" / "results"


def fresh_home(prefix: str) -> Path:
    """A new DAGSTER_HOME with the embedded default's dagster.yaml; set in the environment."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    shutil.copy(PROJECT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return home


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform()}


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    text = f"\n{title}\n\n" + markdown(headers, rows)
    print(text, flush=True)
    return text


def write_results(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=str))
    print(f"\nresults written to {path}")
    return path


def wait_for_runs(instance: Any, count: int, started: float, timeout_s: float = 1800) -> list[Any]:
    """The instance's runs once `count` of them exist and all have finished (a backfill through the daemon)."""
    while True:
        runs = instance.get_runs()
        if len(runs) == count and all(r.is_finished for r in runs):
            return runs
        if time.perf_counter() - started > timeout_s:
            raise RuntimeError(f"the backfill did not finish in {timeout_s / 60:.0f} minutes")
        time.sleep(0.5)


def write_stdlib_subset(path: Path, limit: int) -> Path:
    """The first `limit` standard-library documents as a JSONL source (a smaller default corpus)."""
    from quiver.sources import read_documents

    with path.open("w") as fh:
        for i, d in enumerate(read_documents("stdlib", "stdlib")):
            if i == limit:
                break
            fh.write(json.dumps({"id": d.doc_id, "title": d.title, "text": d.text}) + "\n")
    return path
