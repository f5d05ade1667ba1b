"""The FileRef IO manager: stages hand each other verified references to Parquet files, never the data.

It records the FileRef an asset returns as its partition's latest output, and hands downstream the latest
FileRef of each upstream partition, checked (inside the storage root, unchanged). For an unpartitioned asset
downstream of a partitioned one the input is {partition: FileRef}; an input marked SKIP_MISSING_PARTITIONS
does without the partitions that have no good output yet and names them.
"""

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from dagster import ConfigurableIOManager, Failure, InputContext, MetadataValue, OutputContext

from quiver.errors import FileRefError, QuiverError
from quiver.retry import ServiceUnavailableError
from resources.fileref import FileRef, FileStore

# Input metadata (AssetIn(metadata=...)) of an input that reads every partition of an upstream asset and
# does without the partitions that have no good output yet: they are listed in PartitionRefs.skipped.
SKIP_MISSING_PARTITIONS = "quiver/skip_partitions_without_output"


class PartitionRefs(dict[str, FileRef]):
    """{partition: FileRef} of an upstream asset, and the partitions skipped because they have no good
    output yet, with the reason for each."""

    def __init__(self, refs: Mapping[str, FileRef] | None = None) -> None:
        super().__init__(refs or {})
        self.skipped: dict[str, str] = {}


@contextmanager
def _permanent_errors_fail_at_once() -> Iterator[None]:
    """A reference that cannot be trusted fails the step at once: no retry policy makes a tampered or missing
    file right. (An object store that is down raises its own errors, which are retried.)"""
    try:
        yield
    except (ServiceUnavailableError, Failure):
        raise
    except (QuiverError, TypeError, ValueError, KeyError) as exc:
        raise Failure(description=str(exc), allow_retries=False) from exc


class FileRefIOManager(ConfigurableIOManager):
    """Stores the FileRef an asset returns and hands downstream verified FileRefs.

    For an unpartitioned asset downstream of a partitioned one, the input is {partition: FileRef}.
    """

    store: FileStore

    def handle_output(self, context: OutputContext, obj: FileRef | dict[str, FileRef]) -> None:
        with _permanent_errors_fail_at_once():
            self._handle_output(context, obj)

    def load_input(self, context: InputContext) -> "FileRef | PartitionRefs":
        with _permanent_errors_fail_at_once():
            return self._load_input(context)

    def _handle_output(self, context: OutputContext, obj: FileRef | dict[str, FileRef]) -> None:
        """Record where each partition's output is; a multi-partition run hands {partition: FileRef}."""
        started = time.perf_counter()
        if isinstance(obj, FileRef):
            partition = context.asset_partition_key if context.has_asset_partitions else None
            refs = {partition: obj}
        elif isinstance(obj, dict) and context.has_asset_partitions:
            refs = dict(obj)
            missing = set(context.asset_partition_keys) - set(refs)
            if missing:
                raise FileRefError(f"{context.asset_key.to_user_string()} returned no FileRef for {sorted(missing)}")
        else:
            raise TypeError(f"{context.asset_key.to_user_string()} must return a FileRef, got {type(obj).__name__}")
        for partition, ref in refs.items():
            if not isinstance(ref, FileRef):
                raise TypeError(f"{context.asset_key.to_user_string()}[{partition}] is not a FileRef")
            self.store.check(ref, verify_hash=False)
            self.store.write_latest(context.asset_key.path, partition, ref)
        if len(refs) == 1:
            [ref] = refs.values()
            context.add_output_metadata({**ref.metadata(), "io_seconds": round(time.perf_counter() - started, 4)})
        else:
            context.add_output_metadata({
                "rows": MetadataValue.int(sum(r.rows for r in refs.values())),
                "bytes": MetadataValue.int(sum(r.bytes for r in refs.values())),
                "paths": MetadataValue.json({p: r.path for p, r in refs.items()}),
                "io_seconds": round(time.perf_counter() - started, 4),
            })

    def _load_input(self, context: InputContext) -> "FileRef | PartitionRefs":
        asset = context.asset_key.path
        if not context.has_asset_partitions:
            return self._load(asset, None)
        keys = list(context.asset_partition_keys)
        every_partition = context.definition_metadata.get(SKIP_MISSING_PARTITIONS)  # an index over all sources
        if context.has_partition_key and len(keys) == 1 and not every_partition:
            return self._load(asset, keys[0])  # a partition reads the same partition upstream
        if not every_partition:
            return PartitionRefs({key: self._load(asset, key) for key in keys})  # a single-run backfill
        # An index reads every partition that has a good output; one without (a new source whose first run
        # failed, a file removed or changed behind Quiver's back) is skipped and named, never fatal for all.
        refs = PartitionRefs()
        for key in keys:
            try:
                refs[key] = self._load(asset, key)
            except FileRefError as exc:
                refs.skipped[key] = str(exc)
        if refs.skipped:
            context.log.warning(f"{'/'.join(asset)}: {len(refs.skipped)} partition(s) without a good output are "
                                f"skipped, their vectors left as they are: {refs.skipped}")
        return refs

    def _load(self, asset: list[str], partition: str | None) -> FileRef:
        where = "/".join(asset) + (f" partition {partition!r}" if partition else "")
        try:
            ref = self.store.read_latest(asset, partition)
        except (QuiverError, ValueError, KeyError, TypeError) as exc:  # a bad key, a damaged pointer
            raise FileRefError(f"{where}: no trustworthy output ({exc})") from exc
        if ref is None:
            raise FileRefError(f"{where} has not been materialized yet (no FileRef under {self.store.root})")
        return self.store.check(ref)
