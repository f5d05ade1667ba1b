"""Stage 1: read a source (one partition) into normalized documents with content hashes."""

import time
from collections.abc import Iterator
from typing import Any, Literal

import pyarrow as pa
from dagster import AssetExecutionContext, Config, Failure, MetadataValue, Output
from pydantic import Field

from assets.common import (
    Computed,
    PartitionResult,
    cached_partition,
    partitioned_output,
    partitions_in_run,
    source_stage,
)
from quiver.errors import InputError
from quiver.sources import Document, ReadReport, read_documents, source_fingerprint
from resources.fileref import FileStore
from resources.sources import SourceRegistry

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
    allow_empty: bool = Field(default=False, description="Accept a source that reads no document although its "
                              "last output had some (off: that looks like a vanished mount, and would drop every "
                              "vector of the source).")


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


def read_partition(context: AssetExecutionContext, partition: str, config: DocumentsConfig, store: FileStore,
                   sources: SourceRegistry) -> PartitionResult:
    spec = sources.get(partition)
    fingerprint = source_fingerprint(spec.kind, spec.path)

    def compute() -> Computed:
        report = ReadReport()
        previous = store.read_latest(["documents"], partition)
        try:
            with store.parquet_writer(["documents"], partition, DOCUMENTS_SCHEMA) as writer:
                for batch in document_batches(read_documents(spec.kind, spec.path, config.on_bad_record, report)):
                    writer.write_batch(batch)
                if writer.rows == 0 and previous is not None and previous.rows > 0 and not config.allow_empty:
                    raise InputError(spec.path, f"no document read, where the last output had {previous.rows}: "
                                                "is a mount missing? (set allow_empty to accept an empty source)")
        except InputError as exc:
            # Nothing was written: the partition's last good output stays the one downstream reads.
            raise Failure(description=f"bad input in source {partition!r}: {exc}", allow_retries=False,
                          metadata={"location": exc.location, "problem": exc.problem}) from exc
        assert writer.ref is not None
        context.log.info(f"documents[{partition}]: {writer.ref.rows} documents from {spec.kind} source {spec.path}")
        summary = [f"Read from the {spec.kind} source at `{spec.path}`"]
        if report.empty_dropped:
            summary.append(f"{report.empty_dropped} empty documents dropped")
        if report.bad_records:
            summary.append(f"{len(report.bad_records)} bad records skipped: see `bad_record_examples`")
        return Computed(ref=writer.ref, summary=summary, metadata={
            "source": spec.path, "source_kind": spec.kind, "documents": writer.ref.rows,
            "empty_dropped": report.empty_dropped, "bad_records": len(report.bad_records),
            **({"bad_record_examples": MetadataValue.json(report.bad_records[:20])} if report.bad_records else {}),
        })

    return cached_partition(context, store, partition, {"source": fingerprint},
                            {"kind": spec.kind, "path": spec.identity, "on_bad_record": config.on_bad_record},
                            config.force, compute, hit_metadata={"source": spec.path})


@source_stage(
    memory="io",
    kinds={"python", "parquet"},
    description="Normalized documents of one source, each with a sha256 of its title and text.",
)
def documents(
    context: AssetExecutionContext, config: DocumentsConfig, store: FileStore, sources: SourceRegistry,
) -> Output[Any]:
    started = time.perf_counter()
    results = {p: read_partition(context, p, config, store, sources) for p in partitions_in_run(context)}
    return partitioned_output(started, results, noun="documents")
