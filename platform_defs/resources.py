"""Resource wiring of the embedded default, with production overrides from environment variables.

Each resource reads its settings from the environment when it is built (QUIVER_STORAGE_ROOT,
QUIVER_MILVUS_URI / _DB / _COLLECTION, QUIVER_MODEL, QUIVER_DEVICE, QUIVER_INBOX; see the resources'
fields). Secrets, QUIVER_MILVUS_TOKEN and QUIVER_REDIS_URL (which may hold a password), are given to
Definitions as EnvVar, so the UI shows the variable's name and never its value.
"""

import os
from typing import Any

from dagster import EnvVar

from resources.embedding_cache import EmbeddingCache
from resources.fileref import FileRefIOManager, FileStore
from resources.model_pool import ModelPool
from resources.sources import Inbox, SourceRegistry
from resources.vector_stores import FaissStore, MilvusStore


def _secret(field: str, variable: str, resolve: bool) -> dict[str, Any]:
    if not os.environ.get(variable):
        return {}
    return {field: os.environ[variable] if resolve else EnvVar(variable)}


def build_resources(resolve_env: bool = False) -> dict[str, Any]:
    """Resources for Definitions (secrets as EnvVar) or, every value resolved, for the CLI."""
    store = FileStore()
    return {
        "store": store,
        "fileref_io_manager": FileRefIOManager(store=store),
        "sources": SourceRegistry(),
        "inbox": Inbox(),
        "model_pool": ModelPool(),
        "faiss_store": FaissStore(),
        "milvus": MilvusStore(**_secret("token", "QUIVER_MILVUS_TOKEN", resolve_env)),
        # Redis is the optional L2: on when QUIVER_REDIS_URL is set. L1 and L3 need no service.
        "embedding_cache": EmbeddingCache(**_secret("redis_url", "QUIVER_REDIS_URL", resolve_env)),
    }
