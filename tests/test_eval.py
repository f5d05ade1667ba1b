"""Retrieval evaluation: metrics against hand computation, the asset and its checks on real stores, the CLI."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dagster import materialize

from platform_defs.definitions import ALL_ASSETS, ALL_CHECKS
from quiver.beir import read_qrels, read_relevance_data
from quiver.errors import InputError
from quiver.retrieval import mean_metrics, query_metrics, rank_documents, search_documents, top_k_agreement
from tests.conftest import PROJECT
from tests.helpers import add_source, check_results, index, ingest, metadata, write_jsonl

TINY = PROJECT / "tests" / "fixtures" / "tiny_beir"
EVAL_CHECKS = ("ndcg_at_10_above_floor", "faiss_and_milvus_agree", "results_are_corpus_documents")


def _dcg(ranks: list[int]) -> float:
    return sum(1 / math.log2(r + 1) for r in ranks if r <= 10)


def test_metrics_equal_hand_computation_on_a_fixed_run() -> None:
    qrels = {"a": {"d1": 1}, "b": {"d2": 1, "d3": 1}, "c": {"d4": 1, "missing": 1}, "d": {"d5": 1}}
    run = {"a": [("x", 0.9), ("d1", 0.8)],  # relevant at rank 2
           "b": [("d2", 0.9), ("y", 0.8), ("z", 0.7), ("d3", 0.6)],  # ranks 1 and 4
           "c": [(f"n{i}", 1 - i / 200) for i in range(120)] + [("d4", 0.0)],  # beyond 100: not recalled
           "d": []}  # retrieved nothing: scores 0
    per_query = query_metrics(qrels, run)
    ideal2 = _dcg([1, 2])
    expected = {
        "a": {"ndcg@10": 1 / math.log2(3), "recall@100": 1.0, "mrr@10": 0.5},
        "b": {"ndcg@10": (1 + 1 / math.log2(5)) / ideal2, "recall@100": 1.0, "mrr@10": 1.0},
        "c": {"ndcg@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0},
        "d": {"ndcg@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0},
    }
    for query, values in expected.items():
        for name, value in values.items():
            assert per_query[query][name] == pytest.approx(value, abs=1e-9), (query, name)
    means = mean_metrics(per_query)
    assert means["ndcg@10"] == pytest.approx((1 / math.log2(3) + (1 + 1 / math.log2(5)) / ideal2) / 4)
    assert means["recall@100"] == pytest.approx(0.5) and means["mrr@10"] == pytest.approx(1.5 / 4)


def test_documents_are_ranked_by_their_chunks() -> None:
    hits = [("A", 0.9), ("B", 0.85), ("B", 0.8), ("C", 0.5), ("B", 0.1), ("A", 0.2)]
    assert rank_documents(hits, "max") == [("A", 0.9), ("B", 0.85), ("C", 0.5)]
    assert [d for d, _ in rank_documents(hits, "sum")] == ["B", "A", "C"]
    assert rank_documents(hits, "mean") == [("B", pytest.approx(1.75 / 3)), ("A", pytest.approx(0.55)), ("C", 0.5)]
    with pytest.raises(ValueError, match="unknown aggregation"):
        rank_documents(hits, "median")  # type: ignore[arg-type]


def test_search_fetches_deeper_until_it_has_enough_documents() -> None:
    """Ten chunks per document: four chunks per wanted document are not enough, so the search doubles."""
    rng = np.random.default_rng(0)
    doc_of = np.repeat(np.arange(50), 10)
    centers = rng.standard_normal((50, 8))  # a document's chunks are alike: its best chunks come together
    chunk_vectors = (centers[doc_of] + 0.05 * rng.standard_normal((500, 8))).astype(np.float32)
    queries = rng.standard_normal((6, 8)).astype(np.float32)
    asked: list[int] = []

    def search(q: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        asked.append(k)
        scores = q @ chunk_vectors.T
        order = np.argsort(-scores, axis=1)[:, :k]
        return [[(f"d{doc_of[j]}", float(s[j])) for j in row] for s, row in zip(scores, order, strict=True)]

    got = search_documents(search, queries, depth=20, chunks_in_index=500)
    assert asked[0] == 80 and len(asked) >= 2  # fetched again, deeper
    exact = search(queries, 500)
    for ranking, full in zip(got, exact, strict=True):
        assert ranking == rank_documents(full, "max")[:20]


def test_bad_relevance_files_name_the_file_and_line(tmp_path: Path) -> None:
    beir = tmp_path / "beir"
    shutil.copytree(TINY, beir)
    qrels = beir / "qrels" / "test.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\r\nq1\td1\t1\r\nq2\td8\r\n")
    with pytest.raises(InputError, match=rf"^{qrels}:3: expected query-id, corpus-id and score"):
        read_qrels(__import__("upath").UPath(str(qrels)))
    qrels.write_text("query-id\tcorpus-id\tscore\r\nq1\td1\tyes\r\n")
    with pytest.raises(InputError, match=rf"^{qrels}:2: score 'yes' is not a number"):
        read_relevance_data(str(beir))
    qrels.write_text("q1\td1\t1\nq404\td2\t1\n")
    with pytest.raises(InputError, match=r"queries.jsonl: 1 judged queries of test.tsv are not in it, e.g. \['q404'\]"):
        read_relevance_data(str(beir))
    (beir / "queries.jsonl").write_text('{"_id": "q1", "text": "ok"}\n{"_id": "q2", "text": \n')
    with pytest.raises(InputError, match=r"queries.jsonl:2: malformed JSON"):
        read_relevance_data(str(beir))


def _evaluate(instance: Any, resources: dict[str, Any], partition: str, config: dict[str, Any] | None = None) -> Any:
    return materialize([*ALL_ASSETS, *ALL_CHECKS], instance=instance, resources=resources, partition_key=partition,
                       selection=["retrieval_eval"], run_config=config or {}, raise_on_error=False)


@pytest.fixture
def tiny(tmp_path: Path, instance: Any, resources: dict[str, Any]) -> Path:
    beir = tmp_path / "tiny_beir"
    shutil.copytree(TINY, beir)
    add_source(instance, resources, "tiny", beir)
    ingest(instance, resources, "tiny")
    index(instance, resources)
    return beir


def test_evaluation_asset_equals_hand_computed_metrics(tiny: Path, instance: Any, resources: dict[str, Any]) -> None:
    result = _evaluate(instance, resources, "tiny")
    assert result.success
    meta = metadata(result, "retrieval_eval")
    table = resources["store"].read_table(resources["store"].read_latest(["retrieval_eval"], "tiny"))
    rows = {(r["store"], r["query_id"]): r for r in table.to_pylist()}
    assert sorted(rows) == [(s, q) for s in ("faiss", "milvus") for q in ("q1", "q2", "q3", "q4")]  # q5: unjudged
    for store in ("faiss", "milvus"):
        q1, q2, q3, q4 = (rows[(store, q)] for q in ("q1", "q2", "q3", "q4"))
        # The only document on each topic ranks first (see tests/fixtures/tiny_beir/README.md).
        assert q1["relevant_ranks"] == [1] and q3["relevant_ranks"] == [1] and q4["relevant_ranks"] == [1]
        assert (q1["ndcg_at_10"], q1["recall_at_100"], q1["mrr_at_10"]) == (1.0, 1.0, 1.0)
        # q4: d5 at rank 1, d99 is not in the corpus: half recalled, ideal DCG counts both.
        assert q4["ndcg_at_10"] == pytest.approx(1 / _dcg([1, 2]))
        assert (q4["recall_at_100"], q4["mrr_at_10"]) == (0.5, 1.0)
        # q2: d8 first, d3 wherever the model put it among the eight documents.
        first, second = q2["relevant_ranks"]
        assert first == 1 and 2 <= second <= 8 and q2["top10"][0] == "d8"
        assert q2["ndcg_at_10"] == pytest.approx(_dcg([1, second]) / _dcg([1, 2]))
        assert (q2["recall_at_100"], q2["mrr_at_10"]) == (1.0, 1.0)
        hand = np.mean([1.0, _dcg([1, second]) / _dcg([1, 2]), 1.0, 1 / _dcg([1, 2])])
        assert meta[f"{store}_ndcg@10"] == pytest.approx(hand, abs=1e-6)
        assert meta[f"{store}_recall@100"] == pytest.approx(0.875) and meta[f"{store}_mrr@10"] == 1.0
        assert meta[f"{store}_unknown_doc_ids"] == 0
    assert rows[("faiss", "q2")]["top10"] == rows[("milvus", "q2")]["top10"]
    assert meta["faiss_milvus_top10_agreement"] == 1.0
    assert meta["queries"] == 4 and meta["judgments"] == 6 and meta["corpus_documents"] == 8
    assert [r.data["store"] for r in meta["results"].records] == ["faiss", "milvus"]
    checks = check_results(result)
    assert {name: checks[name].passed for name in EVAL_CHECKS} == dict.fromkeys(EVAL_CHECKS, True)


def test_checks_fail_when_they_should(tiny: Path, instance: Any, resources: dict[str, Any]) -> None:
    floor = "retrieval_eval_ndcg_at_10_above_floor"
    strict = _evaluate(instance, resources, "tiny", {"ops": {floor: {"config": {"floor": 0.95}}}})
    assert not strict.success  # blocking, ERROR severity: the run fails
    verdict = check_results(strict)["ndcg_at_10_above_floor"]
    assert not verdict.passed and verdict.description.startswith("nDCG@10 below the floor 0.95:")
    warned = _evaluate(instance, resources, "tiny", {"ops": {floor: {"config": {"floor": 0.95, "fail_run": False}}}})
    assert warned.success and not check_results(warned)["ndcg_at_10_above_floor"].passed

    # A vector of a document that is not in the corpus, right on top of q1, and only in Milvus.
    milvus, pool = resources["milvus"], resources["model_pool"]
    ghost = pool.encode(["How do plants make glucose from sunlight?"])[0]
    milvus.upsert_rows([{"id": 777, "vector": ghost.tolist(), "chunk_id": "ghost#0", "doc_id": "ghost",
                         "source": "tiny", "title": "", "text": "stale", "vector_key": "0" * 32}])
    broken = _evaluate(instance, resources, "tiny")
    assert not broken.success
    checks = check_results(broken)
    assert not checks["results_are_corpus_documents"].passed
    assert checks["results_are_corpus_documents"].description == (
        "results outside the corpus: milvus: 1 ids, e.g. ['ghost']")
    # Eight documents: every top-10 holds them all, so Milvus's extra one changes the top-10 of every query.
    assert not checks["faiss_and_milvus_agree"].passed
    assert checks["faiss_and_milvus_agree"].description == "same top-10 for 0.00% of 4 queries (at least 99% wanted)"
    assert checks["ndcg_at_10_above_floor"].passed

    # The index job's reconciliation removes the stray vector; the evaluation is clean again.
    index(instance, resources)
    assert _evaluate(instance, resources, "tiny").success


def test_queries_that_got_worse_are_listed(tiny: Path, instance: Any, resources: dict[str, Any]) -> None:
    assert _evaluate(instance, resources, "tiny").success
    corpus = tiny / "corpus.jsonl"
    docs = [json.loads(line) for line in corpus.read_text().splitlines()]
    docs[0]["title"], docs[0]["text"] = "Chess endgames", "Rook endgames are the most common endgames in chess."
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    ingest(instance, resources, "tiny")
    index(instance, resources)
    result = _evaluate(instance, resources, "tiny", {"ops": {"retrieval_eval_ndcg_at_10_above_floor": {
        "config": {"fail_run": False}}}})
    meta = metadata(result, "retrieval_eval")
    worse = {(e["store"], e["query_id"]) for e in meta["worse_than_previous_examples"]}
    assert worse == {("faiss", "q1"), ("milvus", "q1")}
    assert meta["queries_worse_than_previous"] == 2
    assert all(e["ndcg@10_before"] == 1.0 and e["ndcg@10_now"] < 1.0 for e in meta["worse_than_previous_examples"])


def test_sources_without_judgments_are_skipped(tmp_path: Path, instance: Any, resources: dict[str, Any]) -> None:
    add_source(instance, resources, "plain", write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "text": "alpha"}]))
    ingest(instance, resources, "plain")
    index(instance, resources)
    result = _evaluate(instance, resources, "plain")
    assert result.success and result.get_asset_materialization_events() == []


def test_cli_eval_prints_the_table(quiver_home: Path, tmp_path: Path) -> None:
    beir = tmp_path / "tiny_beir"
    shutil.copytree(TINY, beir)
    env = {**os.environ, "DAGSTER_HOME": str(quiver_home), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(Path(sys.executable).parent / "quiver"), "eval", str(beir)], cwd=PROJECT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from dagster import AssetKey, DagsterInstance

    with DagsterInstance.get() as inst:
        event = inst.get_latest_materialization_event(AssetKey("retrieval_eval"))
        meta = {k: v.value for k, v in event.asset_materialization.metadata.items()}
    lines = proc.stdout.splitlines()
    assert lines[0] == "Retrieval quality of 'tiny_beir' (tokens chunking, max over chunks)"
    assert lines[2].split() == ["store", "index", "nDCG@10", "Recall@100", "MRR@10", "queries"]
    for line, store, kind in ((lines[3], "faiss", "flat"), (lines[4], "milvus", "FLAT")):
        assert line.split() == [store, kind, f"{meta[f'{store}_ndcg@10']:.5f}", "0.87500", "1.00000", "4"]
    assert "FAISS and Milvus share the top-10 of 100.00% of queries" in proc.stdout
    assert sum(line.startswith("PASS  ") for line in lines) == 3
    machine = subprocess.run([str(Path(sys.executable).parent / "quiver"), "eval", str(beir), "--json"], cwd=PROJECT,
                             env=env, capture_output=True, text=True, timeout=600)
    report = json.loads(machine.stdout)
    assert report["stores"]["faiss"]["ndcg@10"] == meta["faiss_ndcg@10"]
    assert report["queries_worse_than_previous"] == 0 and all(c["passed"] for c in report["checks"].values())


def test_top_k_agreement_counts_queries_with_the_same_top_k() -> None:
    a = [[("x", 1.0), ("y", 0.5)], [("x", 1.0)]]
    b = [[("y", 0.9), ("x", 0.8)], [("z", 1.0)]]
    assert top_k_agreement(a, b, k=2) == 0.5
