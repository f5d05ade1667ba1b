"""Resource wiring of the embedded default, with production overrides from environment variables.

QUIVER_STORAGE_ROOT moves every file (local path or object-store URI); QUIVER_MILVUS_URI / _TOKEN /
_DB / _COLLECTION point at a Milvus server; QUIVER_MODEL and QUIVER_DEVICE choose the model;
QUIVER_REDIS_URL turns on the Redis level of the embedding cache.
"""

import os
from typing import Any

from dagster import EnvVar

from resources.embedding_cache import EmbeddingCache
from resources.fileref import FileRefIOManager, FileStore
from resources.model_pool import ModelPool
from resources.sources import SourceRegistry
from resources.vector_stores import FaissStore, MilvusStore

_MILVUS_ENV = (("uri", "QUIVER_MILVUS_URI"), ("token", "QUIVER_MILVUS_TOKEN"),
               ("db_name", "QUIVER_MILVUS_DB"), ("collection", "QUIVER_MILVUS_COLLECTION"))
_MODEL_ENV = (("model", "QUIVER_MODEL"), ("device", "QUIVER_DEVICE"))
_REDIS_ENV = (("redis_url", "QUIVER_REDIS_URL"),)


def _from_env(pairs: tuple[tuple[str, str], ...], resolve: bool) -> dict[str, Any]:
    """EnvVar for each variable that is set (its value when resolve); unset ones keep the defaults."""
    return {field: os.environ[var] if resolve else EnvVar(var) for field, var in pairs if os.environ.get(var)}


def build_resources(resolve_env: bool = False) -> dict[str, Any]:
    """Resources for Definitions (EnvVar, resolved by Dagster) or, resolved now, for the CLI."""
    store = FileStore()
    return {
        "store": store,
        "fileref_io_manager": FileRefIOManager(store=store),
        "sources": SourceRegistry(),
        "model_pool": ModelPool(**_from_env(_MODEL_ENV, resolve_env)),
        "faiss_store": FaissStore(),
        "milvus": MilvusStore(**_from_env(_MILVUS_ENV, resolve_env)),
        # Redis is the optional L2: on when QUIVER_REDIS_URL is set. L1 and L3 need no service.
        "embedding_cache": EmbeddingCache(l2_enabled=bool(os.environ.get("QUIVER_REDIS_URL")),
                                          **_from_env(_REDIS_ENV, resolve_env)),
    }
