"""Jobs: ingest one source partition (documents -> embeddings), update the indexes, or both in one run."""

from dagster import AssetSelection, define_asset_job

from platform_defs.executor import job_executor

INGEST_ASSETS = ("documents", "chunks", "embeddings")
INDEX_ASSETS = ("faiss_index", "milvus_collection")
EVAL_ASSETS = ("retrieval_eval",)

ingest_job = define_asset_job(
    "ingest_job",
    selection=AssetSelection.assets(*INGEST_ASSETS),
    description="Read, chunk and embed one source (a partition).",
)

index_job = define_asset_job(
    "index_job",
    selection=AssetSelection.assets(*INDEX_ASSETS),
    description="Bring the FAISS index and the Milvus collection up to date with every source.",
    # No step of this job encodes texts: its forkserver skips the model preload.
    executor_def=job_executor(preload_model=False),
)

refresh_job = define_asset_job(
    "refresh_job",
    selection=AssetSelection.assets(*INGEST_ASSETS, *INDEX_ASSETS),
    description="Read, chunk and embed one source (a partition), then bring the FAISS index and the Milvus "
                "collection up to date, with their checks: one run, so a small change is searchable in seconds.",
)

eval_job = define_asset_job(
    "eval_job",
    selection=AssetSelection.assets(*EVAL_ASSETS),
    description="Retrieval quality of both indexes on a BEIR source (a partition), with its checks.",
    # Queries are few: the model loads in the step, no forkserver preload is needed.
    executor_def=job_executor(preload_model=False),
)
