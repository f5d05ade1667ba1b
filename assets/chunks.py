"""Stage 2: split documents into token-aware chunks with the embedding model's own tokenizer."""

import time
from dataclasses import asdict
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
)
from quiver.chunking import Chunk, ChunkSettings, chunk_documents
from quiver.errors import ConfigError
from quiver.names import CHUNKING_STRATEGIES
from quiver.report import count_text
from resources.fileref import FileRef, FileStore
from resources.model_pool import ModelPool
from resources.sources import SourceRegistry

DOCS_PER_BATCH = 512

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


def chunk_partition(context: AssetExecutionContext, partition: str, documents: FileRef, config: ChunksConfig,
                    store: FileStore, model_pool: ModelPool, sources: SourceRegistry) -> PartitionResult:
    window = model_pool.window_tokens()
    settings = config.settings(sources.get(partition).chunking, window)

    def compute() -> Computed:
        tokenizer = model_pool.tokenizer()
        tokens = over_window = 0
        with store.parquet_writer(["chunks"], partition, CHUNKS_SCHEMA) as writer:
            for batch in store.iter_batches(documents, DOCS_PER_BATCH, columns=["doc_id", "title", "text"]):
                docs = list(zip(*(batch.column(c).to_pylist() for c in ("doc_id", "title", "text")), strict=True))
                produced = chunk_documents(tokenizer, docs, settings)
                tokens += sum(c.n_tokens for c in produced)
                over_window += sum(c.n_tokens > window for c in produced)
                writer.write_batch(chunks_to_batch(produced))
        assert writer.ref is not None
        context.log.info(f"chunks[{partition}]: {documents.rows} documents -> {writer.ref.rows} chunks")
        summary = [f"{count_text(documents.rows)} documents, {count_text(tokens)} tokens; strategy "
                   f"{settings.strategy}, {settings.chunk_tokens} tokens a chunk, {settings.overlap_tokens} overlap"]
        if over_window:
            summary.append(f"{over_window} chunks longer than the model's {window} tokens: the model truncates them")
        return Computed(ref=writer.ref, summary=summary, metadata={
            "documents": documents.rows, "chunks": writer.ref.rows, "tokens": tokens, "strategy": settings.strategy,
            "chunk_tokens": settings.chunk_tokens, "overlap_tokens": settings.overlap_tokens,
            # whole_document: these documents are cut by the model at its window
            "chunks_longer_than_model_window": over_window, "model_window_tokens": window,
        })

    return cached_partition(context, store, partition, {"documents": documents.sha256},
                            {**asdict(settings), "tokenizer": model_pool.tokenizer_fingerprint()}, config.force,
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
    upstream = refs_by_partition(documents, partitions_in_run(context))
    results = {p: chunk_partition(context, p, upstream[p], config, store, model_pool, sources)
               for p in partitions_in_run(context)}
    return partitioned_output(started, results, noun="chunks")
