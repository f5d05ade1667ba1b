"""Shared fixtures: a throwaway Dagster instance and storage root per test, real everything else."""

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Steps retry as in production, sooner: a quarter of a second before the first retry (2 s by default).
os.environ.setdefault("QUIVER_STEP_RETRY_DELAY_S", "0.25")

PROJECT = Path(__file__).resolve().parent.parent
DATASETS = PROJECT.parent / "shared" / "datasets"
QUIVER_ENV = ("QUIVER_STORAGE_ROOT", "QUIVER_MILVUS_URI", "QUIVER_MILVUS_TOKEN", "QUIVER_MILVUS_DB",
              "QUIVER_MILVUS_COLLECTION", "QUIVER_MODEL", "QUIVER_DEVICE", "QUIVER_MODEL_BACKEND",
              "QUIVER_MODEL_QUANTIZATION", "QUIVER_EXPORT_DIR", "QUIVER_MODEL_THREADS")


@pytest.fixture
def quiver_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh DAGSTER_HOME (SQLite instance, artifacts, Milvus Lite) for one test."""
    from resources.process import reset_process_state

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROJECT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    for name in QUIVER_ENV:
        monkeypatch.delenv(name, raising=False)
    reset_process_state()  # each test starts like a fresh process: nothing cached in memory
    yield home
    reset_process_state()


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
    """The real Milvus server (standalone binary) on a free port, with its data in tmp_path."""
    from tests.helpers import MilvusServer

    server = MilvusServer(tmp_path / "milvus-server")
    yield server.start()
    server.kill()


@pytest.fixture(scope="session")
def shared_milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One real Milvus server for the tests that only need one to talk to; each uses its own collection."""
    from tests.helpers import MilvusServer

    server = MilvusServer(tmp_path_factory.mktemp("shared-milvus"))
    yield server.start()
    server.kill()


@pytest.fixture(params=["lite", "server"])
def store_target(request: pytest.FixtureRequest, quiver_home: Path,
                 monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The resources of a test that runs on both Milvus Lite and the real Milvus server (its own collection)."""
    import uuid

    from platform_defs.resources import build_resources

    if request.param == "server":
        server = request.getfixturevalue("shared_milvus_server")
        monkeypatch.setenv("QUIVER_MILVUS_URI", server.uri)
        monkeypatch.setenv("QUIVER_MILVUS_COLLECTION", f"t_{uuid.uuid4().hex[:12]}")
    return build_resources(resolve_env=True)


def require_service(name: str, host: str, port: int) -> None:
    """A service the test needs: its absence fails the test under CI, and skips it elsewhere."""
    import socket

    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        message = f"{name} is not reachable at {host}:{port} ({exc}); scripts/services.sh starts it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test (trust auth on 127.0.0.1:5432), dropped afterwards."""
    import uuid

    import psycopg2

    require_service("PostgreSQL", "127.0.0.1", 5432)
    name = f"quiver_test_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {name}")
    try:
        # The driver is named: SQLAlchemy 2.1 reads a bare postgresql:// with psycopg 3, which dagster-postgres
        # does not support yet (dagster-io/dagster#33958).
        yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    finally:
        cursor = admin.cursor()
        cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        cursor.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.close()


@pytest.fixture
def production_home(tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A DAGSTER_HOME with the production instance (deploy/production/dagster.yaml) on a fresh database."""
    from resources.process import reset_process_state

    home = tmp_path / "production_home"
    home.mkdir()
    shutil.copy(PROJECT / "deploy" / "production" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("QUIVER_POSTGRES_URL", postgres_url)
    monkeypatch.setenv("QUIVER_MAX_CONCURRENT_RUNS", "4")
    for name in QUIVER_ENV:
        monkeypatch.delenv(name, raising=False)
    reset_process_state()
    yield home
    reset_process_state()


@pytest.fixture
def s3_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An S3-compatible object store in its own process (moto's server), with a bucket `quiver`; the
    environment points fsspec (and so universal-pathlib) at it. Yields the endpoint URL."""
    import json
    import subprocess
    import sys
    import time

    from tests.helpers import free_port

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    options = {"endpoint_url": endpoint, "key": "quiver", "secret": "quiver-secret"}
    monkeypatch.setenv("FSSPEC_S3", json.dumps(options))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "quiver")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "quiver-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    import fsspec.config

    fsspec.config.set_conf_env(fsspec.config.conf)  # this process imported fsspec before the variable was set
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                import s3fs

                s3fs.S3FileSystem.clear_instance_cache()
                s3fs.S3FileSystem(**options).mkdir("quiver")
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        yield endpoint
    finally:
        fsspec.config.conf.pop("s3", None)
        server.kill()
        server.wait()


RABBITMQ_URL = "pyamqp://guest:guest@127.0.0.1:5672//"


@pytest.fixture
def rabbitmq_url() -> str:
    require_service("RabbitMQ", "127.0.0.1", 5672)
    return RABBITMQ_URL
