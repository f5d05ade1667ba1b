"""Code versions change exactly when a stage's code (or the logic it imports) changes."""

import shutil
from pathlib import Path

import pytest

from quiver.codeversion import module_dependencies, stage_versions
from tests.conftest import PROJECT

STAGES = ["assets.documents", "assets.chunks", "assets.embeddings", "assets.faiss_index", "assets.milvus_collection",
          "assets.retrieval_eval"]


def _graph() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Each stage's modules and upstream stages, read off the Dagster asset graph."""
    from platform_defs import defs

    graph = defs.resolve_asset_graph()
    modules, upstream = {}, {}
    for stage in STAGES:
        node = graph.get(__import__("dagster").AssetKey(stage.split(".")[1]))
        modules[stage] = [stage]
        upstream[stage] = sorted(f"assets.{k.path[-1]}" for k in node.parent_keys)
    return modules, upstream


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    for package in ("quiver", "assets", "resources"):
        shutil.copytree(PROJECT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _versions(root: Path) -> dict[str, str]:
    return stage_versions(*_graph(), root=root)


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_assets_carry_the_code_version_of_the_asset_graph() -> None:
    from dagster import AssetKey

    from platform_defs import defs

    graph = defs.resolve_asset_graph()
    expected = _versions(PROJECT)
    for stage in STAGES:
        assert graph.get(AssetKey(stage.split(".")[1])).code_version == expected[stage]
    _, upstream = _graph()
    assert upstream["assets.retrieval_eval"] == ["assets.documents", "assets.faiss_index", "assets.milvus_collection"]


def test_dependencies_are_every_project_module_imported() -> None:
    chunks = module_dependencies("assets.chunks")
    assert {"assets.chunks", "assets.common", "quiver.chunking", "quiver.hashing"} <= set(chunks)
    assert {"resources.fileref", "resources.model_pool", "resources.sources"} <= set(chunks)  # resources too
    assert "quiver.sources" in module_dependencies("assets.documents")
    assert "resources.embedding_cache" in module_dependencies("assets.embeddings")
    assert not any(m.startswith("platform_defs") for m in module_dependencies(STAGES))


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


def test_an_edit_in_resources_changes_every_stage_that_runs_it(project_copy: Path) -> None:
    before = _versions(project_copy)
    _edit(project_copy / "resources" / "milvus_store.py", "EXACT_MARK = \"quiver.exact.\"", "EXACT_MARK = \"q.exact.\"")
    after = _versions(project_copy)
    changed = {s for s in STAGES if after[s] != before[s]}
    assert {"assets.embeddings", "assets.faiss_index", "assets.milvus_collection", "assets.retrieval_eval"} <= changed
    assert "assets.documents" not in changed  # reading a source runs no vector store code
    _edit(project_copy / "resources" / "embedding_cache.py", "class EmbeddingCache(ConfigurableResource):",
          "class EmbeddingCache(ConfigurableResource):  # edited")
    again = _versions(project_copy)
    assert again["assets.embeddings"] != after["assets.embeddings"]


def test_a_module_created_after_its_importer_was_cached_joins_the_code_version(tmp_path: Path) -> None:
    """The imports a module's source names are cached by that source (in a file shared by processes); which of
    them are project modules is decided at each lookup, so a module created later (a function-level import of a
    file that did not exist yet, a branch switch) is part of the version at once, and its edits count."""
    import importlib
    import json

    import quiver.codeversion as codeversion

    root = tmp_path / "project"
    (root / "quiver").mkdir(parents=True)
    (root / "quiver" / "__init__.py").write_text("")
    (root / "quiver" / "stage.py").write_text("def run():\n    from quiver import later\n    return later.X\n")
    before = codeversion.code_version("quiver.stage", root)
    assert codeversion.module_dependencies("quiver.stage", root) == ["quiver", "quiver.stage"]
    cached = json.loads(codeversion._IMPORTS_FILE.read_text())  # what other processes will read
    assert any("quiver.later" in names for names in cached.values())
    importlib.reload(codeversion)  # a new process: the lists come from the file
    (root / "quiver" / "later.py").write_text("X = 1\n")
    created = codeversion.code_version("quiver.stage", root)
    assert codeversion.module_dependencies("quiver.stage", root) == ["quiver", "quiver.later", "quiver.stage"]
    (root / "quiver" / "later.py").write_text("X = 2\n")
    assert len({before, created, codeversion.code_version("quiver.stage", root)}) == 3
