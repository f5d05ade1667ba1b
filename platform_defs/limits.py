"""This machine's concurrency limits per memory class, and the instance's concurrency pools that carry them.

The limits are computed when a run starts (the executor's preflight) and by `quiver limits`; pools are
set only by an explicit action (`quiver limits --apply`) and by a run as it starts, never as a side effect
of loading the definitions.
"""

import os
from typing import Any

from platform_defs.footprint import footprint
from platform_defs.resources import build_resources
from quiver.memory import Limits, compute_limits, memory_settings

MANAGE_POOLS_ENV = "QUIVER_MANAGE_POOLS"


def current_limits(measure: bool = True, log: Any = None) -> Limits:
    """Limits from the machine's available memory, the model's measured footprint and the environment."""
    pool = build_resources(resolve_env=True)["model_pool"]
    need, source = footprint(pool, measure=measure, log=log) if log else footprint(pool, measure=measure)
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
