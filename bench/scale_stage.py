"""One stage of bench/scale.py, materialized in this fresh process, which samples its own resident memory.

    python -m bench.scale_stage STAGE OUT.json [--checks]
"""

import argparse
import json
import time
from pathlib import Path

import psutil

from bench.common import Sampler

SOURCE = "synthetic"


class OwnRss(Sampler):
    """This process's peak resident memory while the stage runs, sampled (not the high-water mark the process
    may have inherited or reached while importing)."""

    def __init__(self) -> None:
        super().__init__()
        self.process = psutil.Process()
        self.peak = self.baseline = self.process.memory_info().rss

    def sample(self) -> None:
        self.peak = max(self.peak, self.process.memory_info().rss)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage")
    parser.add_argument("out")
    parser.add_argument("--checks", action="store_true", help="run the stage's asset checks too (timed apart)")
    args = parser.parse_args()

    from dagster import AssetKey, AssetSelection, DagsterInstance, materialize

    from platform_defs.definitions import ALL_ASSETS, ALL_CHECKS
    from platform_defs.resources import build_resources

    resources = build_resources(resolve_env=True)
    instance = DagsterInstance.get()
    instance.add_dynamic_partitions("sources", [SOURCE])
    partitioned = args.stage in ("documents", "chunks", "embeddings")
    with OwnRss() as rss:
        started = time.perf_counter()
        result = materialize(ALL_ASSETS, instance=instance, resources=resources, selection=[AssetKey(args.stage)],
                             partition_key=SOURCE if partitioned else None)
        seconds = time.perf_counter() - started
    meta = next(e.materialization.metadata for e in result.get_asset_materialization_events())
    value = {k: getattr(v, "value", v) for k, v in meta.items()}
    out = {"rows": int(value.get("rows") or value.get("vectors") or 0), "seconds": round(seconds, 3),
           "peak_rss_mb": round(rss.peak / 2**20, 1), "rss_growth_mb": round((rss.peak - rss.baseline) / 2**20, 1),
           "cache_hit": bool(value.get("cache_hit", False))}
    if "texts_encoded" in value:
        out["texts_encoded"] = int(value["texts_encoded"])
    if args.checks:  # the stage's reconciliation checks, alone, after it
        started = time.perf_counter()
        checked = materialize([*ALL_ASSETS, *ALL_CHECKS], instance=instance, resources=resources,
                              selection=AssetSelection.checks_for_assets(AssetKey(args.stage)))
        out["checks_seconds"] = round(time.perf_counter() - started, 3)
        out["checks_passed"] = all(c.passed for c in checked.get_asset_check_evaluations())
    Path(args.out).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
