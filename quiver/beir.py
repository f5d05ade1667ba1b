"""BEIR-format relevance data: queries.jsonl and qrels/<split>.tsv beside the corpus.

Every bad line is reported with its file and line number.
"""

import csv
import io
import json
from dataclasses import dataclass

from upath import UPath

from quiver.errors import InputError


@dataclass(frozen=True)
class RelevanceData:
    """What an evaluation needs besides the index: the queries that have judgments, and the judgments."""

    queries: dict[str, str]  # query id -> text, only queries with qrels
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance}
    split: str


def has_relevance_data(path: str, split: str = "test") -> bool:
    root = UPath(path)
    return root.is_dir() and (root / "queries.jsonl").exists() and (root / "qrels" / f"{split}.tsv").exists()


def is_judged(path: str) -> bool:
    """Whether a directory holds judged queries of any split (queries.jsonl and a qrels/*.tsv): a source the
    retrieval evaluation can score, and so one of its partitions."""
    root = UPath(path)
    qrels = root / "qrels"
    return root.is_dir() and (root / "queries.jsonl").exists() and qrels.is_dir() and any(qrels.glob("*.tsv"))


def read_qrels(file: UPath) -> dict[str, dict[str, int]]:
    """query-id, corpus-id, score (a header line is optional); CRLF line ends are fine."""
    qrels: dict[str, dict[str, int]] = {}
    try:
        text = file.read_bytes().decode("utf-8-sig")
    except FileNotFoundError as exc:
        raise InputError(str(file), "no such file") from exc
    except UnicodeDecodeError as exc:
        raise InputError(str(file), f"undecodable bytes at offset {exc.start}: the file is not UTF-8") from exc
    for lineno, row in enumerate(csv.reader(io.StringIO(text, newline=""), delimiter="\t"), start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        if lineno == 1 and row[0].strip().lower() in ("query-id", "query_id", "qid"):
            continue
        if len(row) < 3:
            raise InputError(f"{file}:{lineno}", f"expected query-id, corpus-id and score separated by tabs, "
                                                 f"got {len(row)} field(s)")
        query_id, doc_id, score = row[0].strip(), row[1].strip(), row[2].strip()
        try:
            relevance = int(float(score))
        except ValueError as exc:
            raise InputError(f"{file}:{lineno}", f"score {score!r} is not a number") from exc
        if not query_id or not doc_id:
            raise InputError(f"{file}:{lineno}", "empty query-id or corpus-id")
        qrels.setdefault(query_id, {})[doc_id] = relevance
    return qrels


def read_queries(file: UPath, wanted: set[str] | None = None) -> dict[str, str]:
    """{query id: text} from queries.jsonl, optionally only the wanted ids."""
    queries: dict[str, str] = {}
    try:
        handle = file.open("rb")
    except FileNotFoundError as exc:
        raise InputError(str(file), "no such file") from exc
    with handle:
        for lineno, line in enumerate(handle, start=1):
            location = f"{file}:{lineno}"
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8-sig"))
            except UnicodeDecodeError as exc:
                raise InputError(location, f"undecodable bytes at offset {exc.start}: the file is not UTF-8") from exc
            except json.JSONDecodeError as exc:
                raise InputError(location, f"malformed JSON ({exc.msg} at column {exc.colno})") from exc
            if not isinstance(record, dict) or not isinstance(record.get("_id", record.get("id")), str | int):
                raise InputError(location, "a query needs an '_id' (string or integer)")
            query_id = str(record.get("_id", record.get("id")))
            text = record.get("text")
            if not isinstance(text, str) or not text.strip():
                raise InputError(location, f"query {query_id!r}: 'text' must be a non-empty string")
            if wanted is None or query_id in wanted:
                queries[query_id] = text
    return queries


def read_relevance_data(path: str, split: str = "test") -> RelevanceData:
    """The judged queries of a BEIR directory; a judged query missing from queries.jsonl is an error."""
    root = UPath(path)
    qrels_file = root / "qrels" / f"{split}.tsv"
    qrels = read_qrels(qrels_file)
    if not qrels:
        raise InputError(str(qrels_file), f"no judgments: the {split!r} split has no query with a relevant document")
    queries = read_queries(root / "queries.jsonl", set(qrels))
    missing = sorted(set(qrels) - set(queries))
    if missing:
        raise InputError(str(root / "queries.jsonl"), f"{len(missing)} judged queries of {qrels_file.name} are not "
                                                        f"in it, e.g. {missing[:5]}")
    return RelevanceData(queries, qrels, split)
