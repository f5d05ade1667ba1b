"""What a process holds between materializations, and how to start afresh (tests, benchmarks, notebooks)."""

from resources import embedding_cache
from resources.milvus_clients import close_milvus_clients


def reset_process_state() -> None:
    """Forget what this process keeps across runs, as a new process would start: the in-process embedding cache,
    the disk cache's index of segments, and every Milvus connection (a Milvus Lite database is released).
    Loaded models are kept: loading one is what a process pays once."""
    embedding_cache.clear_l1()
    embedding_cache.forget_segments()
    close_milvus_clients()
