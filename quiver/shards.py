"""Which shard a source's chunk belongs to: stable under small edits, so an unchanged shard stays a cache hit.

A chunk goes to the shard its document's id hashes to (the top bits of sha256(doc id)), never by its row
position: adding, editing or deleting a document changes only the shard that document hashes to. The
number of shards is a power of two, the smallest whose shards hold at most `shard_rows` rows on average, and a
source keeps the count it had until it grows past twice that or shrinks below a quarter (and then every shard
changes once).
"""

import hashlib
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa


def shard_count(rows: int, shard_rows: int, previous: int = 0) -> int:
    """Shards for a source of `rows` chunks: 1 when sharding is off (shard_rows 0) or the source is small. A
    source keeps its `previous` count (a power of two) while its shards hold from a quarter to twice
    shard_rows on average, so that edits around a boundary do not reshuffle every shard."""
    if shard_rows <= 0:
        return 1
    if previous >= 1 and previous & (previous - 1) == 0 and (
            previous * shard_rows // 4 < rows <= previous * shard_rows * 2 or (previous == 1 and rows <= shard_rows)):
        return previous
    count = 1
    while rows > count * shard_rows:
        count *= 2
    return count


def shard_of(doc_id: str, shards: int) -> int:
    """The shard of a document's chunks, among `shards` (a power of two)."""
    if shards <= 1:
        return 0
    bits = shards.bit_length() - 1
    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") >> (64 - bits)


def split_batches(batches: Iterable[pa.RecordBatch], shards: int) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(shard, rows of that shard) of each batch of chunks, in chunk order within each shard."""
    for batch in batches:
        if shards <= 1:
            yield 0, batch
            continue
        owner = np.fromiter((shard_of(d, shards) for d in batch.column("doc_id").to_pylist()), dtype=np.int64,
                            count=batch.num_rows)
        for shard in np.unique(owner).tolist():
            yield shard, batch.filter(pa.array(owner == shard))
