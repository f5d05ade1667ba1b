"""FAISS index construction: exact inner product by default, IVF or HNSW when asked or when large."""

import math
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np

IndexType = Literal["auto", "flat", "ivf", "hnsw"]


@dataclass(frozen=True)
class IndexSettings:
    index_type: IndexType = "auto"
    auto_approximate_above: int = 200_000  # "auto" stays exact below this many vectors
    auto_approximate_type: Literal["ivf", "hnsw"] = "hnsw"
    ivf_nlist: int | None = None  # default: min(4 * sqrt(n), n // 39): FAISS trains on 39 points a list
    ivf_nprobe: int = 16
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 128


def choose_index_type(settings: IndexSettings, n_vectors: int) -> Literal["flat", "ivf", "hnsw"]:
    if settings.index_type != "auto":
        return settings.index_type
    return settings.auto_approximate_type if n_vectors > settings.auto_approximate_above else "flat"


def supports_removal(kind: str) -> bool:
    """Whether vectors can be removed in place: FAISS's HNSW graph cannot drop a node."""
    return kind in ("flat", "ivf")


def ivf_nlist(settings: IndexSettings, n: int) -> int:
    return settings.ivf_nlist or max(1, min(int(4 * math.sqrt(max(n, 1))), max(n // 39, 1)))


def empty_index(kind: str, dim: int, settings: IndexSettings, n: int = 0) -> faiss.Index:
    """An id-mapped inner-product index of the given type, with nothing in it (IVF: still to be trained
    on about n vectors)."""
    if kind == "flat":
        base: faiss.Index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        base = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = settings.hnsw_ef_construction
        base.hnsw.efSearch = settings.hnsw_ef_search
    else:
        nlist = ivf_nlist(settings, n)
        base = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        base.nprobe = min(settings.ivf_nprobe, nlist)
    return faiss.IndexIDMap2(base)


def build_index(vectors: np.ndarray, ids: np.ndarray, settings: IndexSettings) -> tuple[faiss.Index, str]:
    """An id-mapped inner-product index over normalized vectors, and the type that was chosen."""
    n, dim = vectors.shape
    kind = choose_index_type(settings, n)
    index = empty_index(kind, dim, settings, n)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if n:
        if kind == "ivf":
            index.train(vectors)
        index.add_with_ids(vectors, ids.astype(np.int64))
    return index, kind


def vectors_by_id(index: faiss.Index, ids: np.ndarray) -> np.ndarray:
    """The stored vectors of an id-mapped index under the given ids (flat, HNSW and IVF alike)."""
    base = faiss.downcast_index(index.index)
    if isinstance(base, faiss.IndexIVF):
        base.make_direct_map()
    out = np.empty((len(ids), index.d), dtype=np.float32)
    for row, vid in enumerate(ids.tolist()):
        out[row] = index.reconstruct(int(vid))
    return out


def search_index(index: faiss.Index, queries: np.ndarray, k: int,
                 only_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, vector ids) of the k nearest vectors, among only_ids when given; ids of -1 pad when fewer
    vectors qualify."""
    limit = index.ntotal if only_ids is None else min(index.ntotal, len(only_ids))
    k = max(1, min(k, limit)) if limit else 1
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if only_ids is None:
        return index.search(queries, k)
    selector = faiss.IDSelectorBatch(np.ascontiguousarray(only_ids, dtype=np.int64))
    return index.search(queries, k, params=_search_parameters(index, selector))


def _search_parameters(index: faiss.Index, selector: faiss.IDSelector) -> faiss.SearchParameters:
    """Search parameters of the type the index (inside its id map) expects, keeping its own settings."""
    base = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2) else index
    if isinstance(base, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=base.hnsw.efSearch)
    if isinstance(base, faiss.IndexIVF):
        return faiss.SearchParametersIVF(sel=selector, nprobe=base.nprobe)
    return faiss.SearchParameters(sel=selector)


def index_details(index: faiss.Index) -> dict[str, int | str]:
    """What a built index is, as a reader compares two of them: its type and the parameters that decide
    its recall and speed (a manifest keeps this, so a cache hit can say it without reading the index)."""
    base = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2) else index
    if isinstance(base, faiss.IndexHNSW):
        return {"type": "hnsw", "M": int(base.hnsw.nb_neighbors(1)),  # level 0 holds 2M
                "efConstruction": int(base.hnsw.efConstruction), "efSearch": int(base.hnsw.efSearch)}
    if isinstance(base, faiss.IndexIVF):
        return {"type": "ivf", "nlist": int(base.nlist), "nprobe": int(base.nprobe)}
    return {"type": "flat"}


def details_text(details: dict[str, int | str]) -> str:
    """'flat (exact inner product)', 'HNSW (M 32, efConstruction 200, efSearch 128)', 'IVF (132 lists, 16 probed)'."""
    kind = details.get("type")
    if kind == "hnsw":
        return f"HNSW (M {details['M']}, efConstruction {details['efConstruction']}, efSearch {details['efSearch']})"
    if kind == "ivf":
        return f"IVF ({details['nlist']} lists, {details['nprobe']} probed)"
    return "flat (exact inner product)"
