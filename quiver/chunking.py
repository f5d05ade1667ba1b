"""Token-aware chunking with the embedding model's own tokenizer.

Windows end on word boundaries so a chunk never starts or ends inside a word piece, and each chunk
is prefixed with its document's title, which is counted in the token budget.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from quiver.hashing import chunk_id, sha256_text


class Tokenizer(Protocol):
    def __call__(self, texts: list[str], **kwargs: Any) -> Any: ...


Strategy = Literal["tokens", "whole_document"]
STRATEGIES: tuple[str, ...] = ("tokens", "whole_document")


@dataclass(frozen=True)
class ChunkSettings:
    # tokens: windows that fit the model. whole_document: one chunk per document, title + " " + text, left
    # for the model to truncate, as MTEB encodes BEIR corpora (to reproduce published figures).
    strategy: Strategy = "tokens"
    # Total tokens of one chunk including the special tokens the model adds: 256 fits all-MiniLM-L6-v2.
    chunk_tokens: int = 256
    overlap_tokens: int = 32
    include_title: bool = True
    max_title_tokens: int = 32
    special_tokens: int = 2  # [CLS] and [SEP]

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}: use one of {', '.join(STRATEGIES)}")
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
    n_tokens: int
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


def chunk_documents(
    tokenizer: Tokenizer,
    docs: Sequence[tuple[str, str, str]],
    settings: ChunkSettings,
) -> list[Chunk]:
    """Chunks of (doc_id, title, text) documents; tokenizes the whole batch in one call."""
    if not docs:
        return []
    if settings.strategy == "whole_document":
        return whole_document_chunks(tokenizer, docs, settings)
    bodies = tokenizer([text for _, _, text in docs], add_special_tokens=False,
                       return_offsets_mapping=True, truncation=False)
    titles = tokenizer([title for _, title, _ in docs], add_special_tokens=False, truncation=False)
    chunks: list[Chunk] = []
    for i, (doc_id, title, text) in enumerate(docs):
        offsets = bodies["offset_mapping"][i]
        word_ids = bodies.word_ids(i)
        title_tokens = min(len(titles["input_ids"][i]), settings.max_title_tokens) if settings.include_title else 0
        prefix_tokens = title_tokens + 1 if title and settings.include_title else 0
        budget = settings.chunk_tokens - settings.special_tokens - prefix_tokens
        prefix = f"{title}\n" if title and settings.include_title else ""
        for position, (start, end) in enumerate(_windows(word_ids, budget, settings.overlap_tokens)):
            start_char, end_char = offsets[start][0], offsets[end - 1][1]
            body = text[start_char:end_char]
            embedded = prefix + body
            chunks.append(Chunk(
                chunk_id=chunk_id(doc_id, position),
                doc_id=doc_id,
                position=position,
                title=title,
                text=embedded,
                chunk_hash=sha256_text(embedded),
                n_tokens=end - start + prefix_tokens,
                start_char=start_char,
                end_char=end_char,
            ))
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
