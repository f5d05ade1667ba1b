"""Stage 4a: one FAISS index over every source's embeddings, each build written as an atomic new version.

A flat or IVF index is brought up to date in place: vectors whose chunk changed or disappeared are
removed and new ones added, reading only the changed rows. An HNSW graph cannot drop nodes, so it is
rebuilt; so is any index once the changes since its last rebuild pass `rebuild_after_fraction` (an IVF's
clusters were trained on the vectors of that rebuild).
"""

import itertools
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from dagster import (
    AssetExecutionContext,
    Config,
    DataVersion,
    MaterializeResult,
    MetadataValue,
)
from pydantic import Field

from assets.common import (
    run_metadata,
    stage_cache_key,
)
from assets.indexes_common import (
    HeldVectors,
    IndexDiff,
    content_hash,
    diff_index,
    embedding_dimension,
    embedding_fingerprints,
    index_stage,
    iter_rows,
    partitions_hashes,
    reconciliation_check,
    skipped_metadata,
)
from assets.reporting import SUMMARY, run_link
from quiver.report import rounded, run_text, seconds_text, summary_markdown, when_text
from quiver.vector_index import (
    IndexSettings,
    choose_index_type,
    details_text,
    empty_index,
    index_details,
    supports_removal,
    vectors_by_id,
)
from quiver.vectors import vectors_of, with_vectors
from resources.faiss_store import FaissDraft, FaissStore
from resources.fileref import FileRef, FileStore
from resources.fileref_io import PartitionRefs


class FaissIndexConfig(Config):
    force: bool = Field(default=False, description="Write a new version even if this input was indexed before.")
    rebuild: bool = Field(default=False, description="Build from scratch instead of updating the current version.")
    rebuild_after_fraction: float = Field(
        default=0.3, gt=0, description="Rebuild once vectors changed since the last rebuild pass this fraction.")


def _add_rows(index: faiss.Index, draft: FaissDraft, batches: Any) -> int:
    added = 0
    for batch in batches:
        index.add_with_ids(vectors_of(batch), batch.column("vector_id").to_numpy().astype(np.int64))
        draft.add_payload(batch)
        added += batch.num_rows
    return added


def carried_rows(faiss_store: FaissStore, current: str | None, ids: set[int]) -> Iterator[pa.RecordBatch]:
    """The current version's rows (payload and vector) of the given ids: the vectors of skipped sources, which a
    rebuild keeps as they are."""
    if not current or not ids:
        return
    index = faiss_store.read_index(current)
    wanted = pa.array(sorted(ids), pa.int64())
    for batch in faiss_store.iter_payload(current):
        batch = batch.filter(pc.is_in(batch.column("vector_id"), value_set=wanted))
        if batch.num_rows:
            yield with_vectors(batch, vectors_by_id(index, batch.column("vector_id").to_numpy()))


def rebuild_version(draft: FaissDraft, store: FileStore, embeddings: Mapping[str, FileRef], diff: IndexDiff,
                    settings: IndexSettings, dimension: int, carried: Iterable[pa.RecordBatch]) -> dict[str, Any]:
    n = len(diff.desired) + len(diff.protected)
    kind = choose_index_type(settings, n)
    index = empty_index(kind, dimension, settings, n)
    batches: Iterable[pa.RecordBatch] = itertools.chain(iter_rows(store, embeddings), carried)
    if kind == "ivf" and n:
        # IVF clusters are trained on the vectors first; the other types take them batch by batch.
        batches = list(batches)
        index.train(np.vstack([vectors_of(b) for b in batches]))
    added = _add_rows(index, draft, batches)
    draft.index = index
    return {"index_type": kind, "mode": "rebuild", "added": added, "removed": 0, "dropped": len(diff.stale),
            "changes_since_rebuild": 0}


def update_version(draft: FaissDraft, faiss_store: FaissStore, current: str, store: FileStore,
                   embeddings: Mapping[str, FileRef], diff: IndexDiff, manifest: dict[str, Any]) -> dict[str, Any]:
    index = faiss_store.read_index(current)
    gone = np.asarray(sorted(diff.stale | diff.changed), dtype=np.int64)
    if len(gone):
        removed = index.remove_ids(gone)
        if removed != len(gone):
            raise RuntimeError(f"FAISS version {current} lacked {len(gone) - removed} vectors its payload lists")
    gone_set = pa.array(gone, pa.int64())
    for batch in faiss_store.iter_payload(current):
        kept = batch.filter(pc.invert(pc.is_in(batch.column("vector_id"), value_set=gone_set)))
        if kept.num_rows:
            draft.add_payload(kept)
    added = _add_rows(index, draft, iter_rows(store, embeddings, diff.to_write))
    draft.index = index
    return {"index_type": manifest["index_type"], "mode": "incremental", "added": added, "removed": len(gone),
            "changes_since_rebuild": manifest.get("changes_since_rebuild", 0) + added + len(diff.stale)}


def model_fingerprints(store: FileStore, embeddings: PartitionRefs, current_manifest: dict[str, Any] | None,
                       carried: Mapping[int, str]) -> list[str]:
    """The models whose vectors the version holds: the partitions' (an update keeps only vectors whose key, which
    includes the model's fingerprint, is a partition's), and the current version's for the vectors it carries
    ("": a model that was not recorded)."""
    found = embedding_fingerprints(store, embeddings)
    if carried:
        found |= set((current_manifest or {}).get("model_fingerprints", [""]))
    return sorted(found)


def can_update(manifest: dict[str, Any], settings: IndexSettings, dimension: int, diff: IndexDiff,
               config: FaissIndexConfig) -> bool:
    """Updating in place gives the same index a rebuild would, up to the clusters an IVF was trained on."""
    kind = choose_index_type(settings, len(diff.desired))
    changes = manifest.get("changes_since_rebuild", 0) + diff.writes + len(diff.stale)
    return (not config.rebuild and manifest.get("index_type") == kind and supports_removal(kind)
            and manifest.get("settings") == settings.__dict__ and manifest.get("dimension") == dimension
            and changes <= config.rebuild_after_fraction * max(len(diff.desired), 1))


@index_stage(kinds={"faiss", "numpy"}, storage="faiss",
             description="FAISS index (exact inner product by default; IVF/HNSW by config or size) plus its id map.")
def faiss_index(
    context: AssetExecutionContext, config: FaissIndexConfig, embeddings: PartitionRefs, store: FileStore,
    faiss_store: FaissStore,
) -> MaterializeResult:
    started = time.perf_counter()
    settings = faiss_store.settings()
    current = faiss_store.current_version()
    current_manifest = faiss_store.manifest(current) if current and faiss_store.has_version(current) else None
    # Sources skipped for want of a good output keep the vectors the current version holds for them: those are
    # part of the content, so they are in the key and the data version.
    carried = (faiss_store.keys_of_sources(current, set(embeddings.skipped))
               if current_manifest and embeddings.skipped else {})
    key = stage_cache_key(context, None, partitions_hashes(embeddings),
                          {**settings.__dict__, "carried": content_hash(carried) if carried else None})
    cached = None if (config.force or config.rebuild) else faiss_store.version_for(key)
    if cached is not None:
        faiss_store.make_current(cached, built_on=current)
        manifest = faiss_store.manifest(cached)
        context.log.info(f"faiss_index: cache hit {key}, {manifest['ntotal']} vectors, version {cached}")
        made = {"run_id": manifest.get("run_id"), "made_at": manifest.get("created")}
        return MaterializeResult(
            data_version=DataVersion(manifest["content_hash"]),
            metadata={
                SUMMARY: MetadataValue.md(summary_markdown(
                    f"Cache hit: FAISS version {cached} is current again, nothing rebuilt",
                    [f"Built by {run_text(made['run_id'])}, {when_text(made['made_at'])}: "
                     + build_line(manifest), f"Same inputs and index settings: cache key `{key}`"])),
                "cache_hit": True, "cache_key": key, **run_link(made["run_id"]),
                **({"reused_made_at": MetadataValue.timestamp(made["made_at"])} if made["made_at"] else {}),
                **index_figures(manifest), "version": cached,
                **skipped_metadata(embeddings, len(carried)),
                "path": MetadataValue.path(str(faiss_store.version_dir(cached)))},
        )
    held = faiss_store.payload_keys(current) if current_manifest else {}
    diff = diff_index(store, embeddings, held, set(carried))
    dimension = embedding_dimension(store, embeddings) or (current_manifest or {}).get("dimension", 0)
    if carried and (current_manifest or {}).get("dimension") != dimension:
        context.log.warning(f"faiss_index: the vectors of skipped sources are {current_manifest['dimension']}-d, "  # type: ignore[index]
                            f"the embeddings {dimension}-d: they cannot be kept in this index and are dropped")
        carried, diff.protected = {}, set()
    with faiss_store.writing_version(key) as draft:
        build_started = time.perf_counter()
        if current_manifest and can_update(current_manifest, settings, dimension, diff, config):
            facts = update_version(draft, faiss_store, current, store, embeddings, diff, current_manifest)
        else:
            facts = rebuild_version(draft, store, embeddings, diff, settings, dimension,
                                    carried_rows(faiss_store, current, set(carried)))
        draft.manifest = {**facts, "content_hash": content_hash({**diff.desired, **carried}),
                          "model_fingerprints": model_fingerprints(store, embeddings, current_manifest, carried),
                          "partitions": sorted(embeddings), "run_id": context.run.run_id,
                          "details": index_details(draft.index) if draft.index is not None else {},
                          "settings": settings.__dict__, "build_seconds": time.perf_counter() - build_started}
    manifest = draft.manifest
    faiss_store.make_current(draft.version, built_on=current)
    context.log.info(f"faiss_index: {manifest['ntotal']} vectors, {manifest['index_type']} index, {facts['mode']} "
                     f"(+{facts['added']} -{facts['removed']}), version {draft.version}")
    changes = (f"rebuilt from scratch: {facts['added']:,} vectors added" + (
        f", {facts['dropped']:,} left out" if facts["dropped"] else "") if facts["mode"] == "rebuild" else
        f"updated in place: +{facts['added']:,} −{facts['removed']:,}, {diff.unchanged:,} unchanged")
    return MaterializeResult(
        data_version=DataVersion(manifest["content_hash"]),
        metadata={
            SUMMARY: MetadataValue.md(summary_markdown(
                f"Built FAISS version {draft.version} in {seconds_text(time.perf_counter() - started)}",
                [build_line(manifest), changes.capitalize()] + (
                    [f"{len(embeddings.skipped)} sources without a good output skipped: see `skipped_sources`"]
                    if embeddings.skipped else []))),
            **run_metadata(started, int(manifest["ntotal"]), {
                "cache_hit": False, "cache_key": key, **index_figures(manifest), "version": draft.version,
                "mode": facts["mode"], "vectors_added": facts["added"], "vectors_removed": facts["removed"],
                "unchanged": diff.unchanged,
                # a rebuild writes a new version from scratch: what it no longer holds is left out, not removed
                **({"vectors_left_out": facts["dropped"]} if facts["mode"] == "rebuild" else {}),
                "partitions": MetadataValue.json(sorted(embeddings)),
                **skipped_metadata(embeddings, len(diff.protected)),
                "path": MetadataValue.path(str(faiss_store.version_dir(draft.version))),
            }),
        },
    )


def index_figures(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a version is, on a build and on a cache hit alike: vectors held (plotted over time), dimension,
    type and parameters, and how long its build took."""
    return {"vectors": int(manifest["ntotal"]), "dimension": int(manifest["dimension"]),
            "index_type": manifest["index_type"], "index_details": details_text(manifest.get("details") or {
                "type": manifest["index_type"], **_settings_details(manifest)}),
            "build_seconds": MetadataValue.float(rounded(float(manifest.get("build_seconds", 0.0))))}


def _settings_details(manifest: dict[str, Any]) -> dict[str, Any]:
    """The parameters of a version built before manifests kept them, from its settings (IVF's list count is not
    among them)."""
    settings = manifest.get("settings") or {}
    if manifest["index_type"] == "hnsw":
        return {"M": settings.get("hnsw_m"), "efConstruction": settings.get("hnsw_ef_construction"),
                "efSearch": settings.get("hnsw_ef_search")}
    if manifest["index_type"] == "ivf":
        return {"nlist": settings.get("ivf_nlist") or "?", "nprobe": settings.get("ivf_nprobe")}
    return {}


def build_line(manifest: dict[str, Any]) -> str:
    figures = index_figures(manifest)
    return (f"{figures['vectors']:,} vectors, {figures['dimension']}-d, {figures['index_details']}; built in "
            f"{seconds_text(float(manifest.get('build_seconds', 0.0)))} ({manifest.get('mode', 'rebuild')})")


def _faiss_held(faiss_store: FaissStore, skipped: set[str]) -> HeldVectors:
    current = faiss_store.current_version()
    if current is None:
        return HeldVectors((), set(), metadata={"version": ""})
    return HeldVectors(faiss_store.held_vectors(current), set(faiss_store.keys_of_sources(current, skipped)),
                       metadata={"version": current})


faiss_index_matches_chunks = reconciliation_check(faiss_index, "matches_chunks", "FAISS", "faiss_store",
                                                  _faiss_held, holder="The current FAISS version")
