"""The model pool: one load per process, inherited by forked steps, healed when an instance fails."""

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from quiver.errors import ModelPoolError
from quiver.report import rounded, seconds_text
from resources import model_pool as mp
from resources.model_pool import ModelPool
from tests.helpers import add_source, ingest, metadata, scifact_docs, write_jsonl


def test_one_load_per_process_across_assets_batches_and_threads(
    tmp_path: Path, instance: Any, resources: dict[str, Any]
) -> None:
    pool: ModelPool = resources["model_pool"]
    pool.state()  # loaded by an earlier test or now: from here on, nothing may load again
    loads_before = mp.loads_in_this_process()
    add_source(instance, resources, "a", write_jsonl(tmp_path / "a.jsonl", scifact_docs(12)))
    add_source(instance, resources, "b", write_jsonl(tmp_path / "b.jsonl", scifact_docs(12, start=12)))
    config = {"ops": {"embeddings": {"config": {"texts_per_batch": 4}}}}  # several batches per partition
    for partition in ("a", "b"):
        result = ingest(instance, resources, partition, run_config=config)
        meta = metadata(result, "embeddings")
        assert meta["details"]["encoding"]["encode_batches"] >= 3
        assert meta["details"]["model"]["model_inherited"] is False
        assert meta["tokens_encoded"] > meta["texts_encoded"] == meta["rows"]
        assert meta["texts_per_second"] > 0 and meta["tokens_per_second"] > meta["texts_per_second"]
        assert meta["details"]["encoding"]["instance_wait_seconds"] >= 0
    # Another resource object with the same configuration shares the same weights.
    twin = ModelPool()
    assert twin.state() is pool.state()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            twin.encode(["thread safety of the shared instance"] * 3)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert mp.loads_in_this_process() == loads_before


def test_distinct_fingerprints_are_distinct_models() -> None:
    short = ModelPool(max_seq_length=64)
    assert short.fingerprint() != ModelPool().fingerprint()
    assert ModelPool(normalize=False).fingerprint() != ModelPool().fingerprint()
    assert short.state().max_seq_length == 64
    assert short.state() is not ModelPool().state()


def _poison(model: Any) -> None:
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))


def test_failed_instance_is_health_checked_and_reloaded() -> None:
    pool = ModelPool(max_seq_length=96)  # its own process-wide state, so other tests are unaffected
    expected = pool.encode(["reload me"])
    state = pool.loaded()
    _poison(state.instances[0].model)  # the instance now returns NaN: a broken instance
    reloads_before = pool.metrics().reloads
    vectors = pool.encode(["reload me"])
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    assert pool.metrics().reloads == reloads_before + 1
    assert pool.metrics().failures >= 1
    assert state.instances[0].healthy and state.instances[0].reloads == 1


def test_reload_attempts_are_bounded_with_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = ModelPool(max_seq_length=80, max_reload_attempts=2)
    pool.encode(["fine"])
    state = pool.loaded()
    _poison(state.instances[0].model)
    calls = {"n": 0}

    def broken_load(path: str, max_seq_length: int | None) -> Any:
        calls["n"] += 1
        raise OSError(f"weights unreadable at {path}")

    monkeypatch.setattr(mp, "load_sentence_transformer", broken_load)
    with pytest.raises(ModelPoolError, match=r"is unhealthy and 2 reload attempt\(s\) failed; last error: "
                                             r"OSError: weights unreadable"):
        pool.encode(["never"])
    assert calls["n"] == 2


def test_acquire_gives_each_worker_its_own_instance() -> None:
    pool = ModelPool(max_seq_length=72, instances=2)
    state = pool.loaded()
    assert len(state.instances) == 2
    assert state.instances[0].model is not state.instances[1].model
    with pool.acquire() as first, pool.acquire() as second:
        assert first is not second
    assert state.available.qsize() == 2
    # Another configuration of the same model gets instances of its own, never one of these.
    single = ModelPool(max_seq_length=72, instances=1).loaded()
    assert len(single.instances) == 1
    assert single.instances[0].model not in (state.instances[0].model, state.instances[1].model)
    assert ModelPool(max_seq_length=72, instances=2).loaded() is state


def test_cuda_request_without_cuda_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")  # the check is for CPU machines like CI
    with pytest.raises(ModelPoolError, match="device 'cuda:0' requested but CUDA is not available"):
        mp.resolve_devices("cuda:0", 1)
    assert mp.resolve_devices("auto", 2) == ["cpu", "cpu"]


def _execute_ingest(home: Path, partition: str, run_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """A real multiprocess run in its own process, as `dagster job execute` runs it: a forkserver
    lives for one run, so each run must start from a fresh orchestrating process."""
    import os
    import subprocess
    import sys

    from dagster import AssetKey, DagsterInstance

    config = home / f"run-{len(list(home.glob('run-*.yaml')))}.yaml"
    config.write_text(json.dumps(run_config or {}))  # JSON is YAML
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "job", "execute", "-m", "platform_defs", "-j", "ingest_job",
         "--tags", json.dumps({"dagster/partition": partition}), "-c", str(config)],
        env={**os.environ, "DAGSTER_HOME": str(home), "QUIVER_EXECUTION_MODE": "multiprocess"}, capture_output=True,
        text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with DagsterInstance.get() as inst:
        event = inst.get_latest_materialization_event(AssetKey("embeddings"))
        return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def test_multiprocess_steps_inherit_the_preloaded_model(
    quiver_home: Path, tmp_path: Path, instance: Any, resources: dict[str, Any]
) -> None:
    add_source(instance, resources, "mp", write_jsonl(tmp_path / "mp.jsonl", scifact_docs(10)))
    meta = _execute_ingest(quiver_home, "mp")
    model = meta["details"]["model"]
    assert model["model_inherited"] is True
    assert model["model_loads_in_step_process"] == 0 and meta["model_loads_this_step"] == 0
    forkserver = model["step_parent_pid"]
    assert model["model_loaded_by_pid"] == forkserver != model["step_pid"]
    assert model["model_loads_by_pid"] == {str(forkserver): 1}  # counted in the forkserver, none in the step
    # Where the preloaded model was loaded and how long that took are shown, though the step loaded nothing.
    assert 0 < meta["model_load_seconds"] == rounded(model["model_load_seconds"]) < 120
    assert meta["model_loaded_in"].startswith(f"pid {forkserver}, before it forked this step's process")
    assert (f"loaded in {seconds_text(meta['model_load_seconds'])} by pid {forkserver}" in meta["summary"]
            and "inherited, no load in this step" in meta["summary"])
    # one model step in the run: it gets every core the memory limits count (the executor's threads rule)
    from quiver.memory import memory_settings

    assert model["model_threads"] == memory_settings({c: (1, "") for c in ("model", "io", "light")}).cores

    # Without the preload module the step has to load the model itself, and reports it.
    without = {"execution": {"config": {"preload_model": False}}, "ops": {"embeddings": {"config": {"force": True}}}}
    meta = _execute_ingest(quiver_home, "mp", without)
    model = meta["details"]["model"]
    assert model["model_inherited"] is False
    assert model["model_loads_in_step_process"] == 1 == meta["model_loads_this_step"]
    assert json.loads(json.dumps(model["model_loads_by_pid"])) == {str(model["step_pid"]): 1}
    assert meta["model_loaded_in"] == f"this step's process (pid {model['step_pid']})"
