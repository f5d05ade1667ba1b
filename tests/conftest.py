"""Shared fixtures: a throwaway Dagster instance and storage root per test, real everything else."""

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROJECT = Path(__file__).resolve().parent.parent
DATASETS = PROJECT.parent / "shared" / "datasets"
QUIVER_ENV = ("QUIVER_STORAGE_ROOT", "QUIVER_MILVUS_URI", "QUIVER_MILVUS_TOKEN", "QUIVER_MILVUS_DB",
              "QUIVER_MILVUS_COLLECTION", "QUIVER_MODEL", "QUIVER_DEVICE")


@pytest.fixture
def quiver_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh DAGSTER_HOME (SQLite instance, artifacts, Milvus Lite) for one test."""
    from resources import embedding_cache
    from resources.vector_stores import close_milvus_clients

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROJECT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    for name in QUIVER_ENV:
        monkeypatch.delenv(name, raising=False)
    close_milvus_clients()
    embedding_cache.clear_l1()  # each test starts like a fresh process: nothing cached in memory
    embedding_cache._SEGMENTS.clear()
    yield home
    close_milvus_clients()


@pytest.fixture
def resources(quiver_home: Path) -> dict[str, Any]:
    from platform_defs.resources import build_resources

    return build_resources(resolve_env=True)


@pytest.fixture
def instance(quiver_home: Path) -> Iterator[Any]:
    from dagster import DagsterInstance

    with DagsterInstance.get() as inst:
        yield inst


@pytest.fixture
def milvus_server(tmp_path: Path) -> Iterator[Any]:
    """A Milvus server process on a free port, with its data in tmp_path."""
    from tests.helpers import MilvusServer

    server = MilvusServer(tmp_path / "milvus-server")
    yield server.start()
    server.kill()
