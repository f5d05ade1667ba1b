"""Which of the executor's two ways a run takes: a process per step (forked from a forkserver that loaded the
model), or every step in the run's own process.

A small run's work takes well under a second, but starting a forkserver that preloads the model, and a
process per step, takes many: a small run is faster in process, where the model is loaded only if a step
actually encodes. A large run keeps the processes, whose steps overlap and whose memory each is bounded.
"""

import os
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

DEFAULT_IN_PROCESS_MAX_CHUNKS = 20_000
MODE_ENV = "QUIVER_EXECUTION_MODE"  # what `auto` (the config's default) means where it is set
# The jobs whose size auto can tell (the pipeline's; the UI's and `dagster asset materialize`'s asset job); any
# other job keeps the processes.
PIPELINE_JOBS = {"ingest_job", "index_job", "refresh_job", "eval_job", "__ASSET_JOB"}
PARTITION_TAG = "dagster/partition"
RANGE_TAGS = ("dagster/asset_partition_range_start", "dagster/asset_partition_range_end")


class ExecutionMode(StrEnum):
    AUTO = "auto"
    IN_PROCESS = "in_process"
    MULTIPROCESS = "multiprocess"


@dataclass(frozen=True)
class ModeChoice:
    in_process: bool
    message: str


INDEX_STEPS = ("faiss_index", "milvus_collection")


def run_partitions(tags: dict[str, str], known: list[str], indexes: bool) -> list[str]:
    """The source partitions whose size decides a run: its partition or its range; every source when the run
    updates an index (the index steps and their checks read every source's vectors)."""
    if indexes:
        return list(known)
    if PARTITION_TAG in tags:
        return [tags[PARTITION_TAG]]
    start, end = (tags.get(t) for t in RANGE_TAGS)
    if start in known and end in known:
        return known[known.index(start):known.index(end) + 1]
    return list(known)


BYTES_PER_CHUNK = 1000  # a 256-token chunk of English text is about 1,000-1,200 characters
GZIP_RATIO = 4  # text compresses about 3-4x


def _text_bytes(path: str) -> int:
    return os.path.getsize(path) * (GZIP_RATIO if path.endswith(".gz") else 1)


def estimated_chunks(path: str, kind: str, limit: int) -> int | None:
    """A never-chunked source's chunks, from its bytes on disk (counted up to the limit, no further); None when
    its size cannot be told (the standard library, a remote path)."""
    if kind == "stdlib" or "://" in path or not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return _text_bytes(path) // BYTES_PER_CHUNK
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            total += _text_bytes(os.path.join(folder, name))
            if total > limit * BYTES_PER_CHUNK:
                return total // BYTES_PER_CHUNK
    return total // BYTES_PER_CHUNK


def chunks_held(partitions: list[str], resources: dict[str, Any], limit: int) -> tuple[int | None, bool]:
    """The chunks the partitions held at their last materialization (estimated for one never chunked), and
    whether it is an estimate; None when a size cannot be told."""
    total, estimated = 0, False
    for partition in partitions:
        try:
            ref = resources["store"].read_latest(["chunks"], partition)
        except Exception:  # noqa: BLE001 - a damaged pointer: its step says so; its size is unknown here
            return None, True
        if ref is not None:
            total += ref.rows
            continue
        try:
            spec = resources["sources"].get(partition)
        except Exception:  # noqa: BLE001 - an unknown source fails in its step, with its own message
            return None, True
        guess = estimated_chunks(spec.path, spec.kind, limit)
        if guess is None:
            return None, True
        total, estimated = total + guess, True
    return total, estimated


def choose_mode(mode: str, max_chunks: int, plan_context: Any, step_keys: list[str]) -> ModeChoice:
    """The mode of this run, and a log line that says why."""
    mode = ExecutionMode(mode)
    if mode is ExecutionMode.AUTO and os.environ.get(MODE_ENV):
        try:
            mode = ExecutionMode(os.environ[MODE_ENV])
        except ValueError as exc:
            raise ValueError(f"{MODE_ENV}={os.environ[MODE_ENV]!r}: use auto, in_process or multiprocess") from exc
    if mode is not ExecutionMode.AUTO:
        return ModeChoice(mode is ExecutionMode.IN_PROCESS, f"execution mode {mode.value} (configured)")
    if plan_context.dagster_run.job_name not in PIPELINE_JOBS:
        return ModeChoice(False, f"execution mode multiprocess (auto): {plan_context.dagster_run.job_name} is not "
                                 "one of the pipeline's jobs")
    from platform_defs.resources import build_resources

    indexes = any(key.startswith(INDEX_STEPS) for key in step_keys)
    partitions = run_partitions(dict(plan_context.dagster_run.tags),
                                plan_context.instance.get_dynamic_partitions("sources"), indexes)
    rows, estimated = chunks_held(partitions, build_resources(resolve_env=True), max_chunks)
    if rows is None:
        return ModeChoice(False, "execution mode multiprocess (auto): a source of this run was never chunked, "
                                 "and its size cannot be told from its files")
    held = f"{'about ' if estimated else ''}{rows} chunks {'(by bytes on disk) ' if estimated else ''}held by " \
           f"{len(partitions)} source(s)"
    if rows <= max_chunks:
        return ModeChoice(True, f"execution mode in_process (auto): {held}, at most {max_chunks}; steps run one at "
                                "a time in this process, the model is loaded only if a step encodes")
    return ModeChoice(False, f"execution mode multiprocess (auto): {held}, more than {max_chunks}")
