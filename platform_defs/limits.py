"""This machine's concurrency limits per memory class, and the instance's concurrency pools that carry them.

Each class's need is computed from what its steps will hold (quiver/needs.py): the measured step process,
the embedding step's cache bound, queues and in-process Milvus Lite, and the index steps' vectors, counted
from the current embeddings. The limits are computed when a run starts (the executor's preflight) and by
`quiver limits`; pools are set only by an explicit action (`quiver limits --apply`) and by a run as it starts,
never as a side effect of loading the definitions.
"""

import json
import os
from pathlib import Path
from typing import Any

from assets.chunks import DOCS_PER_BATCH, REUSE_MAX_FILE_BYTES, REUSE_MEMORY_FACTOR
from assets.embeddings import EmbeddingsConfig
from platform_defs.footprint import footprint
from platform_defs.resources import build_resources
from quiver.memory import Limits, compute_limits, memory_settings
from quiver.needs import Need, index_need, light_need, model_need
from quiver.vector_index import choose_index_type

MANAGE_POOLS_ENV = "QUIVER_MANAGE_POOLS"
PIPELINE_STAGES = 4  # prepare, encode, write, insert: each with a bounded queue in front
FALLBACK_DIMENSION = 1024


def _dimension(resources: dict[str, Any]) -> int:
    """The model's vector width, known without loading it (its pooling config), else a generous guess."""
    config = Path(resources["model_pool"].model_path) / "1_Pooling" / "config.json"
    try:
        return int(json.loads(config.read_text())["word_embedding_dimension"])
    except (OSError, KeyError, ValueError):
        return FALLBACK_DIMENSION


def current_vectors(resources: dict[str, Any]) -> int:
    """How many vectors the indexes hold now: the rows of every source's latest embeddings."""
    store, total = resources["store"], 0
    for spec in resources["sources"].all():
        try:
            ref = store.read_latest(["embeddings"], spec.name)
        except Exception:  # noqa: BLE001 - a source without a trustworthy output adds nothing
            ref = None
        total += ref.rows if ref else 0
    return total


def class_needs(resources: dict[str, Any], measure: bool = True, log: Any = None) -> dict[str, Need]:
    pool, cache, milvus = resources["model_pool"], resources["embedding_cache"], resources["milvus"]
    measured = footprint(pool, measure=measure, **({"log": log} if log else {}))
    dimension, vectors = _dimension(resources), current_vectors(resources)
    pipeline = EmbeddingsConfig()
    index_type = choose_index_type(resources["faiss_store"].settings(), vectors)
    needs = {
        "model": model_need(measured.model_peak, cache.l1_max_bytes if cache.l1_enabled else 0, PIPELINE_STAGES,
                            pipeline.queue_maxsize, pipeline.texts_per_batch, dimension,
                            vectors if milvus.is_lite else None),
        "io": index_need(measured.base, vectors, dimension, index_type, resources["faiss_store"].hnsw_m),
        "light": light_need(measured.base, DOCS_PER_BATCH, reused_bytes=REUSE_MAX_FILE_BYTES * REUSE_MEMORY_FACTOR),
    }
    return {c: Need(n.bytes, f"{n.formula} ({measured.source})") for c, n in needs.items()}


def current_limits(measure: bool = True, log: Any = None) -> Limits:
    """Limits from the machine's available memory, what each class of step holds, and the environment."""
    needs = class_needs(build_resources(resolve_env=True), measure=measure, log=log)
    return compute_limits(memory_settings({c: (n.bytes, n.formula) for c, n in needs.items()}))


def apply_pools(instance: Any, limits: Limits, only_unset: bool = False) -> dict[str, tuple[int | None, int]]:
    """Sets the instance's `quiver-*` pool limits to the computed ones (with `only_unset`, only those not set
    yet); returns {pool: (was, now)} changed."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return {}
    current = {pool.name: pool.limit for pool in storage.get_pool_limits()}
    changed = {}
    for pool, limit in limits.pool_limits().items():
        if only_unset and current.get(pool) is not None:
            continue
        if current.get(pool) != limit:
            storage.set_concurrency_slots(pool, limit)
            changed[pool] = (current.get(pool), limit)
    return changed


def manage_pools() -> bool:
    return os.environ.get(MANAGE_POOLS_ENV, "1") != "0"
