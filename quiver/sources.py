"""Readers that turn a source (stdlib docs, text files, JSONL, Parquet, BEIR) into documents.

Readers never import what they read; every bad record is reported with its file and line.
"""

import ast
import gzip
import io
import json
import re
import sysconfig
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow.parquet as pq
from upath import UPath

from quiver.errors import InputError
from quiver.hashing import document_hash
from quiver.names import SOURCE_KINDS, SourceKind  # noqa: F401 - SOURCE_KINDS: imported from here too

TEXT_SUFFIXES = (".md", ".markdown", ".txt", ".rst")
# A file that is a source by itself, by the end of its name (the longest first).
FILE_SUFFIXES: dict[str, SourceKind] = {".jsonl.gz": "jsonl", ".jsonl": "jsonl", ".ndjson": "jsonl",
                                        ".parquet": "parquet"}
# Parts of the stdlib tree that are tests, demos or vendored code rather than documentation.
STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "ensurepip",
     "tkinter", "__pycache__", "__phello__"}
)
STDLIB_MIN_DOCSTRING_CHARS = 50


@dataclass(frozen=True)
class RawDocument:
    doc_id: str
    title: str
    text: str
    origin: str  # file and line or record, for error messages and provenance


@dataclass(frozen=True)
class Document:
    doc_id: str
    title: str
    text: str
    origin: str
    content_hash: str


@dataclass
class ReadReport:
    """What a read skipped, for the materialization's metadata."""

    empty_dropped: int = 0
    bad_records: list[str] = field(default_factory=list)
    duplicates: int = 0


OnBadRecord = Literal["fail", "skip"]


def detect_kind(path: str) -> SourceKind:
    """Guess the kind of a user's source from what is at the path."""
    if path == "stdlib":
        return "stdlib"
    p = UPath(path)
    if p.is_dir():
        if (p / "corpus.jsonl").exists() or (p / "corpus.jsonl.gz").exists():
            return "beir"
        return "files"
    name = p.name.lower()
    for suffix, kind in FILE_SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    if not p.exists():
        raise InputError(path, "no such file or directory")
    raise InputError(path, "cannot tell the source kind: use a directory of .md/.txt files, "
                           "a .jsonl[.gz] or .parquet file, or a BEIR directory")


def normalize_text(text: str) -> str:
    """Unicode NFC, Unix newlines, no trailing spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def read_documents(
    kind: SourceKind,
    path: str,
    on_bad_record: OnBadRecord = "fail",
    report: ReadReport | None = None,
) -> Iterator[Document]:
    """Normalized, de-duplicated documents of a source; empty ones are dropped and counted."""
    report = report if report is not None else ReadReport()
    seen: dict[str, str] = {}

    def bad(location: str, problem: str) -> None:
        if on_bad_record == "fail":
            raise InputError(location, problem)
        report.bad_records.append(f"{location}: {problem}")

    for raw in _RAW_READERS[kind](path, bad):
        title = normalize_text(raw.title)
        text = normalize_text(raw.text)
        if not text:
            report.empty_dropped += 1
            continue
        if raw.doc_id in seen:
            report.duplicates += 1
            bad(raw.origin, f"duplicate document id {raw.doc_id!r} (first seen at {seen[raw.doc_id]})")
            continue
        seen[raw.doc_id] = raw.origin
        yield Document(raw.doc_id, title, text, raw.origin, document_hash(title, text))


BadRecord = Callable[[str, str], None]


def _read_stdlib(path: str, bad: BadRecord) -> Iterator[RawDocument]:
    root = UPath(sysconfig.get_paths()["stdlib"]) if path in ("", "stdlib") else UPath(path)
    for file in _walk_python_files(root):
        rel = file.relative_to(root).as_posix()
        try:
            tree = ast.parse(file.read_bytes(), filename=str(file))
        except (SyntaxError, ValueError):
            continue  # a few stdlib files are deliberately not valid Python: they hold no docs
        module = rel[: -len(".py")].replace("/", ".").removesuffix(".__init__")
        yield from _docstrings(tree, rel, module)


def _walk_python_files(root: UPath) -> Iterator[UPath]:
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.is_dir():
            if entry.name in STDLIB_SKIP_DIRS or entry.name.startswith(("test", "config-")):
                continue
            yield from _walk_python_files(entry)
        elif entry.name.endswith(".py"):
            yield entry


def _docstrings(tree: ast.Module, rel: str, module: str) -> Iterator[RawDocument]:
    doc = ast.get_docstring(tree)
    if doc and len(doc) >= STDLIB_MIN_DOCSTRING_CHARS:
        yield RawDocument(f"{rel}:<module>", module, doc, f"{rel}:1")

    def visit(node: ast.AST, qual: list[str]) -> Iterator[RawDocument]:
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            name = child.name
            if name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
                continue
            qualified = [*qual, name]
            text = ast.get_docstring(child)
            if text and len(text) >= STDLIB_MIN_DOCSTRING_CHARS:
                qn = ".".join(qualified)
                yield RawDocument(f"{rel}:{qn}", f"{module}.{qn}", text, f"{rel}:{child.lineno}")
            if isinstance(child, ast.ClassDef):
                yield from visit(child, qualified)

    yield from visit(tree, [])


def _decode(data: bytes, location: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(location, f"undecodable bytes at offset {exc.start}: the file is not UTF-8") from exc


def _read_files(path: str, bad: BadRecord) -> Iterator[RawDocument]:
    root = UPath(path)
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(TEXT_SUFFIXES)),
        key=lambda p: p.as_posix(),
    )
    for file in files:
        rel = file.relative_to(root).as_posix()
        try:
            text = _decode(file.read_bytes(), str(file))
        except InputError as exc:
            bad(exc.location, exc.problem)
            continue
        title = file.stem
        if file.suffix.lower() in (".md", ".markdown"):
            heading = re.search(r"^#\s+(.+)$", text, flags=re.MULTILINE)
            if heading:
                title = heading.group(1).strip()
        yield RawDocument(rel, title, text, str(file))


def _open_text_lines(file: UPath) -> Iterator[tuple[int, bytes]]:
    raw = file.open("rb")
    stream: io.BufferedIOBase = gzip.GzipFile(fileobj=raw) if file.name.endswith(".gz") else raw
    try:
        yield from enumerate(stream, start=1)
    except (OSError, EOFError) as exc:  # truncated or corrupt gzip
        raise InputError(str(file), f"cannot read: {exc}") from exc
    finally:
        stream.close()
        raw.close()


def _record_to_raw(record: Any, location: str, bad: BadRecord) -> RawDocument | None:
    if not isinstance(record, dict):
        bad(location, f"expected a JSON object, got {type(record).__name__}")
        return None
    doc_id = record.get("id", record.get("_id"))
    if doc_id is None or isinstance(doc_id, bool) or not isinstance(doc_id, str | int):
        bad(location, "missing or invalid 'id' (or '_id'): a string or integer is required")
        return None
    text = record.get("text")
    title = record.get("title") or ""
    if not isinstance(text, str):
        bad(location, f"record {doc_id!r}: 'text' must be a string")
        return None
    if not isinstance(title, str):
        bad(location, f"record {doc_id!r}: 'title' must be a string")
        return None
    return RawDocument(str(doc_id), title, text, location)


def _read_jsonl(path: str, bad: BadRecord) -> Iterator[RawDocument]:
    file = UPath(path)
    for lineno, line in _open_text_lines(file):
        location = f"{file}:{lineno}"
        try:
            decoded = _decode(line, location)
        except InputError as exc:
            bad(exc.location, exc.problem)
            continue
        decoded = decoded.rstrip("\r\n")
        if not decoded.strip():
            continue
        try:
            record = json.loads(decoded)
        except json.JSONDecodeError as exc:
            bad(location, f"malformed JSON ({exc.msg} at column {exc.colno})")
            continue
        raw = _record_to_raw(record, location, bad)
        if raw is not None:
            yield raw


def _read_parquet(path: str, bad: BadRecord) -> Iterator[RawDocument]:
    file = UPath(path)
    with file.open("rb") as fh:
        try:
            parquet = pq.ParquetFile(fh)
        except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
            raise InputError(str(file), f"not a readable Parquet file ({exc})") from exc
        names = set(parquet.schema_arrow.names)
        id_col = "id" if "id" in names else "_id" if "_id" in names else None
        if id_col is None or "text" not in names:
            raise InputError(str(file), f"needs columns id (or _id) and text; it has {sorted(names)}")
        columns = [id_col, "text", *(["title"] if "title" in names else [])]
        row = 0
        for batch in parquet.iter_batches(columns=columns, batch_size=4096):
            for record in batch.to_pylist():
                location = f"{file}: row {row}"
                row += 1
                record["id"] = record.pop(id_col)
                raw = _record_to_raw(record, location, bad)
                if raw is not None:
                    yield raw


def _read_beir(path: str, bad: BadRecord) -> Iterator[RawDocument]:
    root = UPath(path)
    corpus = root / "corpus.jsonl"
    if not corpus.exists():
        corpus = root / "corpus.jsonl.gz"
    yield from _read_jsonl(str(corpus), bad)


_RAW_READERS: dict[str, Callable[[str, BadRecord], Iterable[RawDocument]]] = {
    "stdlib": _read_stdlib,
    "files": _read_files,
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
    "beir": _read_beir,
}


def source_fingerprint(kind: SourceKind, path: str) -> str:
    """sha256 over the raw bytes a source would be read from: changes exactly when its content does."""
    import hashlib
    import sys

    digest = hashlib.sha256(f"{kind}\x00".encode())
    if kind == "stdlib":
        root = UPath(sysconfig.get_paths()["stdlib"]) if path in ("", "stdlib") else UPath(path)
        digest.update(sys.version.encode())
        files = [(f.relative_to(root).as_posix(), f) for f in _walk_python_files(root)]
    elif kind == "files":
        root = UPath(path)
        files = sorted(((p.relative_to(root).as_posix(), p) for p in root.rglob("*")
                        if p.is_file() and p.name.lower().endswith(TEXT_SUFFIXES)), key=lambda t: t[0])
    elif kind == "beir":
        root = UPath(path)
        corpus = root / "corpus.jsonl"
        corpus = corpus if corpus.exists() else root / "corpus.jsonl.gz"
        files = [(corpus.name, corpus)]
    else:
        files = [(UPath(path).name, UPath(path))]
    for rel, file in files:
        digest.update(rel.encode() + b"\x00")
        try:
            with file.open("rb") as fh:
                while block := fh.read(1 << 20):
                    digest.update(block)
        except FileNotFoundError as exc:
            raise InputError(str(file), "no such file") from exc
        digest.update(b"\x00")
    return digest.hexdigest()
