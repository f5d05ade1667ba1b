"""The command line as a user runs it: `dagster asset materialize`, `quiver run`, `quiver search`."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import PROJECT
from tests.helpers import scifact_docs, write_jsonl

BIN = Path(sys.executable).parent


def _run(args: list[str], home: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DAGSTER_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(args, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_cli_materialize_run_and_search(quiver_home: Path, tmp_path: Path) -> None:
    docs = scifact_docs(30)
    source = write_jsonl(tmp_path / "small.jsonl", docs)
    added = _run([str(BIN / "quiver"), "source", "add", "small", str(source)], quiver_home)
    assert added.stdout.strip() == f"added source 'small': jsonl at {source}"

    extra = write_jsonl(tmp_path / "extra.jsonl", scifact_docs(8, start=30))
    _run([str(BIN / "quiver"), "source", "add", "extra", str(extra)], quiver_home)

    # A backfill over both sources as one run (single-run backfill policy): one model load for all.
    _run([str(BIN / "dagster"), "asset", "materialize", "-m", "platform_defs",
          "--select", "documents,chunks,embeddings", "--partition-range", "small...extra"], quiver_home)
    from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

    with DagsterInstance.get() as instance:
        def latest(partition: str):  # noqa: ANN202
            records = instance.fetch_materializations(
                AssetRecordsFilter(asset_key=AssetKey("embeddings"), asset_partitions=[partition]), limit=1).records
            return records[0].event_log_entry

        assert latest("small").run_id == latest("extra").run_id
        meta = {k: v.value for k, v in latest("extra").asset_materialization.metadata.items()}
        assert set(meta["partitions"]) == {"small", "extra"}
        model = meta["details"]["model"]
        # a small run runs in process (execution mode auto): one model load there, for both partitions
        assert model["model_loads_in_step_process"] == 1 and model["model_inherited"] is False

    # A run config file sets the embed-and-insert pipeline and the index ops of each job it applies to.
    config = tmp_path / "ingest.yaml"
    config.write_text("ops:\n  embeddings:\n    config: {mode: sync, force: true, insert_batch_size: 3}\n"
                      "  faiss_index:\n    config: {rebuild: true, force: true}\n")
    run = _run([str(BIN / "quiver"), "run", "--config", str(config)], quiver_home)
    assert run.stdout.splitlines()[0] == (
        "quiver run materializes documents, chunks, embeddings of 2 source(s) (extra, small), then faiss_index and "
        "milvus_collection with their checks; not retrieval_eval (`quiver eval DIR` evaluates a BEIR directory)")
    assert "Quiver is ready." in run.stdout
    assert "quiver search" in run.stdout and "  quiver eval DIR" in run.stdout
    with DagsterInstance.get() as instance:
        embedded = latest_metadata(instance, "embeddings", "small")
        assert embedded["details"]["pipeline"]["pipeline_mode"] == "sync" and embedded["cache_hit"] is False
        assert embedded["milvus_unchanged"] == embedded["rows"]  # same vectors: nothing to rewrite
        assert latest_metadata(instance, "faiss_index")["mode"] == "rebuild"
    listed = _run([str(BIN / "quiver"), "source", "list"], quiver_home)
    assert [line.split() for line in listed.stdout.strip().splitlines()] == [
        ["name", "kind", "chunking", "judged", "queries", "path"], ["extra", "jsonl", "tokens", "no", str(extra)],
        ["small", "jsonl", "tokens", "no", str(source)]]

    query = docs[7]["title"]
    results = {}
    for store in ("faiss", "milvus"):
        out = _run([str(BIN / "quiver"), "search", query, "-k", "5", "--store", store, "--json"], quiver_home)
        results[store] = json.loads(out.stdout)
    assert [r["doc_id"] for r in results["faiss"]] == [r["doc_id"] for r in results["milvus"]]
    top = results["faiss"][0]
    assert top["doc_id"] == docs[7]["id"]  # a document's own title finds it first
    assert top["title"] == docs[7]["title"]
    assert top["rank"] == 1 and 0.5 < top["score"] <= 1.0001
    assert len(results["faiss"]) == 5 and len({r["doc_id"] for r in results["faiss"]}) == 5
    assert [r["rank"] for r in results["faiss"]] == [1, 2, 3, 4, 5]
    assert top["snippet"] and top["snippet"] in " ".join(docs[7]["text"].split())

    assert {r["source"] for r in results["faiss"]} <= {"small", "extra"}

    plain = _run([str(BIN / "quiver"), "search", query, "-k", "2"], quiver_home)
    first_line = plain.stdout.splitlines()[0]
    assert first_line.startswith(" 1. ") and docs[7]["id"] in first_line and "[small]" in first_line


def latest_metadata(instance: Any, asset: str, partition: str | None = None) -> dict[str, Any]:
    from dagster import AssetKey, AssetRecordsFilter

    records = instance.fetch_materializations(AssetRecordsFilter(
        asset_key=AssetKey(asset), asset_partitions=[partition] if partition else None), limit=1).records
    return {k: v.value for k, v in records[0].event_log_entry.asset_materialization.metadata.items()}


def test_cli_reports_bad_run_config(quiver_home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("ops: [unclosed\n")
    env = {**os.environ, "DAGSTER_HOME": str(quiver_home)}
    proc = subprocess.run([str(BIN / "quiver"), "run", "--config", str(bad)], cwd=PROJECT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"quiver: {bad}: not valid YAML")


def test_cli_reports_unknown_source(quiver_home: Path) -> None:
    env = {**os.environ, "DAGSTER_HOME": str(quiver_home)}
    proc = subprocess.run([str(BIN / "quiver"), "run", "--source", "nope"], cwd=PROJECT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown source 'nope': add it with `quiver source add nope PATH`" in proc.stderr


def test_workspace_loads_every_asset(quiver_home: Path) -> None:
    proc = _run([str(BIN / "dagster"), "definitions", "validate", "-w", "workspace.yaml"], quiver_home)
    assert "Validation successful" in proc.stdout + proc.stderr
    from platform_defs import defs

    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert keys == {"documents", "chunks", "embeddings", "faiss_index", "milvus_collection", "retrieval_eval"}


def test_cli_run_indexes_every_good_source_when_a_new_one_is_bad(quiver_home: Path, tmp_path: Path) -> None:
    quiver = str(BIN / "quiver")
    _run([quiver, "source", "add", "first", str(write_jsonl(tmp_path / "first.jsonl", scifact_docs(4)))], quiver_home)
    _run([quiver, "run"], quiver_home)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": \n', encoding="utf-8")
    _run([quiver, "source", "add", "bad", str(bad)], quiver_home)
    fresh = scifact_docs(3, start=50)
    _run([quiver, "source", "add", "fresh", str(write_jsonl(tmp_path / "fresh.jsonl", fresh))], quiver_home)
    env = {**os.environ, "DAGSTER_HOME": str(quiver_home)}
    proc = subprocess.run([quiver, "run"], cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"source 'bad' failed: step documents: bad input in source 'bad': {bad}:2: malformed JSON" in proc.stderr
    assert "Quiver is ready." in proc.stdout  # the indexes were updated with every good source
    found = json.loads(_run([quiver, "search", fresh[1]["title"], "-k", "1", "--json"], quiver_home).stdout)
    assert found[0]["doc_id"] == fresh[1]["id"] and found[0]["source"] == "fresh"


def _quiver(capsys: Any, *argv: str) -> tuple[int, str, str]:
    """`quiver ARGV` in this process, as main() runs it: exit status, stdout, stderr."""
    from platform_defs.cli import main

    capsys.readouterr()  # what ran before (Dagster's logs of a materialization) is not this command's
    status = main(list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


def test_search_refuses_an_empty_query_and_k_below_one_before_loading_anything(quiver_home: Path,
                                                                              capsys: Any) -> None:
    from resources.model_state import _STATES, LOADS_BY_PID

    loaded_before, loads_before = set(_STATES), dict(LOADS_BY_PID)  # what earlier tests of this process loaded
    for k in ("0", "-1"):
        assert _quiver(capsys, "search", "parse json", "-k", k) == (
            2, "", f"quiver: k must be at least 1 (got {k}): it is how many documents to return\n")
    for query in ("", "   \t "):
        assert _quiver(capsys, "search", query) == (
            2, "", 'quiver: the query is empty: give the text to search for, e.g. quiver search "how do I parse '
                   'json"\n')
    # refused before the model (or any index) was loaded
    assert set(_STATES) == loaded_before and dict(LOADS_BY_PID) == loads_before


def test_search_caps_k_at_what_the_index_holds_and_says_so(tmp_path: Path, instance: Any, resources: dict[str, Any],
                                                           capsys: Any) -> None:
    from tests.helpers import add_source, index, ingest

    notes = tmp_path / "notes"
    notes.mkdir()
    for i in range(3):
        (notes / f"n{i}.md").write_text(f"# Note {i}\n\nHow to parse json, part {i}.\n", encoding="utf-8")
    add_source(instance, resources, "notes", notes)
    ingest(instance, resources, "notes")
    index(instance, resources)
    for store in ("faiss", "milvus"):
        status, out, err = _quiver(capsys, "search", "parse json", "-k", "100000", "--store", store, "--json")
        assert status == 0
        assert sorted(r["doc_id"] for r in json.loads(out)) == ["n0.md", "n1.md", "n2.md"]
        assert err == (f"quiver: asked for 100,000 results, but the {store} index holds 3 documents (3 vectors): "
                       "showing all 3\n")
    status, out, err = _quiver(capsys, "search", "parse json", "-k", "2", "--json")
    assert (status, len(json.loads(out)), err) == (0, 2, "")  # within what the index holds: no note


def test_every_option_has_help_that_says_its_default() -> None:
    import argparse

    from platform_defs.cli import build_parser

    def parsers(parser: argparse.ArgumentParser, name: str) -> list[tuple[str, argparse.ArgumentParser]]:
        found = [(name, parser)]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helped = {choice.dest for choice in action._choices_actions}
                assert helped == set(action.choices), f"{name}: no help for {set(action.choices) - helped}"
                for sub, subparser in action.choices.items():
                    found += parsers(subparser, f"{name} {sub}")
        return found

    missing, silent = [], []
    for name, parser in parsers(build_parser(), "quiver"):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            if not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
            elif action.option_strings and action.default not in (None, False) and "default" not in action.help:
                silent.append(f"{name} {'/'.join(action.option_strings)}")
    assert missing == [] and silent == []


def test_source_list_and_remove_say_what_there_is(quiver_home: Path, tmp_path: Path, capsys: Any) -> None:
    import shutil

    assert _quiver(capsys, "source", "list") == (
        0, "no sources yet: `quiver source add NAME PATH` adds one; `quiver run` registers the default corpus (stdlib) "
           "when there is none\n", "")
    beir = tmp_path / "tiny"
    shutil.copytree(PROJECT / "tests" / "fixtures" / "tiny_beir", beir)
    status, out, _ = _quiver(capsys, "source", "add", "tiny", str(beir), "--chunking", "whole_document")
    assert status == 0
    assert out.splitlines()[1] == f"it has judged queries: `quiver eval {beir}` evaluates retrieval on it"
    status, out, _ = _quiver(capsys, "source", "list")
    assert [line.split() for line in out.splitlines()] == [["name", "kind", "chunking", "judged", "queries", "path"],
                                                           ["tiny", "beir", "whole_document", "yes", str(beir)]]
    assert _quiver(capsys, "source", "remove", "nope") == (1, "", "quiver: no source 'nope' to remove (sources: "
                                                                 "tiny)\n")
    assert _quiver(capsys, "source", "remove", "tiny") == (
        0, "removed source 'tiny'; run `quiver run` to drop its vectors from FAISS and Milvus\n", "")


def test_export_shows_a_bar_on_a_terminal(quiver_home: Path, tmp_path: Path) -> None:
    from tests.helpers import run_on_a_terminal

    env = {**os.environ, "DAGSTER_HOME": str(quiver_home), "HF_HUB_OFFLINE": "1",
           "QUIVER_EXPORT_DIR": str(tmp_path / "exports")}  # nothing exported yet: minutes of work on a large model
    done, terminal = run_on_a_terminal([str(BIN / "quiver"), "export", "--backend", "onnx"], env, PROJECT, 600)
    assert done.returncode == 0, terminal[-3000:]
    assert "quiver export: 0/1 steps |" in terminal
    assert "exporting onnx (made once per machine, then reused)" in terminal
    assert "quiver export: 1/1 steps |" in terminal
    assert done.stdout.startswith(f"onnx: {tmp_path / 'exports'}/onnx-")
    piped = subprocess.run([str(BIN / "quiver"), "export", "--backend", "onnx"], cwd=PROJECT, env=env,
                           capture_output=True, text=True, timeout=300)  # made already; not a terminal: no bar
    assert piped.returncode == 0 and "steps |" not in piped.stderr and piped.stdout == done.stdout
