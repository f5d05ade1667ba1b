"""A job of four concurrent embedding steps, for comparing spawn with forkserver preload.

Each step encodes the same texts (from QUIVER_BENCH_TEXTS, one JSON list) with the model pool.
"""

import json
import os

import psutil
from dagster import OpExecutionContext, job, multiprocess_executor, op

from resources.model_pool import ModelPool

STEPS = 4


def _texts() -> list[str]:
    with open(os.environ["QUIVER_BENCH_TEXTS"], encoding="utf-8") as fh:
        return json.load(fh)


def _make_step(i: int):  # noqa: ANN202 - an op definition
    @op(name=f"embed_{i}", tags={"quiver/memory": "model"})
    def embed(context: OpExecutionContext, model_pool: ModelPool) -> dict:
        vectors = model_pool.encode(_texts())
        info = model_pool.describe()
        memory = psutil.Process().memory_full_info()
        context.log.info(f"step {i}: {len(vectors)} vectors, inherited={info['model_inherited']}")
        return {"vectors": len(vectors), "inherited": info["model_inherited"], "pid": os.getpid(),
                "pss_mb": memory.pss / 2**20, "uss_mb": memory.uss / 2**20}

    return embed


_steps = [_make_step(i) for i in range(STEPS)]


@job(executor_def=multiprocess_executor, resource_defs={"model_pool": ModelPool()})
def embed_steps_job() -> None:
    for step in _steps:
        step()


def get_embed_steps_job():  # noqa: ANN201 - for dagster.reconstructable
    return embed_steps_job
