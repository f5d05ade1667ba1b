"""Resource wiring of the embedded default, with production overrides from environment variables.

Each resource reads its settings from the environment when it is built (QUIVER_STORAGE_ROOT,
QUIVER_MILVUS_URI / _DB / _COLLECTION, QUIVER_MODEL, QUIVER_DEVICE, QUIVER_INBOX; see the resources'
fields). Secrets, QUIVER_MILVUS_TOKEN and QUIVER_REDIS_URL (which may hold a password), are given to
Definitions as EnvVar, so the UI shows the variable's name and never its value.
"""

from typing import Any

from resources.embedding_cache import EmbeddingCache
from resources.env import secret
from resources.faiss_store import FaissStore
from resources.fileref import FileStore
from resources.fileref_io import FileRefIOManager
from resources.milvus_store import MilvusStore
from resources.model_pool import ModelPool
from resources.sources import Inbox, SourceRegistry


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
        "milvus": MilvusStore(**secret("token", "QUIVER_MILVUS_TOKEN", resolve_env)),
        # Redis is the optional L2: on when QUIVER_REDIS_URL is set. L1 and L3 need no service.
        "embedding_cache": EmbeddingCache(**secret("redis_url", "QUIVER_REDIS_URL", resolve_env)),
    }
