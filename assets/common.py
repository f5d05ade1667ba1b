"""What every stage shares: the sources partitioning, code versions, cache keys and run metadata."""

import resource
import time
import warnings
from collections.abc import Mapping
from typing import Any

from dagster import AssetExecutionContext, BetaWarning, DynamicPartitionsDefinition, MetadataValue

from quiver.codeversion import code_version
from quiver.hashing import sha256_json

# Output(data_version=...) is how a materialization carries its content hash; it is beta in 1.13.
warnings.filterwarnings("ignore", category=BetaWarning)

sources_partitions = DynamicPartitionsDefinition(name="sources")

# Op tag naming the memory class of a step (see the concurrency limits).
MEMORY_TAG = "quiver/memory"


def stage_code_version(module: str) -> str:
    return code_version(module)


def stage_cache_key(
    context: AssetExecutionContext,
    code_version_: str,
    inputs: Mapping[str, Any],
    config: Mapping[str, Any],
) -> str:
    """Same code, same upstream data versions, same config, same partition -> same key."""
    partition = context.partition_key if context.has_partition_key else None
    return sha256_json({
        "asset": context.asset_key.to_user_string(),
        "partition": partition,
        "code_version": code_version_,
        "inputs": inputs,
        "config": config,
    })[:32]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_metadata(started: float, rows: int, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    seconds = time.perf_counter() - started
    return {
        "duration_seconds": MetadataValue.float(round(seconds, 3)),
        "rows_per_second": MetadataValue.float(round(rows / seconds, 1) if seconds > 0 else 0.0),
        "peak_rss_mb": MetadataValue.float(round(peak_rss_mb(), 1)),
        **(extra or {}),
    }


def partition_of(context: AssetExecutionContext) -> str | None:
    return context.partition_key if context.has_partition_key else None
