"""Fresh in seconds: `quiver run --source S` is one Dagster run, in process when small (no model load when nothing
is encoded), and the warm host runs it (and daemon-launched runs) in a child that inherited the model."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.conftest import PROJECT
from tests.helpers import assert_stores_exact, scifact_docs, write_jsonl

BIN = Path(sys.executable).parent


# What a user's shell has not set, though the test process has (tests/conftest.py): loading the model sets
# HF_HUB_OFFLINE itself, and a warm host must not mistake that for another environment.
UNSET_IN_A_SHELL = ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")


def _quiver(home: Path, *args: str, env: dict[str, str] | None = None, ok: bool = True,
            cwd: Path = PROJECT) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in UNSET_IN_A_SHELL}
    proc = subprocess.run([str(BIN / "quiver"), *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**full, "DAGSTER_HOME": str(home), **(env or {})})
    if ok:
        assert proc.returncode == 0, f"quiver {args}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _runs(instance: Any) -> list[Any]:
    return [r.dagster_run for r in reversed(instance.get_run_records())]


def _materialized(instance: Any, run_id: str) -> dict[str, dict[str, Any]]:
    found = {}
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is not None and event.is_step_materialization:
            mat = event.event_specific_data.materialization
            found[mat.asset_key.path[-1]] = {k: v.value for k, v in mat.metadata.items()}
    return found


def _engine_messages(instance: Any, run_id: str) -> list[str]:
    return [r.dagster_event.message or "" for r in instance.all_logs(run_id)
            if r.dagster_event is not None and r.dagster_event.is_engine_event]


def _log_messages(instance: Any, run_id: str) -> list[str]:
    return [r.user_message for r in instance.all_logs(run_id)]


def _model_facts(meta: dict[str, Any]) -> dict[str, Any]:
    return meta["details"]["model"]


def _docs(n: int = 6, start: int = 0) -> dict[str, dict[str, Any]]:
    return {d["id"]: d for d in scifact_docs(n, start)}


def test_quiver_run_is_one_run_and_a_no_op_loads_no_model(quiver_home: Path, tmp_path: Path, instance: Any,
                                                          resources: dict[str, Any]) -> None:
    docs = _docs()
    write_jsonl(tmp_path / "s.jsonl", list(docs.values()))
    _quiver(quiver_home, "source", "add", "s", str(tmp_path / "s.jsonl"))
    forced = tmp_path / "multiprocess.yaml"
    forced.write_text("execution:\n  config:\n    mode: multiprocess\n")
    first = _quiver(quiver_home, "run", "--source", "s", "--config", str(forced), env={"QUIVER_WARM_HOST": "off"})
    assert "in one run" in first.stdout
    [run] = _runs(instance)
    assert run.job_name == "refresh_job" and run.tags["dagster/partition"] == "s"
    assert set(_materialized(instance, run.run_id)) == {"documents", "chunks", "embeddings", "faiss_index",
                                                       "milvus_collection"}
    assert any("multiprocess executor" in m for m in _engine_messages(instance, run.run_id))  # as configured

    _quiver(quiver_home, "run", "--source", "s", env={"QUIVER_WARM_HOST": "off"})
    runs = _runs(instance)
    assert [r.job_name for r in runs] == ["refresh_job", "refresh_job"]
    noop = runs[-1]
    assert any("Executing steps in process" in m for m in _engine_messages(instance, noop.run_id))
    embedded = _materialized(instance, noop.run_id)["embeddings"]
    assert embedded["cache_hit"] is True and embedded["texts_encoded"] == 0
    assert not [m for m in _log_messages(instance, noop.run_id) if "loaded model" in m]  # never loaded
    checks = {(e.event_specific_data.asset_key.path[-1], e.event_specific_data.check_name): e.event_specific_data.passed
              for e in (r.dagster_event for r in instance.all_logs(noop.run_id))
              if e is not None and e.event_type_value == "ASSET_CHECK_EVALUATION"}
    assert checks == {("faiss_index", "matches_chunks"): True, ("milvus_collection", "matches_chunks"): True}
    assert_stores_exact(resources, {"s": docs})


class WarmHost:
    """`quiver warm start` for a test's instance, stopped (or killed) at the end."""

    def __init__(self, home: Path, env: dict[str, str] | None = None, cwd: Path = PROJECT) -> None:
        self.home, self.env, self.cwd = home, env or {}, cwd

    def __enter__(self) -> dict[str, Any]:
        started = _quiver(self.home, "warm", "start", "--idle", "300", env=self.env, cwd=self.cwd)
        assert "ready" in started.stdout
        return json.loads(_quiver(self.home, "warm", "status", env=self.env, cwd=self.cwd).stdout)

    def __exit__(self, *exc: object) -> None:
        status = _quiver(self.home, "warm", "status", env=self.env, ok=False, cwd=self.cwd)
        _quiver(self.home, "warm", "stop", env=self.env, ok=False, cwd=self.cwd)
        if status.returncode == 0:
            pid = json.loads(status.stdout)["pid"]
            deadline = time.monotonic() + 30
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_warm_host_runs_quiver_run_with_the_model_it_loaded(quiver_home: Path, tmp_path: Path, instance: Any,
                                                            resources: dict[str, Any]) -> None:
    docs = _docs()
    source = write_jsonl(tmp_path / "s.jsonl", list(docs.values()))
    _quiver(quiver_home, "source", "add", "s", str(source))
    _quiver(quiver_home, "run", "--source", "s", env={"QUIVER_WARM_HOST": "off"})
    with WarmHost(quiver_home) as host:
        edited = dict(docs)
        first_id = next(iter(edited))
        edited[first_id] = {**edited[first_id], "text": edited[first_id]["text"] + " An edit the index must see."}
        del edited[list(edited)[-1]]
        edited.update(_docs(1, start=50))
        write_jsonl(source, list(edited.values()))
        out = _quiver(quiver_home, "run", "--source", "s")
        assert "Quiver is ready." in out.stdout and "warm host not used" not in out.stderr
        run = _runs(instance)[-1]
        embedded = _materialized(instance, run.run_id)["embeddings"]
        model = _model_facts(embedded)
        # encoded in a child of the host, with the weights the host loaded: no load in the run
        assert model["model_loaded"] is True and model["model_inherited"] is True
        assert model["model_loaded_by_pid"] == host["pid"] and embedded["model_loads_this_step"] == 0
        assert 2 <= embedded["texts_encoded"] < embedded["rows"]  # the edited and the new document's chunks
        assert_stores_exact(resources, {"s": edited})
        resources["milvus"].release()  # Milvus Lite admits one process: the next run's
        assert json.loads(_quiver(quiver_home, "warm", "status").stdout)["runs_served"] == 1

        # Another environment (here another model backend would be one): refused, run in the process instead.
        other = _quiver(quiver_home, "run", "--source", "s", env={"QUIVER_SOMETHING": "else"})
        assert "warm host not used: the environment differs from the warm host's (QUIVER_SOMETHING)" in other.stderr
        assert "Quiver is ready." in other.stdout
        assert json.loads(_quiver(quiver_home, "warm", "status").stdout)["runs_served"] == 1


def test_warm_host_refuses_other_code_and_exits(quiver_home: Path, tmp_path: Path) -> None:
    from quiver.warm import LineReader, code_digest, send, socket_path

    with WarmHost(quiver_home) as host:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(socket_path(quiver_home)))
        send(sock, {"kind": "command", "argv": ["run"], "cwd": str(PROJECT), "env": dict(os.environ),
                    "digest": "another checkout"})
        # The host's own code is as it started: the caller is the odd one out (another checkout), refused alone.
        assert LineReader(sock).read() == {
            "refused": "the caller's code or libraries are not the warm host's (another checkout or environment?)"}
        sock.close()
        assert json.loads(_quiver(quiver_home, "warm", "status").stdout)["pid"] == host["pid"]

    # A host whose own project changed after it started: refused, and the host exits (never serves it again).
    import shutil

    copy = tmp_path / "checkout"
    for package in ("quiver", "resources", "assets", "platform_defs"):
        shutil.copytree(PROJECT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT / "pyproject.toml", copy / "pyproject.toml")
    env = {"PYTHONPATH": str(copy)}
    with WarmHost(quiver_home, env, cwd=copy) as host:
        (copy / "quiver" / "chunking.py").write_text((copy / "quiver" / "chunking.py").read_text() + "\n# edited\n")
        refused = _quiver(quiver_home, "run", "--source", "nothing", env=env, cwd=copy, ok=False)
        assert "warm host not used: the project's code or its installed libraries changed" in refused.stderr
        deadline = time.monotonic() + 30
        while _alive(host["pid"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(host["pid"]), "a host that saw its code change must exit, never serve it"
    # The digest covers every project file and the installed libraries' versions.
    root = tmp_path / "project"
    (root / "quiver").mkdir(parents=True)
    (root / "quiver" / "a.py").write_text("X = 1\n")
    before = code_digest(root)
    assert code_digest(root) == before
    (root / "quiver" / "a.py").write_text("X = 2\n")
    assert code_digest(root) != before


def test_inbox_change_is_one_run_in_the_warm_host_through_the_daemon(quiver_home: Path, tmp_path: Path,
                                                                     instance: Any,
                                                                     resources: dict[str, Any]) -> None:
    """A file dropped into the inbox: the sensor asks for one refresh run, the daemon's launcher hands it to the
    warm host, and both stores are exact once it is done."""
    with (quiver_home / "dagster.yaml").open("a") as fh:
        fh.write("run_launcher:\n  module: platform_defs.launcher\n  class: WarmRunLauncher\n")
    box = tmp_path / "inbox"
    box.mkdir()
    env = {"QUIVER_INBOX": str(box), "QUIVER_INBOX_INTERVAL_S": "2", "PYTHONPATH": str(PROJECT)}
    os.environ.update(env)  # this process's resources read the same inbox (the test's own reads only)
    try:
        with WarmHost(quiver_home, env) as host:
            # the daemon's environment is the host's (as one shell would start both)
            shell = {**{k: v for k, v in os.environ.items() if k not in UNSET_IN_A_SHELL},
                     "DAGSTER_HOME": str(quiver_home)}
            subprocess.run([str(BIN / "dagster"), "sensor", "start", "-m", "platform_defs", "inbox_sensor"],
                           cwd=PROJECT, env=shell, check=True, capture_output=True, timeout=180)
            daemon = subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-m", "platform_defs"], cwd=PROJECT,
                                      env=shell,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                docs = _docs(4)
                write_jsonl(box / "dropped.jsonl", list(docs.values()))
                deadline = time.monotonic() + 300
                while True:
                    runs = _runs(instance)
                    if runs and all(r.is_finished for r in runs):
                        break
                    assert time.monotonic() < deadline, [(r.job_name, r.status) for r in runs]
                    time.sleep(0.2)
            finally:
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait()
            [run] = runs
            assert run.job_name == "refresh_job" and run.is_success and run.tags["dagster/partition"] == "dropped"
            assert run.tags.get("quiver/warm_host_pid") == str(host["pid"]), _engine_messages(instance, run.run_id)
            embedded = _materialized(instance, run.run_id)["embeddings"]
            assert _model_facts(embedded)["model_loaded_by_pid"] == host["pid"]
            assert embedded["texts_encoded"] == embedded["rows"]
            assert_stores_exact(resources, {"dropped": docs})
    finally:
        for name in env:
            os.environ.pop(name, None)
