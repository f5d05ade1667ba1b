"""`quiver source`: register, list and remove sources, each a partition of the document stages (and, with judged
queries, of retrieval_eval)."""

import argparse
import sys

from quiver.names import CHUNKING_STRATEGIES, DEFAULT_CHUNKING, SOURCE_KINDS
from quiver.tables import aligned


def cmd_source(args: argparse.Namespace) -> int:
    from platform_defs.resources import build_resources
    from platform_defs.runs import add_partition, remove_partition
    from quiver.beir import is_judged

    registry = build_resources(resolve_env=True)["sources"]
    if args.action == "add":
        spec = registry.add(args.name, args.path, args.kind, args.chunking)
        judged = spec.kind == "beir" and is_judged(spec.path)
        add_partition(spec.name, judged=judged)
        print(f"added source {spec.name!r}: {spec.kind} at {spec.path}")
        if judged:
            print(f"it has judged queries: `quiver eval {spec.path}` evaluates retrieval on it")
        return 0
    if args.action == "remove":
        if not registry.remove(args.name):
            known = ", ".join(s.name for s in registry.all()) or "none"
            print(f"quiver: no source {args.name!r} to remove (sources: {known})", file=sys.stderr)
            return 1
        remove_partition(args.name)
        print(f"removed source {args.name!r}; run `quiver run` to drop its vectors from FAISS and Milvus")
        return 0
    specs = registry.all()
    if not specs:
        print("no sources yet: `quiver source add NAME PATH` adds one; `quiver run` registers the default corpus "
              "(stdlib) when there is none")
        return 0
    rows = [[s.name, s.kind, s.chunking, "yes" if s.kind == "beir" and is_judged(s.path) else "no", s.path]
            for s in specs]
    print(aligned(["name", "kind", "chunking", "judged queries", "path"], rows))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    source = sub.add_parser("source", help="add, list or remove sources (each a partition of the ingest assets)")
    source_sub = source.add_subparsers(dest="action", required=True, metavar="{add,list,remove}")
    add = source_sub.add_parser("add", help="register a directory of .md/.txt/.rst files, a JSONL or Parquet file, "
                                "or a BEIR directory")
    add.add_argument("name", help="the source's name and partition key: letters, digits, '_', '.', '-'")
    add.add_argument("path", help="where to read it from: a directory, a .jsonl[.gz]/.parquet file, or 'stdlib'")
    add.add_argument("--kind", choices=SOURCE_KINDS, help="the reader to use (default: detected from the path)")
    add.add_argument("--chunking", choices=CHUNKING_STRATEGIES, default=DEFAULT_CHUNKING,
                     help="tokens: windows that fit the model (default); whole_document: one chunk per document, "
                          "truncated by the model, as MTEB encodes BEIR corpora")
    source_sub.add_parser("list", help="the registered sources: name, kind, chunking strategy, whether they have "
                          "judged queries (retrieval_eval), path")
    remove = source_sub.add_parser("remove", help="unregister a source; the next `quiver run` deletes its vectors "
                                   "from FAISS and Milvus")
    remove.add_argument("name", help="the source to remove (see `quiver source list`)")
    source.set_defaults(func=cmd_source)
