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


def test_no_chunk_exceeds_the_window_whatever_the_title(tokenizer) -> None:  # noqa: ANN001
    body = " ".join(f"sentence {i} about tokenization, windows and overlapping chunks" for i in range(200))
    docs = [(f"d{n}", " ".join(f"Heading{w}" for w in range(n)), body) for n in range(0, 151, 5)]
    for chunk_tokens in (256, 64):
        settings = ChunkSettings(chunk_tokens=chunk_tokens, overlap_tokens=8)
        chunks = chunk_documents(tokenizer, docs, settings)
        assert {c.doc_id for c in chunks} == {d for d, _, _ in docs}
        for c in chunks:
            seen = len(tokenizer(c.text)["input_ids"])  # the model tokenizer, special tokens included
            assert seen == c.n_tokens <= chunk_tokens, (c.chunk_id, seen, c.n_tokens)
            title = next(t for d, t, _ in docs if d == c.doc_id)
            prefix = c.text[: c.text.index("\n")] if title else ""
            assert title.startswith(prefix)  # the title is cut (between words), never rewritten
            assert len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) <= settings.max_title_tokens
        long_title = [c for c in chunks if c.doc_id == "d150"]
        untitled = [c for c in chunks if c.doc_id == "d0"]
        assert len(long_title) <= 3 * len(untitled)  # the overlap shrinks with the budget: never one token a step
        assert long_title[0].text.startswith("Heading0 Heading1")
        covered = "".join(body[c.start_char:c.end_char] for c in long_title)
        assert long_title[-1].end_char == len(body) and len(covered) >= len(body)  # the whole body is kept


def test_chunks_larger_than_the_model_window_are_refused(quiver_home, instance, resources,  # noqa: ANN001
                                                         tmp_path) -> None:  # noqa: ANN001
    from tests.helpers import add_source, ingest, scifact_docs, write_jsonl

    add_source(instance, resources, "wide", write_jsonl(tmp_path / "wide.jsonl", scifact_docs(2)))
    result = ingest(instance, resources, "wide", {"ops": {"chunks": {"config": {"chunk_tokens": 512}}}},
                    raise_on_error=False)
    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    message = failure.step_failure_data.error.message
    assert "chunk_tokens=512 is more than the model reads (256 tokens" in message


def _chunk_run(instance, resources, source: str, run_config=None, assets=None):  # noqa: ANN001, ANN202
    """documents and chunks of one source in a real run: the chunks' metadata and the output's FileRef."""
    from dagster import materialize

    from platform_defs.definitions import ALL_ASSETS
    from tests.helpers import metadata

    result = materialize(assets or ALL_ASSETS, instance=instance, resources=resources, partition_key=source,
                         selection=["documents", "chunks"], run_config=run_config or {})
    return metadata(result, "chunks"), resources["store"].read_latest(["chunks"], source)


def test_only_changed_documents_are_chunked_again_into_the_same_output(quiver_home, instance, resources,  # noqa: ANN001
                                                                         tmp_path) -> None:  # noqa: ANN001
    from tests.helpers import add_source, scifact_docs, write_jsonl

    docs = scifact_docs(8)
    path = write_jsonl(tmp_path / "s.jsonl", docs)
    add_source(instance, resources, "s", path)
    first, _ = _chunk_run(instance, resources, "s")
    assert (first["documents_chunked"], first["documents_unchanged"]) == (8, 0)
    # The first document edited, the second deleted, one added at the end; the other six unchanged.
    write_jsonl(path, [{**docs[0], "text": docs[0]["text"] + " Revised."}, *docs[2:], *scifact_docs(1, 8)])
    second, ref = _chunk_run(instance, resources, "s")
    assert (second["documents_chunked"], second["documents_unchanged"]) == (2, 6)
    # Chunking every document again writes the very same file, byte for byte.
    forced, forced_ref = _chunk_run(instance, resources, "s", {"ops": {"chunks": {"config": {"force": True}}}})
    assert (forced["documents_chunked"], forced["documents_unchanged"]) == (8, 0)
    assert forced_ref.sha256 == ref.sha256 and forced_ref.rows == ref.rows == second["chunks"]


def _chunked_then_first_revised(instance, resources, tmp_path, count: int):  # noqa: ANN001, ANN202
    """A source "s" of `count` SciFact documents, chunked once, then its first document's text revised on disk."""
    from tests.helpers import add_source, scifact_docs, write_jsonl

    docs = scifact_docs(count)
    path = write_jsonl(tmp_path / "s.jsonl", docs)
    add_source(instance, resources, "s", path)
    _chunk_run(instance, resources, "s")
    write_jsonl(path, [{**docs[0], "text": docs[0]["text"] + " Revised."}, *docs[1:]])
    return docs, path


def test_other_chunker_code_or_settings_chunk_every_document_again(quiver_home, instance, resources,  # noqa: ANN001
                                                                   tmp_path) -> None:  # noqa: ANN001
    from platform_defs.definitions import ALL_ASSETS
    from tests.helpers import write_jsonl

    docs, path = _chunked_then_first_revised(instance, resources, tmp_path, 5)
    # The chunker's code changed: its code version (and cache keys) with it, so no previous row is taken.
    edited = [a.map_asset_specs(lambda spec: spec.replace_attributes(code_version="edited-chunker")
                                if spec.key.path[-1] == "chunks" else spec) for a in ALL_ASSETS]
    changed_code, _ = _chunk_run(instance, resources, "s", assets=edited)
    assert (changed_code["documents_chunked"], changed_code["documents_unchanged"]) == (5, 0)
    other_overlap, _ = _chunk_run(instance, resources, "s", {"ops": {"chunks": {"config": {"overlap_tokens": 16}}}})
    assert (other_overlap["documents_chunked"], other_overlap["documents_unchanged"]) == (5, 0)
    # The same code and settings as the last run: only the document edited since is chunked again.
    write_jsonl(path, [{**docs[0], "text": docs[0]["text"] + " Revised."}, {**docs[1], "title": "Retitled"},
                       *docs[2:]])
    again, _ = _chunk_run(instance, resources, "s", {"ops": {"chunks": {"config": {"overlap_tokens": 16}}}})
    assert (again["documents_chunked"], again["documents_unchanged"]) == (1, 4)


def test_a_previous_output_too_large_to_hold_is_not_read(quiver_home, instance, resources, tmp_path,  # noqa: ANN001
                                                         monkeypatch) -> None:  # noqa: ANN001
    import assets.chunks

    _chunked_then_first_revised(instance, resources, tmp_path, 4)
    monkeypatch.setattr(assets.chunks, "REUSE_MAX_FILE_BYTES", 1)  # the memory bound: nothing held, all chunked
    bounded, _ = _chunk_run(instance, resources, "s")
    assert (bounded["documents_chunked"], bounded["documents_unchanged"]) == (4, 0)
