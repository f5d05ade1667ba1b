"""Stage 2: split documents into token-aware chunks with the embedding model's own tokenizer.

Only the documents that changed are chunked again: the chunks of a document whose title and text are those the
previous output was made from, with the same chunking (code version, settings, tokenizer), are that output's rows,
exactly; the output is the same file a full re-chunk writes.
"""

import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import pyarrow as pa
from dagster import AssetExecutionContext, Config, Output
from pydantic import Field

from assets.common import (
    Computed,
    PartitionResult,
    cached_partition,
    partitioned_output,
    partitions_in_run,
    refs_by_partition,
    source_stage,
    stage_cache_key,
)
from quiver.chunking import Chunk, ChunkSettings, chunk_documents
from quiver.errors import ConfigError
from quiver.hashing import document_hash
from quiver.names import CHUNKING_STRATEGIES
from quiver.report import count_text
from resources.fileref import FileRef, FileStore
from resources.model_pool import ModelPool
from resources.sources import SourceRegistry

DOCS_PER_BATCH = 512
REUSE_RECORD = "reuse"  # _cache/chunks/<source>/reuse.json: the last output, its documents and its chunking
# Previous chunks and documents files larger than this together are not read to take rows from (every document
# is chunked again then): what is held stays under REUSE_MEMORY_FACTOR times it (quiver.needs.light_need).
REUSE_MAX_FILE_BYTES = 2 * 2**20
REUSE_MEMORY_FACTOR = 32  # zstd Parquet of text (3-5x and more on repetitive text), as Arrow columns and Python strings

CHUNKS_SCHEMA = pa.schema([
    ("chunk_id", pa.string()),
    ("doc_id", pa.string()),
    ("position", pa.int32()),
    ("title", pa.string()),
    ("text", pa.string()),
    ("chunk_hash", pa.string()),
    ("n_tokens", pa.int32()),
    ("start_char", pa.int32()),
    ("end_char", pa.int32()),
])


class ChunksConfig(Config):
    strategy: Literal[("source", *CHUNKING_STRATEGIES)] = Field(  # type: ignore[valid-type]
        default="source", description="source: the strategy the source was registered with (tokens unless said); "
        "tokens: windows that fit the model; whole_document: title + text, truncated by the model (as MTEB).")
    chunk_tokens: int | None = Field(default=None, ge=1, description="Tokens per chunk, special tokens and title "
                                     "included; default: the model's window (256 for all-MiniLM-L6-v2). More than "
                                     "the window is refused: the model would cut the text silently.")
    overlap_tokens: int = Field(default=32, description="Tokens shared by consecutive chunks of a document.")
    include_title: bool = Field(default=True, description="Prefix each chunk with its document's title.")
    force: bool = False

    def settings(self, source_strategy: str, window: int) -> ChunkSettings:
        """The chunking of a source whose model reads `window` tokens (special tokens included)."""
        if self.chunk_tokens is not None and self.chunk_tokens > window:
            raise ConfigError(f"chunks: chunk_tokens={self.chunk_tokens} is more than the model reads ({window} "
                              "tokens, its max_seq_length): every chunk would be cut by the model without a word. "
                              f"Use chunk_tokens <= {window}, or leave it unset.")
        strategy = source_strategy if self.strategy == "source" else self.strategy
        return ChunkSettings(strategy=strategy, chunk_tokens=self.chunk_tokens or window,  # type: ignore[arg-type]
                             overlap_tokens=self.overlap_tokens, include_title=self.include_title)


def chunks_to_batch(chunks: list[Chunk]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([asdict(c) for c in chunks], schema=CHUNKS_SCHEMA)


@dataclass
class PreviousChunks:
    """A previous output's chunks by document, and the title and text each document had then."""

    table: pa.Table
    rows: dict[str, tuple[int, int]]  # doc_id -> (first row, chunks)
    digests: dict[str, str]  # doc_id -> document_hash(title, text)

    def rows_of(self, doc: tuple[str, str, str]) -> tuple[int, int] | None:
        """The rows of an unchanged document's chunks; None when it is new or changed."""
        doc_id, title, text = doc
        found = self.rows.get(doc_id)
        return found if found is not None and self.digests.get(doc_id) == document_hash(title, text) else None


def previous_chunks(store: FileStore, partition: str, chunking: str) -> PreviousChunks | None:
    """The partition's last chunks, when they were made with this chunking from documents still intact; None
    otherwise (or when a document id is not unique there, or they are too many to hold)."""
    found = store.remembered_refs(["chunks"], partition, REUSE_RECORD, max_bytes=REUSE_MAX_FILE_BYTES)
    if found is None or found[1].get("chunking") != chunking or set(found[0]) != {"chunks", "documents"}:
        return None
    refs = found[0]
    docs = store.read_table(refs["documents"], columns=["doc_id", "title", "text"])
    ids, titles, texts = (docs.column(c).to_pylist() for c in ("doc_id", "title", "text"))
    digests = {d: document_hash(title, text) for d, title, text in zip(ids, titles, texts, strict=True)}
    table = store.read_table(refs["chunks"]).replace_schema_metadata(None)
    if len(digests) != len(ids) or not table.schema.equals(CHUNKS_SCHEMA):
        return None
    rows: dict[str, tuple[int, int]] = {}
    chunk_docs = table.column("doc_id").to_pylist()
    start = 0
    for end in range(1, len(chunk_docs) + 1):
        if end == len(chunk_docs) or chunk_docs[end] != chunk_docs[start]:
            if chunk_docs[start] in rows:  # one document's chunks apart: not an output to take rows from
                return None
            rows[chunk_docs[start]] = (start, end - start)
            start = end
    return PreviousChunks(table, rows, digests)


def chunk_batch(tokenizer: Any, docs: list[tuple[str, str, str]], settings: ChunkSettings,
                previous: PreviousChunks | None) -> tuple[pa.Table, int]:
    """One batch of documents' chunks, in document order (the previous rows of each unchanged document, new
    chunks of the others, chunked together), and how many documents were chunked."""
    pieces: list[pa.Table] = []
    pending: list[tuple[str, str, str]] = []
    chunked = 0

    def flush() -> None:
        nonlocal chunked
        if pending:
            pieces.append(pa.Table.from_batches([chunks_to_batch(chunk_documents(tokenizer, pending, settings))]))
            chunked += len(pending)
            pending.clear()

    for doc in docs:
        found = previous.rows_of(doc) if previous is not None else None
        if found is None:
            pending.append(doc)
            continue
        flush()
        pieces.append(previous.table.slice(*found))  # type: ignore[union-attr]
    flush()
    table = pa.concat_tables(pieces).combine_chunks() if pieces else CHUNKS_SCHEMA.empty_table()
    return table, chunked


def chunk_partition(context: AssetExecutionContext, partition: str, documents: FileRef, config: ChunksConfig,
                    store: FileStore, model_pool: ModelPool, sources: SourceRegistry) -> PartitionResult:
    window = model_pool.window_tokens()
    settings = config.settings(sources.get(partition).chunking, window)
    chunk_config = {**asdict(settings), "tokenizer": model_pool.tokenizer_fingerprint()}

    def compute() -> Computed:
        tokenizer = model_pool.tokenizer()
        # What decides a document's chunks besides its title and text: the code, the settings, the tokenizer.
        chunking = stage_cache_key(context, partition, {}, chunk_config)
        previous = None if config.force else previous_chunks(store, partition, chunking)
        tokens = over_window = chunked = 0
        with store.parquet_writer(["chunks"], partition, CHUNKS_SCHEMA) as writer:
            for batch in store.iter_batches(documents, DOCS_PER_BATCH, columns=["doc_id", "title", "text"]):
                docs = list(zip(*(batch.column(c).to_pylist() for c in ("doc_id", "title", "text")), strict=True))
                produced, batch_chunked = chunk_batch(tokenizer, docs, settings, previous)
                chunked += batch_chunked
                lengths = produced.column("n_tokens").to_pylist()
                tokens += sum(lengths)
                over_window += sum(n > window for n in lengths)
                writer.write_batch(produced)
        assert writer.ref is not None
        store.remember_refs(["chunks"], partition, REUSE_RECORD, {"documents": documents, "chunks": writer.ref},
                            {"chunking": chunking})
        reused = documents.rows - chunked
        context.log.info(f"chunks[{partition}]: {documents.rows} documents -> {writer.ref.rows} chunks "
                         f"({chunked} chunked, {reused} unchanged)")
        summary = [f"{count_text(documents.rows)} documents, {count_text(tokens)} tokens; strategy "
                   f"{settings.strategy}, {settings.chunk_tokens} tokens a chunk, {settings.overlap_tokens} overlap",
                   f"{count_text(chunked)} documents chunked; the chunks of {count_text(reused)} unchanged ones "
                   "taken from the previous output"]
        if over_window:
            summary.append(f"{over_window} chunks longer than the model's {window} tokens: the model truncates them")
        return Computed(ref=writer.ref, summary=summary, metadata={
            "documents": documents.rows, "chunks": writer.ref.rows, "tokens": tokens, "strategy": settings.strategy,
            "chunk_tokens": settings.chunk_tokens, "overlap_tokens": settings.overlap_tokens,
            "documents_chunked": chunked, "documents_unchanged": reused,
            # whole_document: these documents are cut by the model at its window
            "chunks_longer_than_model_window": over_window, "model_window_tokens": window,
        })

    return cached_partition(context, store, partition, {"documents": documents.sha256}, chunk_config, config.force,
                            compute)


@source_stage(
    memory="light",
    kinds={"huggingface", "parquet"},
    description="Token-aware chunks with stable ids (document id + position) and per-chunk hashes.",
)
def chunks(
    context: AssetExecutionContext, config: ChunksConfig, documents: Any, store: FileStore, model_pool: ModelPool,
    sources: SourceRegistry,
) -> Output[Any]:
    started = time.perf_counter()
    partitions = partitions_in_run(context)  # once: each call looks the partitions up in the instance
    upstream = refs_by_partition(documents, partitions)
    results = {p: chunk_partition(context, p, upstream[p], config, store, model_pool, sources)
               for p in partitions}
    return partitioned_output(started, results, noun="chunks")
