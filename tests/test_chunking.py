"""Chunking with the real model tokenizer."""

import pytest

from quiver.chunking import ChunkSettings, chunk_documents
from resources.model_pool import ModelPool


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201
    return ModelPool().tokenizer()


def test_short_document_is_one_chunk_with_title(tokenizer) -> None:  # noqa: ANN001
    [chunk] = chunk_documents(tokenizer, [("doc-1", "Title", "A short body.")], ChunkSettings())
    assert chunk.chunk_id == "doc-1#0"
    assert chunk.text == "Title\nA short body."
    assert (chunk.start_char, chunk.end_char) == (0, len("A short body."))


def test_long_document_fits_window_overlaps_and_is_stable(tokenizer) -> None:  # noqa: ANN001
    body = " ".join(f"word{i} is followed by unbelievably tokenizable content" for i in range(300))
    settings = ChunkSettings(chunk_tokens=128, overlap_tokens=16)
    chunks = chunk_documents(tokenizer, [("long", "Long doc", body)], settings)
    assert len(chunks) > 5
    assert [c.chunk_id for c in chunks] == [f"long#{i}" for i in range(len(chunks))]
    for c in chunks:
        assert len(tokenizer(c.text)["input_ids"]) <= 128  # special tokens included
        assert c.text.startswith("Long doc\n")
        # windows end between words: never inside "unbelievably"
        assert body[c.start_char - 1: c.start_char] in ("", " ")
        assert body[c.end_char: c.end_char + 1] in ("", " ")
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert b.start_char < a.end_char  # overlap
    assert chunks[-1].end_char == len(body)
    again = chunk_documents(tokenizer, [("long", "Long doc", body)], settings)
    assert [c.chunk_hash for c in again] == [c.chunk_hash for c in chunks]


def test_default_fits_the_model_window(tokenizer) -> None:  # noqa: ANN001
    body = "lorem ipsum dolor sit amet " * 400
    chunks = chunk_documents(tokenizer, [("d", "", body)], ChunkSettings())
    assert max(len(tokenizer(c.text)["input_ids"]) for c in chunks) <= 256
    assert max(len(tokenizer(c.text)["input_ids"]) for c in chunks) >= 240


def test_invalid_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="overlap_tokens"):
        ChunkSettings(chunk_tokens=128, overlap_tokens=64)
    with pytest.raises(ValueError, match="leaves no room"):
        ChunkSettings(chunk_tokens=40)
