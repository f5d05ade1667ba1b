"""Token-aware chunking with the embedding model's own tokenizer.

Windows end on word boundaries so a chunk never starts or ends inside a word piece, and each chunk
is prefixed with its document's title, which is counted in the token budget.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from quiver.hashing import chunk_id, sha256_text
from quiver.names import CHUNKING_STRATEGIES, DEFAULT_CHUNKING, ChunkingStrategy


class Tokenizer(Protocol):
    def __call__(self, texts: list[str], **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class ChunkSettings:
    strategy: ChunkingStrategy = DEFAULT_CHUNKING
    # Total tokens of one chunk including the title prefix and the special tokens the model adds; at most the
    # model's window (the chunks stage passes the window when the user sets nothing).
    chunk_tokens: int = 256
    overlap_tokens: int = 32
    include_title: bool = True
    max_title_tokens: int = 32
    special_tokens: int = 2  # [CLS] and [SEP]

    def __post_init__(self) -> None:
        if self.strategy not in CHUNKING_STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}: use one of {', '.join(CHUNKING_STRATEGIES)}")
        if self.chunk_tokens <= self.special_tokens + self.max_title_tokens + 8:
            raise ValueError(f"chunk_tokens={self.chunk_tokens} leaves no room for text")
        if not 0 <= self.overlap_tokens < self.chunk_tokens // 2:
            raise ValueError(f"overlap_tokens={self.overlap_tokens} must be in [0, chunk_tokens/2)")


@dataclass(frozen=True)
class Chunk:
    chunk_id: str
    doc_id: str
    position: int
    title: str
    text: str  # the exact text that is embedded
    chunk_hash: str
    n_tokens: int  # tokens the model sees of text, special tokens included
    start_char: int
    end_char: int


def _windows(word_ids: Sequence[int | None], budget: int, overlap: int) -> Iterator[tuple[int, int]]:
    """[start, end) token windows of at most budget tokens, cut between words where possible."""
    n = len(word_ids)
    start = 0
    while start < n:
        end = min(start + budget, n)
        if end < n:
            cut = end
            while cut > start + 1 and word_ids[cut] is not None and word_ids[cut] == word_ids[cut - 1]:
                cut -= 1
            end = cut if cut > start + 1 else end
        yield start, end
        if end >= n:
            return
        nxt = max(end - overlap, start + 1)
        while nxt < end and word_ids[nxt] is not None and word_ids[nxt] == word_ids[nxt - 1]:
            nxt += 1
        start = nxt


def _title_prefix(title: str, offsets: Sequence[tuple[int, int]], word_ids: Sequence[int | None],
                  max_tokens: int) -> tuple[str, int]:
    """The title as it prefixes a chunk, and its tokens: whole when it fits `max_tokens`, else cut to them
    between words (inside a word only when its first word alone is longer), followed by a newline."""
    if not title:
        return "", 0
    if len(offsets) <= max_tokens:
        return f"{title}\n", len(offsets)
    cut = max_tokens
    while cut > 1 and word_ids[cut] is not None and word_ids[cut] == word_ids[cut - 1]:
        cut -= 1
    if cut == 1 and word_ids[1] is not None and word_ids[1] == word_ids[0]:
        cut = max_tokens
    return f"{title[:offsets[cut - 1][1]].rstrip()}\n", cut


def _token_counts(tokenizer: Tokenizer, texts: list[str]) -> list[int]:
    """Tokens the model sees of each text, special tokens included."""
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]]


@dataclass
class _Document:
    doc_id: str
    title: str
    text: str
    prefix: str
    offsets: Sequence[tuple[int, int]]
    word_ids: Sequence[int | None]
    budget: int

    def windows(self, overlap: int) -> tuple[list[tuple[int, int]], list[str]]:
        # A long title leaves a smaller body budget: the overlap never takes more than half of it, so each
        # window moves on by at least half a window.
        spans = [(self.offsets[start][0], self.offsets[end - 1][1])
                 for start, end in _windows(self.word_ids, self.budget, min(overlap, self.budget // 2))]
        return spans, [self.prefix + self.text[a:b] for a, b in spans]


def chunk_documents(
    tokenizer: Tokenizer,
    docs: Sequence[tuple[str, str, str]],
    settings: ChunkSettings,
) -> list[Chunk]:
    """Chunks of (doc_id, title, text) documents, tokenized in batches.

    Every chunk, title prefix and special tokens included, is measured with the tokenizer once made: a
    window whose joined text tokenizes longer than its parts (some tokenizers merge across the newline) is
    re-cut smaller, so no chunk ever exceeds `chunk_tokens`.
    """
    if not docs:
        return []
    if settings.strategy == "whole_document":
        return whole_document_chunks(tokenizer, docs, settings)
    bodies = tokenizer([text for _, _, text in docs], add_special_tokens=False,
                       return_offsets_mapping=True, truncation=False)
    titles = tokenizer([title if settings.include_title else "" for _, title, _ in docs], add_special_tokens=False,
                       return_offsets_mapping=True, truncation=False)
    prepared = []
    for i, (doc_id, title, text) in enumerate(docs):
        prefix, prefix_tokens = (_title_prefix(title, titles["offset_mapping"][i], titles.word_ids(i),
                                               settings.max_title_tokens) if settings.include_title else ("", 0))
        prepared.append(_Document(doc_id, title, text, prefix, bodies["offset_mapping"][i], bodies.word_ids(i),
                                  settings.chunk_tokens - settings.special_tokens - prefix_tokens))
    windows = [doc.windows(settings.overlap_tokens) for doc in prepared]
    counts = iter(_token_counts(tokenizer, [text for _, texts in windows for text in texts]))
    chunks: list[Chunk] = []
    for doc, (spans, texts) in zip(prepared, windows, strict=True):
        measured = [next(counts) for _ in texts]
        while measured and max(measured) > settings.chunk_tokens and doc.budget > 1:
            doc.budget = max(1, doc.budget - (max(measured) - settings.chunk_tokens))
            spans, texts = doc.windows(settings.overlap_tokens)
            measured = _token_counts(tokenizer, texts)
        chunks += [Chunk(chunk_id=chunk_id(doc.doc_id, position), doc_id=doc.doc_id, position=position,
                         title=doc.title, text=embedded, chunk_hash=sha256_text(embedded), n_tokens=n,
                         start_char=a, end_char=b)
                   for position, ((a, b), embedded, n) in enumerate(zip(spans, texts, measured, strict=True))]
    return chunks


def whole_document_chunks(tokenizer: Tokenizer, docs: Sequence[tuple[str, str, str]],
                          settings: ChunkSettings) -> list[Chunk]:
    """One chunk per document; n_tokens is the document's full length, which may exceed the model's window."""
    texts = [f"{title} {text}" if title and settings.include_title else text for _, title, text in docs]
    lengths = tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
    return [
        Chunk(chunk_id=chunk_id(doc_id, 0), doc_id=doc_id, position=0, title=title, text=embedded,
              chunk_hash=sha256_text(embedded), n_tokens=len(ids), start_char=0, end_char=len(text))
        for (doc_id, title, text), embedded, ids in zip(docs, texts, lengths, strict=True)
    ]
