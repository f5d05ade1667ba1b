"""Imported by the multiprocess executor's forkserver (preload_modules) before it forks any step.

Loading the configured model here, on CPU, makes every step process inherit the weights
copy-on-write instead of loading its own. Python ignores a failing preload import silently, so the
model pool itself logs, in each step, whether it inherited the model or had to load it.
"""

import gc
import logging
import os

from platform_defs.resources import build_resources

_log = logging.getLogger("quiver.preload")

try:
    _pool = build_resources(resolve_env=True)["model_pool"]
    PRELOADED = _pool.preload()
    _pool.tokenizer()  # the chunking steps' tokenizer, inherited too
    _log.info("preloaded model %s in forkserver pid %s", PRELOADED.path, os.getpid())
except Exception:  # noqa: BLE001 - steps then load the model themselves, and log that they did
    _log.exception("model preload failed in pid %s; step processes will load the model", os.getpid())
    PRELOADED = None


def _warm_instance_modules() -> None:
    """Open and close the instance once, so the storage modules every step imports (sqlite or postgres
    storage, alembic, sqlalchemy: about 400 modules) are shared by the steps instead of copied into each."""
    if not os.environ.get("DAGSTER_HOME"):
        return
    try:
        from dagster import DagsterInstance

        with DagsterInstance.get():
            pass
    except Exception:  # noqa: BLE001 - only an optimization
        _log.warning("could not pre-import the instance's storage modules", exc_info=True)


_warm_instance_modules()


def _import_milvus_client() -> None:
    """Import the Milvus client and the embedded Milvus Lite server once, so the steps that write or check Milvus
    share them instead of importing them again in each step or run (about 400 modules; importing starts no thread
    and opens nothing: the database is opened by the step that uses it)."""
    try:
        import milvus_lite.adapter.grpc.server  # noqa: F401 - what a step that opens a Milvus Lite database starts
        import milvus_lite.server_manager  # noqa: F401
        import pymilvus  # noqa: F401
    except ImportError:  # only an optimization: a step imports what it needs
        _log.warning("could not pre-import the Milvus client", exc_info=True)


_import_milvus_client()

# Move everything allocated so far out of the collector's reach: a collection in a forked step would
# otherwise write to every object's header and copy the forkserver's pages into each step.
gc.freeze()
