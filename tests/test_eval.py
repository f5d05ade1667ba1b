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
from quiver.report import when_text
from quiver.retrieval import mean_metrics, query_metrics, rank_documents, search_documents, top_k_agreement
from tests.conftest import PROJECT
from tests.helpers import add_source, check_results, index, ingest, metadata, run_on_a_terminal, write_jsonl

TINY = PROJECT / "tests" / "fixtures" / "tiny_beir"
EVAL_CHECKS = ("ndcg_at_10_no_regression", "ndcg_at_10_above_floor", "faiss_and_milvus_agree",
               "results_are_corpus_documents")


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
    # No floor unless one is set; the first evaluation with these settings is the regression gate's baseline.
    assert checks["ndcg_at_10_above_floor"].description.startswith("no floor set (nDCG@10 faiss ")
    assert checks["ndcg_at_10_no_regression"].description == (
        f"first evaluation of 'tiny' with these settings: nDCG@10 faiss {meta['faiss_ndcg@10']:.5f}, milvus "
        f"{meta['milvus_ndcg@10']:.5f} is the baseline later evaluations are compared with")
    assert meta["summary"].startswith(f"**Evaluated 4 queries of tiny: nDCG@10 faiss {meta['faiss_ndcg@10']:.5f}, ")
    settings = meta["details"]["evaluation_settings"]
    assert settings["index"] == {"faiss": {"type": "flat"}, "milvus": {"type": "FLAT", "metric": "IP"}}
    assert (settings["chunking"], settings["aggregation"], settings["stores"]) == ("tokens", "max", ["faiss", "milvus"])


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


def test_a_drop_fails_the_regression_gate_naming_both_figures_and_the_queries(
    tiny: Path, instance: Any, resources: dict[str, Any]
) -> None:
    baseline = _evaluate(instance, resources, "tiny")
    assert baseline.success
    before = metadata(baseline, "retrieval_eval")
    corpus = tiny / "corpus.jsonl"
    docs = [json.loads(line) for line in corpus.read_text().splitlines()]
    docs[0]["title"], docs[0]["text"] = "Chess endgames", "Rook endgames are the most common endgames in chess."
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    ingest(instance, resources, "tiny")
    index(instance, resources)
    result = _evaluate(instance, resources, "tiny")
    assert not result.success  # blocking, ERROR severity by default
    meta = metadata(result, "retrieval_eval")
    worse = {(e["store"], e["query_id"]) for e in meta["worse_than_previous_examples"]}
    assert worse == {("faiss", "q1"), ("milvus", "q1")}
    assert meta["queries_worse_than_previous"] == 2
    assert all(e["ndcg@10_before"] == 1.0 and e["ndcg@10_now"] < 1.0 for e in meta["worse_than_previous_examples"])

    verdict = check_results(result)["ndcg_at_10_no_regression"]
    assert not verdict.passed
    old, new = before["faiss_ndcg@10"], meta["faiss_ndcg@10"]
    q1 = next(e["ndcg@10_now"] for e in meta["worse_than_previous_examples"] if e["store"] == "faiss")
    assert verdict.description == (
        f"nDCG@10 dropped more than 0.01 below the last passing evaluation (run {baseline.run_id[:8]}, "
        f"{when_text(verdict.metadata['baseline_made_at'].value)}): faiss {old:.5f} -> {new:.5f} (-{old - new:.5f}); "
        f"milvus {old:.5f} -> {new:.5f} (-{old - new:.5f}); 2 queries got worse: q1 (faiss 1.00 -> {q1:.2f}), "
        f"q1 (milvus 1.00 -> {q1:.2f})")
    assert verdict.metadata["baseline_run_id"].value == baseline.run_id
    assert verdict.metadata["baseline_faiss_ndcg@10"].value == round(old, 6)
    assert verdict.metadata["faiss_ndcg@10"].value == round(new, 6)
    assert [w["query_id"] for w in verdict.metadata["worse_queries"].value] == ["q1", "q1"]

    # Still compared with the last *passing* evaluation: a failed one never becomes the baseline.
    again = check_results(_evaluate(instance, resources, "tiny"))["ndcg_at_10_no_regression"]
    assert not again.passed and again.metadata["baseline_run_id"].value == baseline.run_id
    # A looser tolerance passes, and that evaluation is the new baseline.
    loose = _evaluate(instance, resources, "tiny", {"ops": {"retrieval_eval_ndcg_at_10_no_regression": {
        "config": {"tolerance": 0.5}}}})
    assert loose.success
    assert check_results(loose)["ndcg_at_10_no_regression"].description.startswith(
        f"nDCG@10 faiss {new:.5f}, milvus {new:.5f}: within 0.5 of the last passing evaluation (run "
        f"{baseline.run_id[:8]}, ")
    after = _evaluate(instance, resources, "tiny")
    assert after.success
    assert check_results(after)["ndcg_at_10_no_regression"].metadata["baseline_run_id"].value == loose.run_id
    # Other settings are another comparison: summing chunk scores starts a baseline of its own.
    summed = _evaluate(instance, resources, "tiny", {"ops": {"retrieval_eval": {"config": {"aggregation": "sum"}}}})
    assert check_results(summed)["ndcg_at_10_no_regression"].description.startswith(
        "first evaluation of 'tiny' with these settings: ")


def test_only_sources_with_judgments_are_evaluation_partitions(tmp_path: Path, instance: Any,
                                                               resources: dict[str, Any]) -> None:
    """A source without queries and qrels is no partition of retrieval_eval (the UI would show it missing
    forever); one whose judgments vanished after it was registered is skipped, saying why."""
    add_source(instance, resources, "plain", write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "text": "alpha"}]))
    beir = tmp_path / "gone"
    shutil.copytree(TINY, beir)
    add_source(instance, resources, "gone", beir)
    assert instance.get_dynamic_partitions("sources") == ["plain", "gone"]
    assert instance.get_dynamic_partitions("judged_sources") == ["gone"]
    shutil.rmtree(beir / "qrels")
    ingest(instance, resources, "gone")
    index(instance, resources)
    result = _evaluate(instance, resources, "gone")
    assert result.success and result.get_asset_materialization_events() == []
    logged = [e.message for e in instance.all_logs(result.run_id) if "retrieval_eval[gone]: skipped" in e.message]
    assert logged and f"{beir} has no queries.jsonl and qrels/test.tsv" in logged[0]


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
    assert sum(line.startswith("PASS  ") for line in lines) == 4
    machine = subprocess.run([str(Path(sys.executable).parent / "quiver"), "eval", str(beir), "--json"], cwd=PROJECT,
                             env=env, capture_output=True, text=True, timeout=600)
    report = json.loads(machine.stdout)
    assert report["stores"]["faiss"]["ndcg@10"] == meta["faiss_ndcg@10"]
    assert report["queries_worse_than_previous"] == 0 and all(c["passed"] for c in report["checks"].values())


def test_cli_eval_passes_a_naturally_low_score_and_fails_a_drop_with_its_verdict_not_a_traceback(
    quiver_home: Path, tmp_path: Path
) -> None:
    """nDCG@10 below 0.5 is no failure by itself (NFCorpus scores 0.316 at the published figure): the first
    evaluation passes. A later drop beyond the tolerance fails with the table and the verdict, exit status 1,
    and no stack trace."""
    beir = tmp_path / "hard"
    shutil.copytree(TINY, beir)
    # every query judged relevant to an off-topic document: a corpus on which the model scores low
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td6\t1\nq2\td7\t1\nq3\td2\t1\n"
                                             "q4\td1\t1\n")
    env = {**os.environ, "DAGSTER_HOME": str(quiver_home), "HF_HUB_OFFLINE": "1"}
    quiver = str(Path(sys.executable).parent / "quiver")
    # stderr on a terminal, as a person runs it: a bar of the three jobs it waits for, with the time elapsed
    first, terminal = run_on_a_terminal([quiver, "eval", str(beir), "--json"], env, PROJECT, 600)
    assert first.returncode == 0, first.stdout + terminal[-3000:]
    assert "quiver eval hard: 0/3 steps" in terminal and "ingesting 'hard'" in terminal
    assert "quiver eval hard: 3/3 steps" in terminal and "evaluating 'hard'" in terminal
    report = json.loads(first.stdout)  # stdout stays one JSON document
    low = report["stores"]["faiss"]["ndcg@10"]
    assert low < 0.5 and all(c["passed"] for c in report["checks"].values())
    assert report["checks"]["ndcg_at_10_above_floor"]["description"].startswith("no floor set")

    corpus = beir / "corpus.jsonl"  # d6, relevant to q1, now reads like the chess document d7
    docs = [json.loads(line) for line in corpus.read_text().splitlines()]
    docs[5]["title"], docs[5]["text"] = "Chess endgames", "Rook endgames are the most common endgames in chess."
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    second = subprocess.run([quiver, "eval", str(beir)], cwd=PROJECT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 1, second.stdout + second.stderr[-3000:]
    lines = second.stdout.splitlines()
    assert lines[2].split() == ["store", "index", "nDCG@10", "Recall@100", "MRR@10", "queries"]
    now = float(lines[3].split()[2])
    assert now < low - 0.01
    [verdict] = [line for line in lines if line.startswith("FAIL  ")]
    assert verdict.startswith("FAIL  ndcg_at_10_no_regression: nDCG@10 dropped more than 0.01 below the last passing "
                              "evaluation (run ")
    assert f"faiss {low:.5f} -> {now:.5f}" in verdict and "queries got worse: q1 (faiss " in verdict
    # not on a terminal: the plain lines, no bar
    assert "==> evaluating 'hard'" in second.stderr and "steps |" not in second.stderr
    for output in (second.stdout, second.stderr):
        assert not [word for word in ("Traceback", "Stack Trace", "DagsterAssetCheckFailedError") if word in output]


def test_top_k_agreement_counts_queries_with_the_same_top_k() -> None:
    a = [[("x", 1.0), ("y", 0.5)], [("x", 1.0)]]
    b = [[("y", 0.9), ("x", 0.8)], [("z", 1.0)]]
    assert top_k_agreement(a, b, k=2) == 0.5
