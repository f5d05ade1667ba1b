"""Steps of a known size, for the concurrency benchmark and tests: each holds QUIVER_BALLAST_MB of private
memory (every page touched), computes for QUIVER_BALLAST_CPU_S seconds of CPU on one thread, and keeps the
memory until QUIVER_BALLAST_HOLD_S seconds have passed since it started (a step waiting on I/O, such as an
insert into a vector store, holds its batch meanwhile).

`ballast` is a partitioned asset (a backfill of it is one run per partition, capped across runs by the
model pool); `heavy_steps_job` has QUIVER_HEAVY_STEPS such steps in one run (capped by the executor's
tag limits). Both run on Quiver's memory-bound executor.

    dagster job backfill -m bench.memory_job -j ballast_job --partitions p00,p01 --noprompt
    dagster job execute -m bench.memory_job -j heavy_steps_job
"""

import os
import time
from typing import Any

import numpy as np
import psutil
from dagster import (
    AssetExecutionContext,
    Definitions,
    MaterializeResult,
    OpExecutionContext,
    StaticPartitionsDefinition,
    asset,
    define_asset_job,
    job,
    op,
)

from assets.common import memory_class
from platform_defs.executor import quiver_executor

PARTITIONS = StaticPartitionsDefinition([f"p{i:02d}" for i in range(int(os.environ.get("QUIVER_BALLAST_PARTITIONS",
                                                                                        "16")))])
HEAVY_STEPS = int(os.environ.get("QUIVER_HEAVY_STEPS", "6"))
EXECUTOR = quiver_executor(preload_model=False, preload=("bench.memory_job",))


def hold_and_compute(megabytes: int | None = None, cpu_seconds: float | None = None,
                     hold_seconds: float | None = None) -> dict[str, Any]:
    """Holds the ballast while burning CPU; returns when, where, and how much memory the process had."""
    megabytes = int(os.environ.get("QUIVER_BALLAST_MB", "200")) if megabytes is None else megabytes
    cpu_seconds = float(os.environ.get("QUIVER_BALLAST_CPU_S", "1.0")) if cpu_seconds is None else cpu_seconds
    hold_seconds = float(os.environ.get("QUIVER_BALLAST_HOLD_S", "0")) if hold_seconds is None else hold_seconds
    started = time.time()
    ballast = np.ones(megabytes * 2**20 // 8)  # written, so resident
    cpu_start = time.process_time()
    x = np.linspace(0.0, 1.0, 4096)
    while time.process_time() - cpu_start < cpu_seconds:
        x = np.tanh(x * 1.0001 + 0.0001)  # elementwise: one thread
    time.sleep(max(0.0, started + hold_seconds - time.time()))
    rss = psutil.Process().memory_info().rss
    return {"pid": os.getpid(), "started": started, "finished": time.time(), "rss_bytes": rss,
            "ballast_bytes": int(ballast.nbytes), "checksum": float(x.sum())}


@asset(partitions_def=PARTITIONS, **memory_class("model"))
def ballast(context: AssetExecutionContext) -> MaterializeResult:
    facts = hold_and_compute()
    context.log.info(f"ballast[{context.partition_key}]: {facts['ballast_bytes'] // 2**20} MiB held in pid "
                     f"{facts['pid']}")
    return MaterializeResult(metadata=facts)


ballast_job = define_asset_job("ballast_job", selection=[ballast], partitions_def=PARTITIONS)


def _heavy_step(i: int):  # noqa: ANN202 - an op definition
    step_class = memory_class("model")

    @op(name=f"heavy_{i}", tags=step_class["op_tags"], pool=step_class["pool"])
    def heavy(context: OpExecutionContext) -> dict[str, Any]:
        facts = hold_and_compute()
        context.log.info(f"heavy_{i}: {facts['ballast_bytes'] // 2**20} MiB held in pid {facts['pid']}")
        return facts

    return heavy


_HEAVY = [_heavy_step(i) for i in range(HEAVY_STEPS)]


@job(executor_def=EXECUTOR)
def heavy_steps_job() -> None:
    for step in _HEAVY:
        step()


defs = Definitions(assets=[ballast], jobs=[ballast_job, heavy_steps_job], executor=EXECUTOR)
