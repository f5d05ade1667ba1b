"""Embedding backends on the real bundled model: exports made offline and once, int8 vectors close to fp32,
cache keys apart, a concurrent export built once, padding-aware batching, threads, and a pipeline on int8."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from quiver.backends import BACKENDS, DONE, cpu_quantization_config
from quiver.encoding import padded_tokens, plan_batches
from quiver.errors import ModelPoolError
from tests.conftest import PROJECT
from tests.helpers import add_source, assert_stores_exact, index, ingest, metadata, scifact_docs, write_jsonl

COMPILED = ("onnx", "onnx-int8", "openvino", "openvino-int8")


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export cache for the session, as a machine has one."""
    return tmp_path_factory.mktemp("exports")


@pytest.fixture(scope="session")
def chunk_texts() -> list[str]:
    """A few hundred real chunks: SciFact abstracts cut into the model's windows."""
    from quiver.chunking import ChunkSettings, chunk_documents
    from resources.model_pool import ModelPool

    pool = ModelPool()
    docs = [(d["id"], d["title"], d["text"]) for d in scifact_docs(110)]
    return [c.text for c in chunk_documents(pool.tokenizer(), docs, ChunkSettings(strategy="tokens"))][:200]


@pytest.fixture(scope="session")
def fp32_vectors(chunk_texts: list[str]) -> np.ndarray:
    from resources.model_pool import ModelPool

    return ModelPool().encode(chunk_texts)


def _pool(backend: str, export_dir: Path, **extra: Any) -> Any:
    from resources.model_pool import ModelPool

    return ModelPool(backend=backend, export_dir=str(export_dir), **extra)


@pytest.mark.parametrize("backend", COMPILED)
def test_each_compiled_backend_exports_offline_and_stays_close_to_fp32(
        backend: str, export_dir: Path, chunk_texts: list[str], fp32_vectors: np.ndarray) -> None:
    pool = _pool(backend, export_dir)
    vectors = pool.encode(chunk_texts)
    assert vectors.shape == fp32_vectors.shape and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosine = (vectors * fp32_vectors).sum(axis=1)
    if backend.endswith("int8"):
        assert cosine.mean() >= 0.99 and cosine.min() >= 0.97, (cosine.mean(), cosine.min())
    else:
        assert cosine.min() >= 0.9999, cosine.min()
    described = pool.describe()
    assert described["model_backend"] == backend
    export = Path(described["model_export"])
    record = json.loads((export / DONE).read_text())
    assert export.parent == export_dir and record["backend"] == backend
    assert not [p for p in export_dir.iterdir() if p.name.startswith(".")]  # no temporary directory left
    if backend.endswith("int8"):
        assert described["model_quantization"] == cpu_quantization_config() == record["quantization"]
    # encoded again in the same process: the same vectors (one plan, one runner)
    assert np.array_equal(pool.encode(chunk_texts), vectors)
    # a text encoded alone, as a query is, stays close to its batched vector (dynamic int8 quantizes each
    # batch's activations with that batch's own range)
    alone = np.vstack([pool.encode([t]) for t in chunk_texts[:8]])
    assert (alone * vectors[:8]).sum(axis=1).min() >= 0.99


def test_openvino_int8_keeps_the_attention_probabilities_fp32_and_long_chunks_close(
        export_dir: Path, chunk_texts: list[str], fp32_vectors: np.ndarray) -> None:
    """int8 steps of 1/127 would round most of a 256-token window's attention probabilities to zero: the matmuls
    that weigh the values by them stay fp32, and the worst long chunk stays close to fp32."""
    import openvino as ov

    from quiver.backends import INT8_RECIPES
    from quiver.exporters import attention_value_matmuls

    pool = _pool("openvino-int8", export_dir)
    vectors = pool.encode(chunk_texts)
    export = Path(pool.describe()["model_export"])
    record = json.loads((export / DONE).read_text())
    layers = pool.state().base[0].auto_model.config.num_hidden_layers
    assert record["fp32_attention_value_matmuls"] == layers and record["recipe"] == INT8_RECIPES["openvino-int8"]
    graph = ov.Core().read_model(str(export / "model.xml"))
    kept = attention_value_matmuls(graph)
    assert len(kept) == layers
    inputs = {op.get_friendly_name(): [i.get_source_output().get_node().get_type_name() for i in op.inputs()]
              for op in graph.get_ordered_ops() if op.get_type_name() == "MatMul"}
    assert all("FakeQuantize" not in inputs[name] for name in kept)
    assert sum("FakeQuantize" in kinds for kinds in inputs.values()) == len(inputs) - layers  # the rest is int8
    long = [i for i, t in enumerate(chunk_texts) if len(pool.tokenizer()(t)["input_ids"]) >= 200]
    assert len(long) >= 100
    cosine = (vectors[long] * fp32_vectors[long]).sum(axis=1)
    assert cosine.mean() >= 0.994 and cosine.min() >= 0.987, (cosine.mean(), cosine.min())  # was 0.990, 0.983


def test_the_export_key_follows_the_int8_recipe(export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A changed quantization recipe makes a new export and a new model fingerprint, never reuses the old."""
    from quiver import backends

    pools = {b: _pool(b, export_dir) for b in ("torch", "onnx", "onnx-int8", "openvino-int8")}

    def keys() -> dict[str, tuple[str, Path | None]]:
        return {b: (p.fingerprint(), spec.directory(export_dir) if (spec := p.export_spec()) else None)
                for b, p in pools.items()}

    before = keys()
    changed = {**backends.INT8_RECIPES["openvino-int8"], "smooth_quant_matmul": 0.5}
    monkeypatch.setitem(backends.INT8_RECIPES, "openvino-int8", changed)
    after = keys()
    assert after["openvino-int8"][0] != before["openvino-int8"][0]  # the model fingerprint: caches apart
    assert after["openvino-int8"][1] != before["openvino-int8"][1]  # the export: made anew
    assert all(after[b] == before[b] for b in ("torch", "onnx", "onnx-int8"))  # only its own exports change


def test_static_backend_is_distilled_offline_and_encodes(export_dir: Path, chunk_texts: list[str]) -> None:
    pool = _pool("static", export_dir)
    vectors = pool.encode(chunk_texts)
    assert vectors.shape == (len(chunk_texts), pool.dimension()) and np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert pool.window_tokens() == 256  # chunks are still cut to the model's window
    record = json.loads((Path(pool.describe()["model_export"]) / DONE).read_text())
    assert record["distilled_by"] == "model2vec" and record["dimension"] == pool.dimension()
    # similar texts are closer than unrelated ones
    a, b, c = pool.encode(["The cell membrane regulates transport.", "Transport across cell membranes is "
                           "regulated.", "The stock market fell on Tuesday."])
    assert float(a @ b) > float(a @ c)


def test_cache_keys_differ_across_backends(export_dir: Path) -> None:
    pools = {b: _pool(b, export_dir) for b in BACKENDS}
    fingerprints = {b: p.fingerprint() for b, p in pools.items()}
    assert len(set(fingerprints.values())) == len(BACKENDS)
    import hashlib

    from quiver.models import weights_hash
    from resources.model_pool import ModelPool

    torch_key = hashlib.sha256("\x00".join([weights_hash(pools["torch"].model_path), "None", "True"]).encode())
    assert fingerprints["torch"] == torch_key.hexdigest()[:32]  # torch's key is as it always was
    assert ModelPool(backend="openvino-int8", calibration_texts=64).fingerprint() != fingerprints["openvino-int8"]
    assert len({p.tokenizer_fingerprint() for p in pools.values()}) == 1  # the chunks do not depend on it
    int8 = [pools["onnx-int8"].model_copy(update={"quantization": q}) for q in ("avx2", "avx512_vnni")]
    assert int8[0].fingerprint() != int8[1].fingerprint()
    specs = {b: p.export_spec() for b, p in pools.items()}
    assert specs["torch"] is None
    assert len({s.directory(export_dir) for s in specs.values() if s}) == len(BACKENDS) - 1
    with pytest.raises(ModelPoolError, match="unknown model backend 'tensorrt'"):
        _pool("tensorrt", export_dir).fingerprint()


def test_a_hub_name_cannot_be_exported_offline(tmp_path: Path) -> None:
    pool = _pool("onnx-int8", tmp_path, model="sentence-transformers/not-on-this-machine")
    with pytest.raises(ModelPoolError, match="exports are made offline from a local sentence-transformers "
                                             "directory"):
        pool.encode(["x"])


EXPORT_SCRIPT = """
import logging
import sys
logging.basicConfig(level=logging.INFO)  # the pool's log lines, which say who exported
from resources.model_pool import ModelPool
pool = ModelPool(backend="onnx-int8", export_dir=sys.argv[1])
vectors = pool.encode(["two processes export at once"])
print(pool.describe()["model_export"], float(vectors[0][0]))
"""


def test_two_processes_exporting_at_once_build_one_valid_export(tmp_path: Path) -> None:
    exports = tmp_path / "exports"
    procs = [subprocess.Popen([sys.executable, "-c", EXPORT_SCRIPT, str(exports)], cwd=PROJECT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    lines = [out.strip().splitlines()[-1].split() for out, _ in outputs]
    assert lines[0] == lines[1]  # the same export, the same vector
    built = [p for p in exports.iterdir() if p.is_dir()]
    assert [p.name for p in built] == [Path(lines[0][0]).name]  # one export, no temporary directory
    assert json.loads((built[0] / DONE).read_text())["backend"] == "onnx-int8"
    logs = "".join(err for _, err in outputs)
    assert logs.count("exported to ") == 1  # built once: the other process waited for it


def test_cpu_quantization_config_follows_the_flags() -> None:
    assert cpu_quantization_config("flags : fpu avx2 avx512f avx512_vnni", "x86_64") == "avx512_vnni"
    assert cpu_quantization_config("flags : fpu avx2 avx512f", "x86_64") == "avx512"
    assert cpu_quantization_config("flags : fpu sse4_2 avx2", "x86_64") == "avx2"
    assert cpu_quantization_config("", "aarch64") == "arm64"


def test_batches_sort_by_token_length_within_a_window_and_cut_padding() -> None:
    lengths = [5, 100, 6, 98, 7, 99, 50, 51]
    assert plan_batches(lengths, 2, window=4) == [[1, 3], [2, 0], [5, 7], [6, 4]]
    assert sorted(i for b in plan_batches(lengths, 3) for i in b) == list(range(8))  # every text, once
    in_order = sum(padded_tokens(lengths[i:i + 2]) for i in range(0, 8, 2))
    planned = sum(padded_tokens([lengths[i] for i in b]) for b in plan_batches(lengths, 2))
    assert (in_order, planned) == (2 * (100 + 98 + 99 + 51), 2 * (100 + 98 + 50 + 6))


def test_the_pool_reports_padding_before_and_after(chunk_texts: list[str]) -> None:
    from quiver.encoding import metrics_metadata
    from resources.model_pool import ModelPool

    pool = ModelPool()
    before = pool.metrics()
    texts = [t[: 40 + (i * 37) % len(t)] for i, t in enumerate(chunk_texts[:64])]  # varied lengths
    vectors = pool.encode(texts)
    shown = metrics_metadata(pool.metrics().minus(before))
    assert 0 <= shown["padding_fraction"] < shown["padding_fraction_in_input_order"]
    # output order is kept: each row is its own text's vector
    alone = np.vstack([pool.encode([t]) for t in texts[:4]])
    assert np.allclose(vectors[:4], alone, atol=1e-5)


def test_model_steps_share_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from platform_defs.executor import model_threads

    monkeypatch.delenv("QUIVER_MODEL_THREADS", raising=False)
    assert model_threads(cores=8, model_limit=3, model_steps=6, max_concurrent=8) == 2
    assert model_threads(cores=2, model_limit=4, model_steps=1, max_concurrent=8) == 2
    assert model_threads(cores=2, model_limit=4, model_steps=4, max_concurrent=8) == 1
    assert model_threads(cores=8, model_limit=3, model_steps=0, max_concurrent=8) is None
    monkeypatch.setenv("QUIVER_MODEL_THREADS", "3")
    assert model_threads(cores=8, model_limit=3, model_steps=6, max_concurrent=8) is None  # the user chose


def test_the_pipeline_runs_end_to_end_on_onnx_int8(tmp_path: Path, quiver_home: Path, instance: Any,
                                                  export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real multiprocess run (forkserver, preload, the executor's threads rule), then the indexes."""
    import os

    monkeypatch.setenv("QUIVER_MODEL_BACKEND", "onnx-int8")
    monkeypatch.setenv("QUIVER_EXPORT_DIR", str(export_dir))
    from platform_defs.resources import build_resources

    resources = build_resources(resolve_env=True)
    assert resources["model_pool"].backend == "onnx-int8"
    docs = scifact_docs(12)
    add_source(instance, resources, "sci", write_jsonl(tmp_path / "sci.jsonl", docs), "jsonl")
    env = {**os.environ, "DAGSTER_HOME": str(quiver_home), "PYTHONPATH": str(PROJECT), "QUIVER_CPU_COUNT": "2",
           "QUIVER_EXECUTION_MODE": "multiprocess"}
    proc = subprocess.run([str(Path(sys.executable).parent / "dagster"), "job", "execute", "-m", "platform_defs",
                           "-j", "ingest_job", "--tags", json.dumps({"dagster/partition": "sci"})], cwd=PROJECT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from dagster import AssetKey, AssetRecordsFilter

    record = instance.fetch_materializations(AssetRecordsFilter(asset_key=AssetKey("embeddings"),
                                                                asset_partitions=["sci"]), limit=1).records[0]
    first = {k: v.value for k, v in record.event_log_entry.asset_materialization.metadata.items()}
    model = first["details"]["model"]
    assert model["model_backend"] == "onnx-int8" and first["texts_encoded"] == first["rows"] > 12
    assert model["model_inherited"] is True and model["model_loads_in_step_process"] == 0  # from the forkserver
    assert model["model_threads"] == 2  # one model step in the run: both cores
    again = metadata(ingest(instance, resources, "sci", run_config={"ops": {"embeddings": {"config": {
        "force": True}}}}), "embeddings")
    assert again["cache_hit"] is False and again.get("texts_encoded", 0) == 0  # its cache holds the int8 vectors
    index(instance, resources)
    assert_stores_exact(resources, {"sci": {d["id"]: d for d in docs}})


def test_quiver_export_makes_the_exports_ahead(export_dir: Path, quiver_home: Path, capsys: pytest.CaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from platform_defs.cli import main

    monkeypatch.setenv("QUIVER_EXPORT_DIR", str(export_dir))
    assert main(["export", "--backend", "onnx-int8", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    expected = _pool("onnx-int8", export_dir).export_spec().directory(export_dir)
    assert f"onnx-int8: {expected}" in out and '"backend": "onnx-int8"' in out
    assert "torch: runs the model as loaded" in out
