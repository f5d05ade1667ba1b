"""What the index stages share: every source partition's embeddings, and the difference between what an
index holds and what it should hold (one vector per current chunk, under the chunk's vector id)."""

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetIn,
    AssetsDefinition,
    AutomationCondition,
    MetadataValue,
    asset,
    asset_check,
)

from assets.common import OWNERS, STORAGE_KIND, fail_fast_unless_transient, memory_class
from quiver.errors import QuiverError
from quiver.hashing import KeyDigest, vector_id, vector_key
from quiver.vectors import KEY_COLUMNS, key_pairs, model_fingerprint_of
from resources.fileref import FileRef, FileStore
from resources.fileref_io import SKIP_MISSING_PARTITIONS, PartitionRefs


def partitions_hashes(embeddings: Mapping[str, FileRef]) -> dict[str, str]:
    return {partition: ref.sha256 for partition, ref in sorted(embeddings.items())}


def skipped_metadata(refs: PartitionRefs, left_as_they_are: int) -> dict[str, Any]:
    """What an index did without: the sources that have no good output yet, why, and their vectors kept."""
    if not refs.skipped:
        return {}
    return {"skipped_sources": MetadataValue.json(refs.skipped), "vectors_left_as_they_are": left_as_they_are}


def compared_sources(chunks: PartitionRefs, embeddings: PartitionRefs) -> tuple[dict[str, FileRef], dict[str, str]]:
    """What a reconciliation check compares: the chunks of every source the index could take (a good output in
    both chunks and embeddings), and the sources it skipped, with why."""
    skipped = {**embeddings.skipped, **chunks.skipped}
    return {p: ref for p, ref in chunks.items() if p not in skipped}, skipped


def partition_digest(store: FileStore, ref: FileRef) -> str:
    """KeyDigest of a partition's (vector id, vector key) pairs, read once per output and remembered."""
    cached = store.cache_get(["_digests"], None, ref.sha256)
    if cached and "digest" in cached:
        return str(cached["digest"])
    digest = KeyDigest()
    for batch in store.iter_batches(ref, 65536, columns=KEY_COLUMNS):
        digest.update(key_pairs(batch))
    store.cache_put(["_digests"], None, ref.sha256, {"digest": digest.hexdigest()})
    return digest.hexdigest()


def content_hash(keys_by_id: Mapping[int, str]) -> str:
    """Order-independent identity of an index's content: which vector under which id."""
    digest = hashlib.sha256()
    for vid in sorted(keys_by_id):
        digest.update(f"{vid}:{keys_by_id[vid]}\n".encode())
    return digest.hexdigest()


@dataclass
class IndexDiff:
    """What a store must do to hold exactly the current vectors."""

    desired: dict[int, str]  # vector id -> vector key of every current chunk
    held: int  # vectors the store holds now
    to_write: dict[str, set[int]] = field(default_factory=dict)  # by partition: new, or held under another key
    changed: set[int] = field(default_factory=set)  # held under another key (replace)
    stale: set[int] = field(default_factory=set)  # held, but no current chunk has the id (delete)
    protected: set[int] = field(default_factory=set)  # held for a skipped source: kept as they are

    @property
    def writes(self) -> int:
        return sum(len(ids) for ids in self.to_write.values())

    @property
    def unchanged(self) -> int:
        return len(self.desired) - self.writes

    def content_hash(self) -> str:
        return content_hash(self.desired)


def diff_index(store: FileStore, embeddings: Mapping[str, FileRef], held: Mapping[int, str],
               protected: AbstractSet[int] = frozenset()) -> IndexDiff:
    """Compares a store's {id: key} with every partition's embeddings, reading only the id and key columns.

    `protected` ids belong to sources skipped for want of a good output: they are left as they are, never
    counted stale."""
    diff = IndexDiff(desired={}, held=len(held))
    owner: dict[int, str] = {}
    for partition, ref in sorted(embeddings.items()):
        writes: set[int] = set()
        for batch in store.iter_batches(ref, 65536, columns=KEY_COLUMNS):
            for vid, key in key_pairs(batch):
                if vid in diff.desired:
                    raise QuiverError(f"vector id {vid} occurs twice (partitions {owner[vid]!r} and {partition!r}): "
                                      "two chunks with one id cannot both be indexed")
                diff.desired[vid] = key
                owner[vid] = partition
                held_key = held.get(vid)
                if held_key != key:
                    writes.add(vid)
                    if held_key is not None:
                        diff.changed.add(vid)
        if writes:
            diff.to_write[partition] = writes
    diff.stale = {vid for vid in held if vid not in diff.desired and vid not in protected}
    diff.protected = set(protected)
    return diff


def iter_rows(store: FileStore, embeddings: Mapping[str, FileRef], only: Mapping[str, set[int]] | None = None,
              batch_size: int = 4096) -> Iterator[pa.RecordBatch]:
    """Embedding rows of every partition, or only the rows with the given ids (read from their partitions)."""
    partitions = sorted(embeddings) if only is None else sorted(only)
    for partition in partitions:
        wanted = None if only is None else pa.array(sorted(only[partition]), pa.int64())
        for batch in store.iter_batches(embeddings[partition], batch_size):
            if wanted is not None:
                batch = batch.filter(pc.is_in(batch.column("vector_id"), value_set=wanted))
            if batch.num_rows:
                yield batch


def embedding_dimension(store: FileStore, embeddings: Mapping[str, FileRef]) -> int:
    """Vector width from the Parquet schema, without reading data; 0 when there are no partitions."""
    for _, ref in sorted(embeddings.items()):
        return store.parquet_schema(ref).field("vector").type.list_size
    return 0


def embedding_fingerprints(store: FileStore, embeddings: Mapping[str, FileRef]) -> set[str]:
    """Fingerprints of the models that made the partitions' vectors, from their schemas ("": one that does not
    say, written before they were recorded)."""
    return {model_fingerprint_of(store.parquet_schema(ref)) for _, ref in sorted(embeddings.items())}


def expected_vectors(store: FileStore, chunks: Mapping[str, FileRef], model_fingerprint: str) -> dict[int, str]:
    """{vector id: vector key} that the stores must hold: one per current chunk of every current source."""
    expected: dict[int, str] = {}
    for partition, ref in sorted(chunks.items()):
        for batch in store.iter_batches(ref, 65536, columns=["chunk_id", "chunk_hash"]):
            for chunk, chunk_hash in zip(batch.column("chunk_id").to_pylist(), batch.column("chunk_hash").to_pylist(),
                                         strict=True):
                expected[vector_id(partition, chunk)] = vector_key(model_fingerprint, chunk_hash)
    return expected


@dataclass
class Reconciliation:
    """A store compared with the current chunks: exact when nothing is missing, stale, wrong or doubled."""

    store: str
    expected: int
    held: int  # vectors in the store, duplicates included
    missing: list[int] = field(default_factory=list)  # a current chunk without a vector
    stale: list[int] = field(default_factory=list)  # a vector whose chunk no longer exists
    wrong: list[int] = field(default_factory=list)  # a vector made from other text (or another model)
    duplicates: int = 0  # vectors held more than once under one id
    left_as_they_are: int = 0  # vectors of sources skipped for want of a good output
    skipped: dict[str, str] = field(default_factory=dict)  # those sources, and why

    @property
    def exact(self) -> bool:
        return not (self.missing or self.stale or self.wrong or self.duplicates)

    def describe(self) -> str:
        if self.exact:
            text = f"{self.store}: exactly one vector for each of the {self.expected} current chunks"
        else:
            text = (f"{self.store}: {len(self.missing)} missing, {len(self.stale)} stale, {len(self.wrong)} out of "
                    f"date, {self.duplicates} duplicated (holds {self.held}, expected {self.expected})")
        if self.skipped:
            text += (f"; sources without a good output, not compared ({self.left_as_they_are} of their vectors left "
                     f"as they are): {', '.join(sorted(self.skipped))}")
        return text

    def metadata(self) -> dict[str, Any]:
        return {"expected": self.expected, "held": self.held, "missing": len(self.missing),
                "left_as_they_are": self.left_as_they_are, "skipped_sources": dict(self.skipped),
                "stale": len(self.stale), "out_of_date": len(self.wrong), "duplicates": self.duplicates,
                "examples": {"missing": sorted(self.missing)[:10], "stale": sorted(self.stale)[:10],
                             "out_of_date": sorted(self.wrong)[:10]}}


def reconcile(store_name: str, expected: Mapping[int, str], held: Iterable[tuple[int, str | None]],
              protected: AbstractSet[int] = frozenset()) -> Reconciliation:
    """Compares (id, key) pairs a store holds with what it must hold; `protected` ids (of sources skipped for
    want of a good output, left as they are) are counted apart."""
    seen: dict[int, str | None] = {}
    result = Reconciliation(store_name, len(expected), 0)
    for vid, key in held:
        if vid in protected and vid not in expected:
            result.left_as_they_are += 1
            continue
        result.held += 1
        if vid in seen:
            result.duplicates += 1
            continue
        seen[vid] = key
        if vid not in expected:
            result.stale.append(vid)
        elif expected[vid] != key:
            result.wrong.append(vid)
    result.missing = [vid for vid in expected if vid not in seen]
    return result


def index_stage(*, kinds: set[str], storage: str,
                description: str) -> Callable[[Callable[..., Any]], AssetsDefinition]:
    """@asset for an index over every source: it reads each source's embeddings that have a good output (the
    others are skipped and named), and the automation daemon runs it, once no source is still being ingested,
    after sources were (re)ingested by the inbox sensor or anyone."""

    def decorate(fn: Callable[..., Any]) -> AssetsDefinition:
        return asset(ins={"embeddings": AssetIn(metadata={SKIP_MISSING_PARTITIONS: True})},
                     automation_condition=AutomationCondition.eager(), group_name="index", kinds=kinds,
                     owners=OWNERS, tags={STORAGE_KIND: storage},
                     description=description, **memory_class("io"))(fail_fast_unless_transient(fn))

    return decorate


@dataclass
class HeldVectors:
    """What a store holds, as its reconciliation check reads it."""

    pairs: Iterable[tuple[int, str | None]]  # (vector id, vector key) of every vector held
    protected: set[int]  # held for sources skipped for want of a good output
    count: int | None = None  # what the store says it holds, when a listing can collapse doubled rows
    metadata: dict[str, Any] = field(default_factory=dict)


def reconciliation_check(asset_def: AssetsDefinition, name: str, store_name: str, resource_key: str,
                         held: Callable[[Any, set[str]], HeldVectors], holder: str) -> AssetChecksDefinition:
    """The blocking check that a store holds exactly one vector per current chunk of every source the index
    could take: none missing, none stale or out of date, none twice. `held(store resource, skipped sources)`
    reads the store."""

    @asset_check(asset=asset_def, name=name, blocking=True,
                 required_resource_keys={"store", "model_pool", resource_key},
                 additional_ins={"chunks": AssetIn("chunks", metadata={SKIP_MISSING_PARTITIONS: True}),
                                 "embeddings": AssetIn("embeddings", metadata={SKIP_MISSING_PARTITIONS: True})},
                 description=f"{holder} holds exactly one vector per current chunk: none missing, none stale "
                             "or out of date, none twice.", **memory_class("io"))
    @fail_fast_unless_transient
    def check(context: AssetCheckExecutionContext, chunks: PartitionRefs,
              embeddings: PartitionRefs) -> AssetCheckResult:
        resources = context.resources
        compared, skipped = compared_sources(chunks, embeddings)
        expected = expected_vectors(resources.store, compared, resources.model_pool.fingerprint())
        found_held = held(getattr(resources, resource_key), set(skipped))
        found = reconcile(store_name, expected, found_held.pairs, found_held.protected)
        found.skipped = skipped
        if found_held.count is not None:  # rows a listing collapsed (one id stored twice) still count
            found.duplicates += max(0, found_held.count - found.left_as_they_are - found.held)
        return AssetCheckResult(passed=found.exact, description=found.describe(),
                                metadata={**found.metadata(), **found_held.metadata})

    return check
