"""What one step of each memory class holds, computed from what it will hold, each with its formula.

`base` is the peak RSS of a step process that has imported what every step imports (the definitions, which
the forkserver preloads), measured; `model_peak` that of one which also loaded the model and encoded one full
batch at the model's window, measured. The rest is what the step's settings and the data make it hold: the
in-process embedding cache's bound, the items in flight between the embed-and-insert stages, the Milvus Lite
engine running in the step's own process, and, for the index steps, the vectors themselves.
"""

from dataclasses import dataclass

MiB = 2**20
# Bytes a text in flight costs besides its vector: its string, token ids and attention mask, Arrow and Python
# objects around them (a 256-token chunk).
TEXT_IN_FLIGHT = 8 * 1024
# Python bookkeeping of one vector in an index step: {id: key} of the store and of the inputs, the diff.
BOOKKEEPING_PER_VECTOR = 400
PAYLOAD_PER_VECTOR = 600  # the payload row beside each vector (ids, source, title and text snippet), as Arrow


@dataclass(frozen=True)
class Need:
    bytes: int
    formula: str  # how it was computed, with the figures, for `quiver limits`


def _mib(n: float) -> str:
    return f"{n / MiB:.0f} MiB"


def model_need(model_peak: int, l1_max_bytes: int, stages: int, queue_maxsize: int, texts_per_item: int,
               dimension: int, lite_vectors: int | None) -> Need:
    """An embedding step: the measured model process, its L1 cache at its bound, the items its queues may
    hold, and, when Milvus Lite runs in the step's process, the engine's copy of the collection."""
    in_flight = stages * (queue_maxsize + 1) * texts_per_item * (2 * 4 * dimension + TEXT_IN_FLIGHT)
    lite = (lite_vectors or 0) * (4 * dimension + PAYLOAD_PER_VECTOR)
    formula = (f"model process {_mib(model_peak)} + L1 cache bound {_mib(l1_max_bytes)} + in flight "
               f"{stages} stages x {queue_maxsize + 1} items x {texts_per_item} texts x (2 x {dimension} x 4 B + "
               f"{TEXT_IN_FLIGHT // 1024} KiB) = {_mib(in_flight)}")
    if lite_vectors is not None:
        formula += (f" + Milvus Lite in the step {lite_vectors} vectors x ({dimension} x 4 B + "
                    f"{PAYLOAD_PER_VECTOR} B) = {_mib(lite)}")
    return Need(model_peak + l1_max_bytes + in_flight + lite, formula)


def index_need(base: int, vectors: int, dimension: int, index_type: str, hnsw_m: int = 32) -> Need:
    """An index step (faiss_index, milvus_collection, their checks): the base process, the index of every
    current vector, the rebuild's second copy (an IVF trains on all vectors at once; a rebuild streams
    batches while the index grows), the HNSW graph, the payload and the bookkeeping of the diff."""
    vector_bytes = 4 * dimension
    graph = 2 * hnsw_m * 4 if index_type == "hnsw" else 0
    per_vector = 2 * vector_bytes + graph + PAYLOAD_PER_VECTOR + BOOKKEEPING_PER_VECTOR
    formula = (f"step process {_mib(base)} + {vectors} vectors x (2 x {dimension} x 4 B"
               + (f" + HNSW {graph} B" if graph else "")
               + f" + payload {PAYLOAD_PER_VECTOR} B + bookkeeping {BOOKKEEPING_PER_VECTOR} B) = "
               f"{_mib(vectors * per_vector)} ({index_type})")
    return Need(base + vectors * per_vector, formula)


def light_need(base: int, docs_per_batch: int, max_document_bytes: int = 64 * 1024, reused_bytes: int = 0) -> Need:
    """A chunking or evaluation-check step: the base process, a batch of documents with their chunks, and the
    previous chunks (and documents) held to take unchanged documents' rows from."""
    batch = docs_per_batch * max_document_bytes * 4  # the text, its tokens and offsets, the chunks made of it
    return Need(base + batch + reused_bytes,
                f"step process {_mib(base)} + {docs_per_batch} documents x {max_document_bytes // 1024} KiB x 4 = "
                f"{_mib(batch)}" + (f" + previous chunks held {_mib(reused_bytes)}" if reused_bytes else ""))
