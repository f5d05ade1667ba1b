"""What a materialization tells a person: a short summary first, round figures, the detail in one JSON entry, and
a cache hit that says it is one, names the run it reuses and carries that run's figures forward."""

from pathlib import Path
from typing import Any

from dagster import AssetKey

from platform_defs.definitions import defs
from tests.helpers import add_source, index, ingest, metadata

# What the UI plots: numbers. Process ids and paths are noise there, so none may be a top-level number.
NOISE = ("pid", "path", "fingerprint", "host")


def tiny_docs(directory: Path, n: int = 3) -> Path:
    directory.mkdir()
    for i in range(n):
        (directory / f"note{i}.md").write_text(f"# Note {i}\n\nHow to parse json, part {i}.\n", encoding="utf-8")
    return directory


def numbers(meta: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in meta.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def test_fresh_embeddings_lead_with_a_summary_and_keep_the_detail_in_one_entry(
    tmp_path: Path, instance: Any, resources: dict[str, Any]
) -> None:
    add_source(instance, resources, "notes", tiny_docs(tmp_path / "notes"))
    result = ingest(instance, resources, "notes")
    meta = metadata(result, "embeddings")
    event = next(e for e in result.get_asset_materialization_events()
                 if e.materialization.asset_key == AssetKey("embeddings"))
    assert list(event.materialization.metadata)[0] == "summary"  # what the UI lists first
    summary = meta["summary"].splitlines()
    assert summary[0].startswith("**Computed 3 chunks of notes in ") and summary[0].endswith(" s**")
    assert summary[1].startswith("- Encoded 3 texts at ") and " texts/s, " in summary[1] and "tokens/s" in summary[1]
    assert summary[2] == "- Embedding cache: 0% hit (0 of 3 texts; L1 0, L3 0)"
    assert summary[3] == "- Milvus: 3 vectors upserted, 0 deleted, 0 unchanged"
    assert summary[4].startswith("- Model bundled:all-MiniLM-L6-v2 (torch, cpu): loaded in ")
    assert len(meta["summary"]) < 1000  # the UI shows shorter Markdown inline
    assert meta["cache_hit"] is False and meta["texts_encoded"] == 3 and meta["embedding_cache_hit_rate"] == 0.0
    assert (meta["milvus_upserted"], meta["milvus_deleted"], meta["milvus_unchanged"]) == (3, 0, 0)
    # the twelve level counters are one JSON entry, by level, with a disabled level said to be off
    cache = meta["details"]["embedding_cache"]
    assert cache["l1"] == {"where": "in-process memory", "hits": 0, "misses": 3, "fills": 3, "discarded": 0}
    assert cache["l2"] == "off (Redis)" and cache["l3"]["misses"] == 3
    assert not any(k.startswith("cache_l") for k in meta)
    assert {"model", "encoding", "pipeline"} <= set(meta["details"])
    assert not [k for k in numbers(meta) if any(word in k for word in NOISE)]
    # figures are rounded: three significant digits at most
    for key, value in numbers(meta).items():
        if isinstance(value, float) and value:
            assert len(f"{value:g}".replace(".", "").replace("-", "").lstrip("0")) <= 4, (key, value)
    assert len(meta) <= 30  # was about 55 entries


def test_a_cache_hit_says_so_names_the_run_it_reuses_and_gives_no_throughput(
    tmp_path: Path, instance: Any, resources: dict[str, Any]
) -> None:
    add_source(instance, resources, "notes", tiny_docs(tmp_path / "notes"))
    first_ingest = ingest(instance, resources, "notes")
    first_index = index(instance, resources)
    fresh, fresh_faiss = metadata(first_ingest, "embeddings"), metadata(first_index, "faiss_index")
    second_ingest = ingest(instance, resources, "notes")
    second_index = index(instance, resources)

    for asset, noun in (("documents", "documents"), ("chunks", "chunks"), ("embeddings", "chunks")):
        hit = metadata(second_ingest, asset)
        assert hit["cache_hit"] is True
        assert hit["reused_run_id"] == first_ingest.run_id
        lines = hit["summary"].splitlines()
        assert lines[0].startswith("**Cache hit for notes: nothing recomputed (") and lines[0].endswith(")**")
        assert lines[1].startswith(f"- Output of run `{first_ingest.run_id[:8]}` reused, made ")
        assert f": 3 {noun} in " in lines[1]
        assert "rows_per_second" not in hit and "duration_seconds" not in hit  # no throughput of nothing
        assert "texts_per_second" not in hit and "details" not in hit
    hit = metadata(second_ingest, "embeddings")
    assert hit["texts_encoded"] == 0  # this step embedded nothing ...
    # ... and carries forward what the run it reuses did
    assert hit["reused"]["run_id"] == first_ingest.run_id
    assert hit["reused"]["figures"]["texts_encoded"] == 3
    assert hit["reused"]["figures"]["texts_per_second"] == fresh["texts_per_second"]
    assert "- That run: Milvus: 3 vectors upserted, 0 deleted, 0 unchanged" in hit["summary"].splitlines()
    assert hit["reused_made_at"] > 0

    faiss_hit = metadata(second_index, "faiss_index")
    assert faiss_hit["cache_hit"] is True and faiss_hit["reused_run_id"] == first_index.run_id
    for key in ("vectors", "dimension", "index_type", "index_details", "build_seconds", "version"):
        assert faiss_hit[key] == fresh_faiss[key], key
    assert (faiss_hit["dimension"], faiss_hit["index_details"]) == (384, "flat (exact inner product)")
    assert "rows_per_second" not in faiss_hit
    assert faiss_hit["summary"].splitlines()[1].startswith(f"- Built by run `{first_index.run_id[:8]}`, ")

    # Milvus was written by the embeddings step: both index runs found it in sync, the second names the first.
    first_milvus, second_milvus = metadata(first_index, "milvus_collection"), metadata(second_index,
                                                                                      "milvus_collection")
    assert first_milvus["cache_hit"] is True and "reused_run_id" not in first_milvus
    assert second_milvus["reused_run_id"] == first_index.run_id
    assert f"- Unchanged since run `{first_index.run_id[:8]}`" in second_milvus["summary"].splitlines()


def test_every_asset_has_an_owner_kinds_and_a_storage_kind() -> None:
    graph = defs.resolve_asset_graph()
    kinds = {}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.owners == ["team:quiver"], key
        kinds[key.to_user_string()] = (set(node.kinds), node.tags["dagster/storage_kind"])
    assert kinds == {
        "documents": ({"python", "parquet"}, "parquet"), "chunks": ({"huggingface", "parquet"}, "parquet"),
        "embeddings": ({"pytorch", "huggingface", "parquet"}, "parquet"), "faiss_index": ({"faiss", "numpy"}, "faiss"),
        "milvus_collection": ({"milvus"}, "milvus"), "retrieval_eval": ({"python", "parquet"}, "parquet"),
    }
    steps = {node.name for job in ("ingest_job", "index_job", "eval_job")
             for node in defs.resolve_job_def(job).graph.node_defs}
    assert {"faiss_index_matches_chunks", "milvus_collection_matches_chunks"} <= steps
    assert not [s for s in steps if "milvus_collection_milvus" in s or "faiss_index_faiss" in s]


def test_sensors_and_schedules_say_they_need_the_daemon() -> None:
    """Off by default and silent unless dagster-daemon runs: each description says both."""
    automations = [*(defs.resolve_sensor_def(n) for n in ("inbox_sensor", "index_automation_sensor")),
                   *(defs.resolve_schedule_def(n) for n in ("index_maintenance_schedule", "evaluation_schedule"))]
    for automation in automations:
        assert "Off until turned on" in automation.description, automation.name
        assert "acts only while `dagster-daemon run` is running" in automation.description, automation.name
