"""The Definitions Dagster loads (workspace.yaml, `dagster dev`, `dagster asset materialize -m platform_defs`).

Pure declarations: nothing here measures, connects or writes when imported (the forkserver imports it too).
"""

from dagster import Definitions

from assets.chunks import chunks
from assets.common import with_code_versions
from assets.documents import documents
from assets.embed_shards import shard_rows_from_env, sharded_embeddings
from assets.embeddings import embeddings
from assets.eval_checks import (
    faiss_and_milvus_agree,
    ndcg_at_10_above_floor,
    ndcg_at_10_no_regression,
    results_are_corpus_documents,
)
from assets.faiss_index import faiss_index, faiss_index_matches_chunks
from assets.milvus_collection import milvus_collection, milvus_collection_matches_chunks
from assets.retrieval_eval import retrieval_eval
from platform_defs.executor import job_executor
from platform_defs.jobs import eval_job, index_job, ingest_job, refresh_job
from platform_defs.resources import build_resources
from platform_defs.schedules import evaluation_schedule, index_maintenance_schedule
from platform_defs.sensors import inbox_sensor, index_automation_sensor

# Code versions come from the asset graph: each asset's hashes the project code it runs and its upstream's.
# With QUIVER_EMBED_SHARD_ROWS set, each source's chunks are embedded by parallel shard steps (assets/embed_shards.py).
ALL_ASSETS = with_code_versions([documents, chunks, sharded_embeddings if shard_rows_from_env() else embeddings,
                                 faiss_index, milvus_collection, retrieval_eval])
ALL_CHECKS = [faiss_index_matches_chunks, milvus_collection_matches_chunks, ndcg_at_10_no_regression,
              ndcg_at_10_above_floor, faiss_and_milvus_agree, results_are_corpus_documents]

defs = Definitions(
    assets=ALL_ASSETS,
    asset_checks=ALL_CHECKS,
    jobs=[ingest_job, index_job, refresh_job, eval_job],
    sensors=[inbox_sensor, index_automation_sensor],
    schedules=[index_maintenance_schedule, evaluation_schedule],
    resources=build_resources(),
    executor=job_executor(preload_model=True),
)


def get_ingest_job():  # noqa: ANN201 - module-level factories for dagster.reconstructable
    return defs.resolve_job_def("ingest_job")


def get_index_job():  # noqa: ANN201
    return defs.resolve_job_def("index_job")


def get_refresh_job():  # noqa: ANN201
    return defs.resolve_job_def("refresh_job")


def get_eval_job():  # noqa: ANN201
    return defs.resolve_job_def("eval_job")
