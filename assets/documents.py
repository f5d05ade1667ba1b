"""Stage 1: read a source (one partition) into normalized documents with content hashes."""

import time
from collections.abc import Iterator
from typing import Literal

import pyarrow as pa
from dagster import AssetExecutionContext, Config, DataVersion, Failure, MetadataValue, Output, asset
from pydantic import Field

from assets.common import (
    MEMORY_TAG,
    partition_of,
    run_metadata,
    sources_partitions,
    stage_cache_key,
    stage_code_version,
)
from quiver.errors import InputError
from quiver.sources import Document, ReadReport, read_documents, source_fingerprint
from resources.fileref import FileRef, FileStore
from resources.sources import SourceRegistry

CODE_VERSION = stage_code_version(__name__)
ROWS_PER_BATCH = 2048

DOCUMENTS_SCHEMA = pa.schema([
    ("doc_id", pa.string()),
    ("title", pa.string()),
    ("text", pa.string()),
    ("origin", pa.string()),
    ("content_hash", pa.string()),
])


class DocumentsConfig(Config):
    on_bad_record: Literal["fail", "skip"] = Field(
        default="fail", description="fail: stop at the first bad record; skip: drop it and list it in metadata.")
    force: bool = Field(default=False, description="Recompute even when the cached output is still valid.")


def document_batches(docs: Iterator[Document]) -> Iterator[pa.RecordBatch]:
    buffer: list[Document] = []
    for doc in docs:
        buffer.append(doc)
        if len(buffer) >= ROWS_PER_BATCH:
            yield _to_batch(buffer)
            buffer = []
    if buffer:
        yield _to_batch(buffer)


def _to_batch(docs: list[Document]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict({
        "doc_id": [d.doc_id for d in docs],
        "title": [d.title for d in docs],
        "text": [d.text for d in docs],
        "origin": [d.origin for d in docs],
        "content_hash": [d.content_hash for d in docs],
    }, schema=DOCUMENTS_SCHEMA)


@asset(
    partitions_def=sources_partitions,
    code_version=CODE_VERSION,
    io_manager_key="fileref_io_manager",
    group_name="ingest",
    kinds={"parquet"},
    op_tags={MEMORY_TAG: "io"},
    description="Normalized documents of one source, each with a sha256 of its title and text.",
)
def documents(
    context: AssetExecutionContext, config: DocumentsConfig, store: FileStore, sources: SourceRegistry,
) -> Output[FileRef]:
    started = time.perf_counter()
    partition = partition_of(context)
    spec = sources.get(partition or "stdlib")
    fingerprint = source_fingerprint(spec.kind, spec.path)
    key = stage_cache_key(context, CODE_VERSION, {"source": fingerprint},
                          {"kind": spec.kind, "path": spec.path, "on_bad_record": config.on_bad_record})
    asset_path = context.asset_key.path
    cached = None if config.force else store.cached_fileref(asset_path, partition, key)
    if cached is not None:
        context.log.info(f"documents[{partition}]: cache hit {key}, reusing {cached.path}")
        return Output(cached, data_version=DataVersion(cached.sha256),
                      metadata={"cache_hit": True, "cache_key": key, "source": spec.path})

    report = ReadReport()
    try:
        with store.parquet_writer(asset_path, partition, DOCUMENTS_SCHEMA) as writer:
            for batch in document_batches(read_documents(spec.kind, spec.path, config.on_bad_record, report)):
                writer.write_batch(batch)
                context.log.debug(f"documents[{partition}]: {writer.rows} documents so far")
    except InputError as exc:
        # Nothing was written: the partition's last good output stays the one downstream reads.
        raise Failure(description=f"bad input in source {partition!r}: {exc}",
                      metadata={"location": exc.location, "problem": exc.problem}) from exc
    ref = writer.ref
    assert ref is not None
    store.cache_put(asset_path, partition, key, {"fileref": ref.as_dict()})
    context.log.info(f"documents[{partition}]: {ref.rows} documents from {spec.kind} source {spec.path}")
    return Output(ref, data_version=DataVersion(ref.sha256), metadata=run_metadata(started, ref.rows, {
        "cache_hit": False,
        "cache_key": key,
        "source": spec.path,
        "source_kind": spec.kind,
        "documents": ref.rows,
        "empty_dropped": report.empty_dropped,
        "bad_records": len(report.bad_records),
        "bad_record_examples": MetadataValue.json(report.bad_records[:20]),
    }))
