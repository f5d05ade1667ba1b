"""Stage 4a: one FAISS index over every source's embeddings, written as an atomic new version."""

import time

from dagster import (
    AssetExecutionContext,
    AssetIn,
    Config,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    asset,
)

from assets.common import MEMORY_TAG, run_metadata, stage_cache_key, stage_code_version
from assets.indexes_common import content_hash, load_all, partitions_hashes
from resources.fileref import FileRef, FileStore
from resources.vector_stores import FaissStore

CODE_VERSION = stage_code_version(__name__)


class FaissIndexConfig(Config):
    force: bool = False


@asset(
    ins={"embeddings": AssetIn()},
    code_version=CODE_VERSION,
    group_name="index",
    kinds={"faiss"},
    op_tags={MEMORY_TAG: "io"},
    description="FAISS index (exact inner product by default; IVF/HNSW by config or size) plus its id map.",
)
def faiss_index(
    context: AssetExecutionContext, config: FaissIndexConfig, embeddings: dict[str, FileRef], store: FileStore,
    faiss_store: FaissStore,
) -> MaterializeResult:
    started = time.perf_counter()
    settings = faiss_store.settings()
    key = stage_cache_key("faiss_index", None, CODE_VERSION, partitions_hashes(embeddings), settings.__dict__)
    if faiss_store.has_version(key) and not config.force:
        faiss_store.make_current(key)
        version = faiss_store.open_version(key)
        context.log.info(f"faiss_index: cache hit {key}, {version.manifest['ntotal']} vectors")
        return MaterializeResult(
            data_version=DataVersion(version.manifest["content_hash"]),
            metadata={"cache_hit": True, "cache_key": key, "vectors": version.manifest["ntotal"],
                      "index_type": version.manifest["index_type"], "path": MetadataValue.path(str(version.directory))},
        )
    vectors, payload = load_all(store, embeddings)
    ids = payload.column("vector_id").to_numpy()
    digest = content_hash(ids, payload.column("vector_key").to_pylist())
    manifest = faiss_store.write_version(key, vectors, payload, {
        "content_hash": digest, "partitions": sorted(embeddings)})
    faiss_store.make_current(key)
    context.log.info(f"faiss_index: {manifest['ntotal']} vectors, {manifest['index_type']} index, version {key}")
    return MaterializeResult(
        data_version=DataVersion(digest),
        metadata=run_metadata(started, int(manifest["ntotal"]), {
            "cache_hit": False, "cache_key": key, "vectors": manifest["ntotal"],
            "index_type": manifest["index_type"], "dimension": manifest["dimension"],
            "partitions": MetadataValue.json(sorted(embeddings)),
            "build_seconds": MetadataValue.float(round(manifest["build_seconds"], 3)),
            "path": MetadataValue.path(str(faiss_store.version_dir(key))),
        }),
    )
