"""This machine's concurrency limits per memory class, computed when the definitions load.

They are logged, applied as the multiprocess executor's tag limits (within a run; see executor.py, which
recomputes them when a run starts, with the preflight check) and as Dagster concurrency pools (across
runs: backfills, and several runs at once). `quiver limits` shows them.
"""

import logging
import os
from typing import Any

from quiver.memory import Limits, compute_limits, memory_settings

_log = logging.getLogger("quiver.limits")
MANAGE_POOLS_ENV = "QUIVER_MANAGE_POOLS"


def current_limits(measure: bool = True) -> Limits:
    """Limits from the machine's available memory, the measured model footprint and the environment."""
    from platform_defs.resources import build_resources

    need, source = build_resources(resolve_env=True)["model_pool"].footprint(measure=measure)
    return compute_limits(memory_settings(need, source))


def apply_pools(instance: Any, limits: Limits) -> dict[str, tuple[int | None, int]]:
    """Sets the instance's `quiver-*` pool limits to the computed ones; returns {pool: (was, now)} changed."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return {}
    current = {pool.name: pool.limit for pool in storage.get_pool_limits()}
    changed = {}
    for pool, limit in limits.pool_limits().items():
        if current.get(pool) != limit:
            storage.set_concurrency_slots(pool, limit)
            changed[pool] = (current.get(pool), limit)
    return changed


def manage_pools() -> bool:
    return os.environ.get(MANAGE_POOLS_ENV, "1") != "0"


def limits_at_load() -> Limits | None:
    """Computes and logs the limits, and applies the pools to the instance of $DAGSTER_HOME if there is one.
    Never fails the loading of the definitions: limits are recomputed, and enforced, when a run starts."""
    try:
        limits = current_limits()
    except Exception:  # noqa: BLE001 - a run still computes them and fails clearly if it cannot
        _log.warning("could not compute the memory limits", exc_info=True)
        return None
    _log.info(limits.describe())
    if manage_pools() and os.environ.get("DAGSTER_HOME"):
        try:
            from dagster import DagsterInstance

            with DagsterInstance.get() as instance:
                for pool, (was, now) in apply_pools(instance, limits).items():
                    _log.info("concurrency pool %s: %s -> %s", pool, was, now)
        except Exception:  # noqa: BLE001 - the instance may not exist yet; runs apply the pools too
            _log.debug("could not apply concurrency pools", exc_info=True)
    return limits
