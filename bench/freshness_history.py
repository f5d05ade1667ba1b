"""The deterministic edit history bench/freshness.py replays: 300 Markdown documents made from the standard
library's docstrings, then cycles of edits, shortenings, deletions and additions, and the exactness of both
stores against the documents that exist now."""

import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quiver.sources import read_documents

SEED = 16
WORDS = ("index", "vector", "fresh", "update", "query", "exact", "source", "chunk", "model", "batch")


def stdlib_texts(skip: int = 0) -> Iterator[tuple[str, str]]:
    """(title, text) of standard-library docstrings long enough to be a document, in a stable order."""
    for doc in read_documents("stdlib", sysconfig.get_paths()["stdlib"]):
        if len(doc.text) >= 300:
            yield doc.title, doc.text


@dataclass
class History:
    """A directory of `doc_NNNN.md` files and the content the benchmark knows each one has."""

    directory: Path
    documents: int = 300
    rng: random.Random = field(default_factory=lambda: random.Random(SEED))
    current: dict[str, str] = field(default_factory=dict)  # file name -> content
    _reserve: Iterator[tuple[str, str]] | None = None
    _next_id: int = 0

    def create(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._reserve = stdlib_texts()
        for _ in range(self.documents):
            self._add()

    def _add(self) -> str:
        assert self._reserve is not None
        title, text = next(self._reserve)
        name = f"doc_{self._next_id:04d}.md"
        self._next_id += 1
        self._write(name, f"# {title}\n\n{text}\n")
        return name

    def _write(self, name: str, content: str) -> None:
        tmp = self.directory / f".{name}.tmp"  # not a .md file: never read half-written
        tmp.write_text(content, encoding="utf-8")
        tmp.replace(self.directory / name)
        self.current[name] = content

    def cycle(self, edited: int = 10, deleted: int = 3, added: int = 3) -> dict[str, int]:
        """One cycle: `edited` documents changed (every third one shortened to its first half instead),
        `deleted` removed, `added` new ones."""
        names = sorted(self.current)
        touched = self.rng.sample(names, edited + deleted)
        shortened = 0
        for i, name in enumerate(touched[:edited]):
            content = self.current[name]
            if i % 3 == 2:
                content = content[: max(80, len(content) // 2)].rstrip() + "\n"
                shortened += 1
            else:
                content = content.rstrip() + f"\n\nRevised: {' '.join(self.rng.choices(WORDS, k=12))}.\n"
            self._write(name, content)
        for name in touched[edited:]:
            (self.directory / name).unlink()
            del self.current[name]
        for _ in range(added):
            self._add()
        return {"edited": edited - shortened, "shortened": shortened, "deleted": deleted, "added": added}

    def doc_ids(self) -> set[str]:
        return set(self.current)


def exactness(resources: dict[str, Any], source: str, doc_ids: set[str]) -> dict[str, Any]:
    """Both stores against the current chunks of `source` (and the documents the benchmark knows exist):
    vectors held, missing, stale (of no current chunk), outdated (an older content of a current chunk) and
    duplicate, and documents absent or left over."""
    import faiss

    from quiver.hashing import vector_id, vector_key

    store = resources["store"]
    fingerprint = resources["model_pool"].fingerprint()
    chunks = store.read_table(store.read_latest(["chunks"], source), columns=["chunk_id", "doc_id", "chunk_hash"])
    expected = {vector_id(source, c): vector_key(fingerprint, h)
                for c, h in zip(chunks.column("chunk_id").to_pylist(), chunks.column("chunk_hash").to_pylist(),
                                strict=True)}
    chunk_docs = set(chunks.column("doc_id").to_pylist())
    version = resources["faiss_store"].open_current()
    faiss_ids = [int(v) for v in faiss.vector_to_array(version.index.id_map)]
    faiss_keys = dict(zip(version.payload.column("vector_id").to_pylist(),
                          version.payload.column("vector_key").to_pylist(), strict=True))
    milvus = resources["milvus"]
    rows = milvus.loaded_client().query(milvus.collection, filter=f'source == "{source}"',
                                        output_fields=["id", "vector_key"])
    milvus.release()
    report = {"documents_missing": len(doc_ids - chunk_docs), "documents_left_over": len(chunk_docs - doc_ids)}
    for name, pairs in (("faiss", [(i, faiss_keys.get(i)) for i in faiss_ids]),
                        ("milvus", [(int(r["id"]), r["vector_key"]) for r in rows])):
        held = dict(pairs)
        report[name] = {
            "held": len(pairs), "duplicate": len(pairs) - len(held),
            "missing": sum(1 for i in expected if i not in held),
            "stale": sum(1 for i in held if i not in expected),
            "outdated": sum(1 for i, k in held.items() if i in expected and expected[i] != k)}
    report["exact"] = (report["documents_missing"] == report["documents_left_over"] == 0 and all(
        report[s]["held"] == len(expected) and not any(report[s][k] for k in ("duplicate", "missing", "stale",
                                                                              "outdated"))
        for s in ("faiss", "milvus")))
    return report
