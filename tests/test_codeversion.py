"""Code versions change exactly when a stage's code (or the logic it imports) changes."""

import shutil
from pathlib import Path

import pytest

from assets.common import STAGE_UPSTREAM, stage_code_version
from quiver.codeversion import module_dependencies, stage_version
from tests.conftest import PROJECT

STAGES = ["assets.documents", "assets.chunks", "assets.embeddings", "assets.faiss_index", "assets.milvus_collection",
          "assets.retrieval_eval"]


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    for package in ("quiver", "assets", "resources"):
        shutil.copytree(PROJECT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _versions(root: Path) -> dict[str, str]:
    return {stage: stage_version(stage, STAGE_UPSTREAM, root) for stage in STAGES}


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_assets_carry_their_computed_code_version() -> None:
    from platform_defs import defs

    graph = defs.resolve_asset_graph()
    for stage in STAGES:
        key = stage.split(".")[1]
        assert graph.get(__import__("dagster").AssetKey(key)).code_version == stage_code_version(stage)


def test_dependencies_are_the_logic_modules_imported() -> None:
    assert module_dependencies("assets.chunks") == ["assets.chunks", "assets.common", "quiver.chunking",
                                                    "quiver.hashing"]
    assert "quiver.sources" in module_dependencies("assets.documents")
    assert "quiver.chunking" not in module_dependencies("assets.embeddings")


DOWNSTREAM_OF_CHUNKS = {"assets.chunks", "assets.embeddings", "assets.faiss_index", "assets.milvus_collection",
                        "assets.retrieval_eval"}


def test_editing_the_chunker_changes_chunks_and_downstream_only(project_copy: Path) -> None:
    before = _versions(project_copy)
    assert _versions(project_copy) == before  # deterministic
    _edit(project_copy / "quiver" / "chunking.py", "overlap_tokens: int = 32", "overlap_tokens: int = 48")
    after = _versions(project_copy)
    assert {s for s in STAGES if after[s] != before[s]} == DOWNSTREAM_OF_CHUNKS


def test_editing_a_stage_module_changes_that_stage_and_downstream_only(project_copy: Path) -> None:
    before = _versions(project_copy)
    _edit(project_copy / "assets" / "embeddings.py", "texts_per_batch: int = Field(default=256",
          "texts_per_batch: int = Field(default=128")
    after = _versions(project_copy)
    assert {s for s in STAGES if after[s] != before[s]} == {"assets.embeddings", "assets.faiss_index",
                                                           "assets.milvus_collection", "assets.retrieval_eval"}
    _edit(project_copy / "assets" / "faiss_index.py", "class FaissIndexConfig(Config):",
          "class FaissIndexConfig(Config):  # edited")
    again = _versions(project_copy)
    assert {s for s in STAGES if again[s] != after[s]} == {"assets.faiss_index", "assets.retrieval_eval"}


def test_shared_hashing_change_changes_every_stage_that_uses_it(project_copy: Path) -> None:
    before = _versions(project_copy)
    _edit(project_copy / "quiver" / "hashing.py", 'return f"{doc_id}#{position}"', 'return f"{doc_id}:{position}"')
    after = _versions(project_copy)
    assert all(after[s] != before[s] for s in STAGES)


def test_infrastructure_edit_changes_no_stage(project_copy: Path) -> None:
    before = _versions(project_copy)
    _edit(project_copy / "resources" / "vector_stores.py", "SNIPPET_CHARS = 2000", "SNIPPET_CHARS = 1000")
    _edit(project_copy / "quiver" / "settings.py", "BUNDLED_MODEL =", "BUNDLED_MODEL_ALIAS = 1\nBUNDLED_MODEL =")
    assert _versions(project_copy) == before
