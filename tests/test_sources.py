"""Readers of every source kind, and the errors bad input gets."""

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from quiver.errors import InputError
from quiver.hashing import document_hash
from quiver.sources import ReadReport, detect_kind, read_documents, source_fingerprint


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_bytes(("\n".join(lines) + "\n").encode())
    return path


def test_stdlib_corpus_is_real_docs_with_stable_ids() -> None:
    first = list(read_documents("stdlib", "stdlib"))
    second = list(read_documents("stdlib", "stdlib"))
    assert 3500 <= len(first) <= 5000
    assert 1_000_000 <= sum(len(d.text) for d in first) <= 2_000_000
    assert [d.doc_id for d in first] == [d.doc_id for d in second]
    ids = {d.doc_id: d for d in first}
    loads = ids["json/__init__.py:loads"]
    assert loads.title == "json.loads"
    assert "Deserialize" in loads.text
    assert ids["json/decoder.py:JSONDecoder.decode"].title == "json.decoder.JSONDecoder.decode"
    assert ids["json/__init__.py:<module>"].title == "json"
    assert not any(d.doc_id.startswith(("test/", "idlelib/")) for d in first)


def test_jsonl_normalizes_and_hashes(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "a.jsonl", [
        json.dumps({"id": "x", "title": " T ", "text": "Line one  \r\n\r\n\r\n\r\nline two\u0301"}),
        json.dumps({"_id": 7, "text": "integer ids are fine"}),
    ])
    docs = list(read_documents("jsonl", str(src)))
    assert [d.doc_id for d in docs] == ["x", "7"]
    assert docs[0].title == "T"
    assert docs[0].text == "Line one\n\nline tw\u00f3"  # NFC, CRLF, trailing spaces, blank lines
    assert docs[0].content_hash == document_hash("T", docs[0].text)
    assert docs[0].origin == f"{src}:1"


def test_malformed_json_line_names_file_and_line(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "bad.jsonl", [
        json.dumps({"id": "ok", "text": "fine"}),
        '{"id": "broken", "text": "no closing brace"',
        json.dumps({"id": "later", "text": "also fine"}),
    ])
    with pytest.raises(InputError) as err:
        list(read_documents("jsonl", str(src)))
    assert str(err.value).startswith(f"{src}:2: malformed JSON")

    report = ReadReport()
    docs = list(read_documents("jsonl", str(src), on_bad_record="skip", report=report))
    assert [d.doc_id for d in docs] == ["ok", "later"]
    assert len(report.bad_records) == 1 and report.bad_records[0].startswith(f"{src}:2:")


def test_record_without_text_names_the_record(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "r.jsonl", [json.dumps({"id": "a", "text": "x"}), json.dumps({"id": "b", "body": "?"})])
    with pytest.raises(InputError, match=rf"^{src}:2: record 'b': 'text' must be a string"):
        list(read_documents("jsonl", str(src)))


def test_undecodable_bytes_name_the_file(tmp_path: Path) -> None:
    src = tmp_path / "latin1.jsonl"
    src.write_bytes(b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "caf\xe9"}\n')
    with pytest.raises(InputError, match=rf"^{src}:2: undecodable bytes at offset \d+: the file is not UTF-8"):
        list(read_documents("jsonl", str(src)))
    docs_dir = tmp_path / "docs"
    docs_dir.mkdir()
    (docs_dir / "good.md").write_text("# Good\n\nbody", encoding="utf-8")
    (docs_dir / "bad.txt").write_bytes(b"\xff\xfe\x00garbage\xc3")
    with pytest.raises(InputError, match=rf"^{docs_dir / 'bad.txt'}: undecodable bytes"):
        list(read_documents("files", str(docs_dir)))


def test_empty_documents_are_dropped_and_counted(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "e.jsonl", [
        json.dumps({"id": "a", "text": "   \n\t "}), json.dumps({"id": "b", "text": "body"}),
        json.dumps({"id": "c", "text": ""})])
    report = ReadReport()
    assert [d.doc_id for d in read_documents("jsonl", str(src), report=report)] == ["b"]
    assert report.empty_dropped == 2


def test_duplicate_ids_are_bad_records(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "d.jsonl", [json.dumps({"id": "a", "text": "one"}), json.dumps({"id": "a", "text": "two"})])
    with pytest.raises(InputError, match=r"duplicate document id 'a' \(first seen at .*d.jsonl:1\)"):
        list(read_documents("jsonl", str(src)))


def test_markdown_directory(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "intro.md").write_text("Preamble\n# Getting started\nInstall it.", encoding="utf-8")
    (tmp_path / "sub" / "notes.txt").write_text("plain notes", encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    docs = list(read_documents(detect_kind(str(tmp_path)), str(tmp_path)))
    assert [(d.doc_id, d.title) for d in docs] == [("intro.md", "Getting started"), ("sub/notes.txt", "notes")]


def test_parquet_source_and_bad_row(tmp_path: Path) -> None:
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"id": ["p1", "p2"], "title": ["A", None], "text": ["alpha", "beta"]}), good)
    assert detect_kind(str(good)) == "parquet"
    assert [(d.doc_id, d.title, d.text) for d in read_documents("parquet", str(good))] == [
        ("p1", "A", "alpha"), ("p2", "", "beta")]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": ["p1", "p2"], "text": ["alpha", None]}), bad)
    with pytest.raises(InputError, match=rf"^{bad}: row 1: record 'p2': 'text' must be a string"):
        list(read_documents("parquet", str(bad)))
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"key": ["p1"], "body": ["x"]}), wrong)
    with pytest.raises(InputError, match=r"needs columns id \(or _id\) and text"):
        list(read_documents("parquet", str(wrong)))


def test_beir_directory_with_gzip_corpus(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "corpus.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"_id": "d1", "title": "T", "text": "x", "metadata": {}}) + "\n")
    (tmp_path / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "?"}) + "\n")
    assert detect_kind(str(tmp_path)) == "beir"
    assert [d.doc_id for d in read_documents("beir", str(tmp_path))] == ["d1"]


def test_truncated_gzip_names_the_file(tmp_path: Path) -> None:
    data = gzip.compress(b"".join(json.dumps({"id": str(i), "text": "t" * 50}).encode() + b"\n" for i in range(500)))
    src = tmp_path / "cut.jsonl.gz"
    src.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=rf"^{src}: cannot read"):
        list(read_documents("jsonl", str(src)))


def test_unknown_kind_and_missing_path(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(InputError, match="cannot tell the source kind"):
        detect_kind(str(tmp_path / "x.csv"))
    with pytest.raises(InputError, match="no such file or directory"):
        detect_kind(str(tmp_path / "missing.txt"))


def test_fingerprint_changes_exactly_with_content(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "f.jsonl", [json.dumps({"id": "a", "text": "one"})])
    before = source_fingerprint("jsonl", str(src))
    assert source_fingerprint("jsonl", str(src)) == before
    src.touch()
    assert source_fingerprint("jsonl", str(src)) == before
    _jsonl(src, [json.dumps({"id": "a", "text": "two"})])
    assert source_fingerprint("jsonl", str(src)) != before
