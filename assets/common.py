"""What every stage shares: the sources partitioning, code versions, cache keys and run metadata.

The document-level stages have a single-run backfill policy: one run may materialize many source
partitions (one model load for all of them), so each stage computes a result per partition.
"""

import functools
import inspect
import os
import resource
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dagster import (
    AssetCheckExecutionContext,
    AssetExecutionContext,
    AssetsDefinition,
    BackfillPolicy,
    Backoff,
    BetaWarning,
    DataVersion,
    DynamicPartitionsDefinition,
    Failure,
    Jitter,
    MetadataValue,
    OpExecutionContext,
    Output,
    PreviewWarning,
    RetryPolicy,
    asset,
)

from assets.reporting import Computed, PartitionResult, Report, made_record, partitions_metadata
from quiver.codeversion import stage_versions
from quiver.errors import ConfigError, InputError
from quiver.hashing import sha256_json
from quiver.memory import MEMORY_TAG, NEED_TAG_PREFIX, MemoryShortError, pool_name, step_refusal
from quiver.names import check_source_name
from quiver.report import rounded
from quiver.retry import ServiceUnavailableError, is_transient
from resources.fileref import FileRef, FileStore

# Output(data_version=...) is how a materialization carries its content hash; it is beta in 1.13.
warnings.filterwarnings("ignore", category=BetaWarning)
# Asset checks partitioned like their asset (one verdict per source) are a preview feature in 1.13.
warnings.filterwarnings("ignore", category=PreviewWarning)

sources_partitions = DynamicPartitionsDefinition(name="sources")
# retrieval_eval's partitions: only the sources with judged queries (queries.jsonl and qrels/), so that a source
# without them (the stdlib corpus, a JSONL file) is not an evaluation shown missing forever.
judged_sources_partitions = DynamicPartitionsDefinition(name="judged_sources")
# A backfill over many sources runs once, so the model is loaded once for all of them.
single_run_backfill = BackfillPolicy.single_run()

# Who answers for every asset (shown on each asset's page; Dagster wants `team:` or an email).
OWNERS = ["team:quiver"]
# Where an asset's output lives, shown with its icon on the asset's page.
STORAGE_KIND = "dagster/storage_kind"

# With the Celery executor, a step goes to the queue named by this tag: one queue per memory class, served by
# the workers that have the memory (or GPU) for it.
CELERY_QUEUE_TAG = "dagster-celery/queue"


# Every step talks to a service (Milvus, Redis, or the storage root on an object store). A transient error that
# outlasted the retries inside the call fails the step, which Dagster runs again after a backoff; any other
# error fails at once (see fail_fast_unless_transient).
# QUIVER_STEP_RETRIES and QUIVER_STEP_RETRY_DELAY_S (seconds before the first retry) tune it where the
# definitions load.
SERVICE_RETRY_POLICY = RetryPolicy(max_retries=int(os.environ.get("QUIVER_STEP_RETRIES", "3")),
                                   delay=float(os.environ.get("QUIVER_STEP_RETRY_DELAY_S", "2")),
                                   backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS)


def memory_class(name: str) -> dict[str, Any]:
    """@asset arguments of a step of a memory class: the op tag (limits within a run), its concurrency pool
    (the same limit across runs), on Celery its queue, and the retry policy for transient service errors."""
    return {"op_tags": {MEMORY_TAG: name, CELERY_QUEUE_TAG: name}, "pool": pool_name(name),
            "retry_policy": SERVICE_RETRY_POLICY}


def _permanent(exc: Exception) -> Failure:
    metadata = {"error": type(exc).__name__}
    if isinstance(exc, InputError):
        metadata.update({"location": exc.location, "problem": exc.problem})
    return Failure(description=str(exc), metadata=metadata, allow_retries=False)


def fail_fast_unless_transient(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A step body whose errors that may pass by themselves (a service down, a timeout) are raised as they are,
    for the retry policy, and whose other errors (bad input, a wrong dimension, a bug) become a Failure
    that is not retried, with the error's own message."""

    def check_memory(args: tuple[Any, ...]) -> None:
        """The worker-side preflight: a step whose class's need (recorded on the run when it started) does not
        fit in what this machine may use now is not started; it is retried later."""
        context = next((a for a in args if isinstance(
            a, AssetExecutionContext | AssetCheckExecutionContext | OpExecutionContext)), None)  # an op: a shard step
        if context is None:
            return
        memory_class = context.op_def.tags.get(MEMORY_TAG)
        need = context.run.tags.get(f"{NEED_TAG_PREFIX}{memory_class}")
        if memory_class and need and (refusal := step_refusal(memory_class, int(need))):
            raise MemoryShortError(refusal)

    def judged(exc: Exception) -> Exception:
        transient = isinstance(exc, ServiceUnavailableError) or is_transient(exc)
        return exc if transient or isinstance(exc, Failure) else _permanent(exc)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args: Any, **kwargs: Any) -> Any:
            try:
                check_memory(args)
                yield from fn(*args, **kwargs)
            except Exception as exc:
                raise judged(exc) from exc
        return generator

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            check_memory(args)
            return fn(*args, **kwargs)
        except Exception as exc:
            failure = judged(exc)
            if failure is exc:
                raise
            raise failure from exc
    return call


def with_code_versions(assets: Sequence[AssetsDefinition]) -> list[AssetsDefinition]:
    """The assets with their code versions set from the asset graph itself: each asset's version hashes the
    project code its ops run (quiver.codeversion) and the versions of the assets it reads, so editing a
    stage marks it and everything downstream stale in the UI, and its caches miss."""
    by_key = {key: a for a in assets for key in a.keys}
    modules = {key: sorted({op.compute_fn.decorated_fn.__module__ for op in a.node_def.iterate_op_defs()})
               for key, a in by_key.items()}
    upstream = {key: sorted(a.asset_deps[key], key=str) for key, a in by_key.items()}
    versions = stage_versions(modules, upstream)
    return [a.map_asset_specs(lambda spec: spec.replace_attributes(code_version=versions[spec.key]))
            for a in assets]


def own_code_version(context: AssetExecutionContext) -> str:
    """The code version Dagster holds for the asset being materialized (what its cache keys include)."""
    version = context.assets_def.code_versions_by_key.get(context.asset_key)
    if not version:
        raise ConfigError(f"{context.asset_key.to_user_string()} has no code version: build the assets with "
                          "assets.common.with_code_versions (platform_defs.definitions does)")
    return version


def source_stage(*, memory: str, kinds: set[str], description: str):  # noqa: ANN201
    """@asset for a document-level stage: partitioned by source, single-run backfills, FileRef outputs."""

    def decorate(fn) -> AssetsDefinition:  # noqa: ANN001
        return asset(
            partitions_def=sources_partitions,
            backfill_policy=single_run_backfill,
            io_manager_key="fileref_io_manager",
            group_name="ingest",
            kinds=kinds,
            owners=OWNERS,
            tags={STORAGE_KIND: "parquet"},
            description=description,
            **memory_class(memory),
        )(fail_fast_unless_transient(fn))

    return decorate


def partitions_in_run(context: AssetExecutionContext) -> list[str]:
    """The source partitions this run materializes: one, or a range in a single-run backfill. Each key is
    checked first: one added from the UI or GraphQL may be anything, and keys become storage paths."""
    return [check_source_name(key, "partition key") for key in context.partition_keys]


def refs_by_partition(value: FileRef | Mapping[str, FileRef], partitions: list[str]) -> dict[str, FileRef]:
    """An upstream input as {partition: FileRef}, whether one partition or many were loaded."""
    if isinstance(value, FileRef):
        return {partitions[0]: value}
    return dict(value)


def stage_cache_key(
    context: AssetExecutionContext,
    partition: str | None,
    inputs: Mapping[str, Any],
    config: Mapping[str, Any],
) -> str:
    """Same code, same upstream data versions, same config, same partition -> same key."""
    return sha256_json({
        "asset": context.asset_key.to_user_string(),
        "partition": partition,
        "code_version": own_code_version(context),
        "inputs": inputs,
        "config": config,
    })[:32]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_metadata(started: float, rows: int, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Duration, throughput and peak memory of work done now (never of a cache hit), rounded."""
    seconds = time.perf_counter() - started
    return {
        "duration_seconds": MetadataValue.float(rounded(seconds)),
        "rows_per_second": MetadataValue.float(rounded(rows / seconds) if seconds > 0 else 0.0),
        "peak_rss_mb": MetadataValue.float(rounded(peak_rss_mb())),
        **(extra or {}),
    }


def cached_partition(context: AssetExecutionContext, store: FileStore, partition: str, inputs: Mapping[str, Any],
                     config: Mapping[str, Any], force: bool, compute: Callable[[], Computed],
                     hit_metadata: Mapping[str, Any] | None = None) -> PartitionResult:
    """A source stage's output for one partition: the remembered output of the same cache key (code version,
    upstream hashes, config, partition) when it is still intact, with how it was made (the run, when, its
    figures), else `compute()`'s, remembered under the key once written."""
    asset = context.asset_key.path
    key = stage_cache_key(context, partition, inputs, config)
    cached = None if force else store.cached_output(asset, partition, key)
    if cached is not None:
        ref, made = cached
        context.log.info(f"{'/'.join(asset)}[{partition}]: cache hit {key}, reusing {ref.path} made by run "
                         f"{made.get('run_id', '(not recorded)')}")
        return PartitionResult(ref, True, key, Report(metadata=dict(hit_metadata or {})), made)
    started = time.perf_counter()
    computed = compute()
    assert computed.ref is not None
    made = made_record(context.run.run_id, time.perf_counter() - started, computed)
    store.remember_fileref(asset, partition, key, computed.ref, made)
    return PartitionResult(computed.ref, False, key, computed, made)


def partitioned_output(started: float, results: Mapping[str, PartitionResult], noun: str = "rows",
                       step: Report | None = None) -> Output[Any]:
    """One partition: its FileRef, with its content hash as the data version. Several (a single-run
    backfill): {partition: FileRef}; Output takes one data version for all partitions, so Dagster records
    its logical version (code version + inputs) and each partition's content hash is in the metadata."""
    step = step or Report()
    if not all(r.cache_hit for r in results.values()):
        step.metadata.setdefault("peak_rss_mb", MetadataValue.float(rounded(peak_rss_mb())))
    metadata = partitions_metadata(results, time.perf_counter() - started, noun, step)
    if len(results) == 1:
        [result] = results.values()
        return Output(result.ref, data_version=DataVersion(result.ref.sha256), metadata=metadata)
    return Output({p: r.ref for p, r in results.items()}, metadata=metadata)
