"""The Dagster UI serves the project: every asset appears in the asset graph (via its GraphQL API)."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import PROJECT

QUERY = "{ assetNodes { assetKey { path } groupName opName } }"


def _chromium(playwright: Any) -> Any:
    """Headless Chromium (Debian's), without the network chatter a test does not need."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"])


def _open_when_served(page: Any, url: str, server: subprocess.Popen, name: str, shows: str | None = None,
                      within_s: float = 180) -> None:
    """Opens url (and waits for a text on it) once the starting webserver serves it, retrying until then."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            page.goto(url, timeout=10_000)
            if shows:
                page.get_by_text(shows).wait_for(timeout=30_000)
            return
        except Exception:  # noqa: BLE001 - the webserver is still starting
            assert server.poll() is None, f"{name} exited"
            assert time.monotonic() < deadline, f"{name} did not serve {url} within {within_s:.0f} s"
            time.sleep(2)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_webserver_shows_every_asset(quiver_home: Path) -> None:
    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1",
         "-p", str(port)],
        cwd=PROJECT, env={**os.environ, "DAGSTER_HOME": str(quiver_home)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        nodes = None
        while time.monotonic() < deadline and nodes is None:
            assert server.poll() is None, server.stderr.read()[-3000:] if server.stderr else "webserver exited"
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": QUERY}).encode(),
                    headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=10) as response:
                    payload = json.load(response)
                nodes = payload["data"]["assetNodes"]
                if not nodes:  # the code location is still loading
                    nodes = None
                    time.sleep(1)
            except (OSError, KeyError, TypeError):
                time.sleep(1)
        assert nodes is not None, "the webserver did not serve the asset graph within 120 s"
        found = {("/".join(n["assetKey"]["path"]), n["groupName"]) for n in nodes}
        assert found == {("documents", "ingest"), ("chunks", "ingest"), ("embeddings", "ingest"),
                         ("faiss_index", "index"), ("milvus_collection", "index"), ("retrieval_eval", "evaluation")}
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


STALE_QUERY = """{
  partitioned: assetNodes(assetKeys: [{path: ["documents"]}, {path: ["chunks"]}, {path: ["embeddings"]}]) {
    assetKey { path } staleStatus(partition: "papers") }
  indexes: assetNodes(assetKeys: [{path: ["faiss_index"]}, {path: ["milvus_collection"]}]) {
    assetKey { path } staleStatus }
}"""


def _serve_and_query(root: Path, home: Path, query: str) -> dict:
    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1",
         "-p", str(port)], cwd=root, env={**os.environ, "DAGSTER_HOME": str(home)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                    headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=10) as response:
                    data = json.load(response)["data"]
                if data and all(data.values()):
                    return data
            except (OSError, KeyError, TypeError):
                pass
            time.sleep(1)
        raise AssertionError("the webserver did not answer within 120 s")
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_ui_marks_exactly_the_edited_stage_and_downstream_stale(
    quiver_home: Path, tmp_path: Path, instance, resources  # noqa: ANN001
) -> None:
    import shutil

    from tests.helpers import add_source, index, ingest, scifact_docs, write_jsonl

    add_source(instance, resources, "papers", write_jsonl(tmp_path / "p.jsonl", scifact_docs(5)))
    ingest(instance, resources, "papers")
    index(instance, resources)

    copy = tmp_path / "project"
    copy.mkdir()
    for package in ("quiver", "assets", "resources", "platform_defs"):
        shutil.copytree(PROJECT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT / "workspace.yaml", copy / "workspace.yaml")

    def statuses() -> dict[str, str]:
        data = _serve_and_query(copy, quiver_home, STALE_QUERY)
        return {"/".join(n["assetKey"]["path"]): n["staleStatus"] for nodes in data.values() for n in nodes}

    assert set(statuses().values()) == {"FRESH"}
    chunker = copy / "quiver" / "chunking.py"
    chunker.write_text(chunker.read_text().replace("overlap_tokens: int = 32", "overlap_tokens: int = 40"))
    after = statuses()
    assert after == {"documents": "FRESH", "chunks": "STALE", "embeddings": "STALE", "faiss_index": "STALE",
                     "milvus_collection": "STALE"}


ARTIFACTS = PROJECT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"


def test_browser_sees_every_asset_and_materializes_a_source(quiver_home: Path, tmp_path: Path) -> None:
    """`dagster dev` on the project, driven in headless Chromium: every asset in the lineage, a source
    materialized from the UI, its run seen succeeding. Screenshots go to test-artifacts/."""
    import shutil

    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        message = "Debian's chromium is not installed (scripts/browser.sh installs it)"
        if os.environ.get("CI"):
            raise AssertionError(message)
        import pytest

        pytest.skip(message)
    ARTIFACTS.mkdir(exist_ok=True)
    beir = tmp_path / "tiny"
    shutil.copytree(PROJECT / "tests" / "fixtures" / "tiny_beir", beir)
    env = {**os.environ, "DAGSTER_HOME": str(quiver_home), "HF_HUB_OFFLINE": "1"}
    added = subprocess.run([str(Path(sys.executable).parent / "quiver"), "source", "add", "tiny", str(beir)],
                           cwd=PROJECT, env=env, capture_output=True, text=True, timeout=120)
    assert added.returncode == 0, added.stderr
    port = _free_port()
    dev = subprocess.Popen([str(Path(sys.executable).parent / "dagster"), "dev", "-w", "workspace.yaml", "-h",
                            "127.0.0.1", "-p", str(port)], cwd=PROJECT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        with sync_playwright() as playwright:
            browser = _chromium(playwright)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            _open_when_served(page, f"{base}/asset-groups", dev, "dagster dev")
            skip = page.get_by_role("button", name="Skip")  # the community sign-up dialog of a fresh instance
            skip.click(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "ui-lineage.png"))
            seen: set[str] = set()
            groups = {"ingest": ("documents", "chunks", "embeddings"), "index": ("faiss_index", "milvus_collection"),
                      "evaluation": ("retrieval_eval",)}
            for group, assets in groups.items():
                page.goto(f"{base}/locations/platform_defs/asset-groups/{group}", timeout=30_000)
                for asset in assets:
                    page.get_by_text(asset, exact=True).first.wait_for(timeout=60_000)
                    seen.add(asset)
                page.screenshot(path=str(ARTIFACTS / f"ui-group-{group}.png"))
            assert seen == {"documents", "chunks", "embeddings", "faiss_index", "milvus_collection", "retrieval_eval"}

            # Materialize the source from the UI: all three ingest assets, every partition (the one source).
            page.goto(f"{base}/locations/platform_defs/asset-groups/ingest", timeout=30_000)
            page.get_by_role("button", name="Materialize all…").click(timeout=60_000)
            dialog = page.get_by_role("dialog")
            dialog.get_by_role("button", name="All", exact=True).click()
            dialog.get_by_text("1 partition", exact=True).wait_for(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "ui-launch.png"))
            dialog.get_by_role("button", name="Launch 1 run").click()
            dialog.wait_for(state="detached", timeout=60_000)  # the launch went through; leaving earlier aborts it
            page.get_by_text("Launched run", exact=False).first.wait_for(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "ui-launched.png"))
            page.goto(f"{base}/runs", timeout=30_000)
            deadline = time.monotonic() + 300
            while True:  # the table fills in after each load: wait for the status, not for the page
                try:
                    page.get_by_text("Success", exact=True).first.wait_for(timeout=10_000)
                    break
                except Exception:  # noqa: BLE001 - not finished yet
                    assert not page.get_by_text("Failure", exact=True).count(), "the run failed"
                    assert time.monotonic() < deadline, "no run succeeded within 300 s"
                    page.reload()
            page.screenshot(path=str(ARTIFACTS / "ui-run-succeeded.png"))
            browser.close()
    finally:
        os.killpg(dev.pid, 9)
        dev.wait(timeout=30)
    from dagster import AssetKey, DagsterInstance

    with DagsterInstance.get() as instance:
        event = instance.get_latest_materialization_event(AssetKey("embeddings"))
        assert event is not None and event.asset_materialization.partition == "tiny"
        run = instance.get_run_by_id(event.run_id)
        assert run.is_success and run.tags["dagster/partition"] == "tiny"
        assert run.tags.get("dagster/from_ui") == "true"  # launched from the browser


def _metadata_rows(page) -> dict[str, str]:  # noqa: ANN001 - a Playwright page
    """{key: the row's text} of the metadata table the page shows."""
    rows = {}
    for row in page.locator("tr").all():
        cells = row.locator("td")
        if cells.count() >= 2:
            rows[cells.first.inner_text().strip()] = row.inner_text()
    return rows


def test_browser_shows_the_summary_of_a_fresh_materialization_and_of_a_cache_hit(
    quiver_home: Path, tmp_path: Path, instance, resources  # noqa: ANN001
) -> None:
    """The asset page of `embeddings`, in headless Chromium: a fresh materialization leads with what it did (time,
    texts/s, tokens/s, cache hit rate, model load, Milvus); a cache hit says it is one, names the run whose output
    it reuses, and shows no throughput. Screenshots go to test-artifacts/."""
    from dagster import AssetKey, AssetRecordsFilter
    from playwright.sync_api import sync_playwright

    from tests.helpers import add_source, ingest

    if not Path(CHROMIUM).exists():
        raise AssertionError("Debian's chromium is not installed (scripts/browser.sh installs it)")
    ARTIFACTS.mkdir(exist_ok=True)
    notes = tmp_path / "notes"
    notes.mkdir()
    for i in range(3):
        (notes / f"n{i}.md").write_text(f"# Note {i}\n\nHow to parse json, part {i}.\n", encoding="utf-8")
    add_source(instance, resources, "notes", notes)
    fresh = ingest(instance, resources, "notes")
    hit = ingest(instance, resources, "notes")
    records = instance.fetch_materializations(AssetRecordsFilter(asset_key=AssetKey("embeddings")), limit=2).records
    when = {r.event_log_entry.run_id: int(r.event_log_entry.timestamp * 1000) for r in records}
    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p",
         str(port)], cwd=PROJECT, env={**os.environ, "DAGSTER_HOME": str(quiver_home)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        with sync_playwright() as playwright:
            browser = _chromium(playwright)
            page = browser.new_page(viewport={"width": 1600, "height": 1400})

            def open_event(run_id: str) -> dict[str, str]:
                _open_when_served(page, f"{base}/assets/embeddings?view=events&time={when[run_id]}", server,
                                  "dagster-webserver", shows=f"materialized in run {run_id[:8]}")
                skip = page.get_by_role("button", name="Skip")  # the community sign-up dialog of a fresh instance
                if skip.count():
                    skip.click()
                page.get_by_text("summary", exact=True).first.wait_for(timeout=30_000)
                return _metadata_rows(page)

            rows = open_event(fresh.run_id)
            page.screenshot(path=str(ARTIFACTS / "ui-embeddings-fresh.png"), full_page=True)
            summary = rows["summary"]
            assert "Computed 3 chunks of notes in " in summary
            assert "Encoded 3 texts at " in summary and "texts/s" in summary and "tokens/s" in summary
            assert "Embedding cache: 0% hit (0 of 3 texts; L1 0, L3 0)" in summary
            assert "Milvus: 3 vectors upserted, 0 deleted, 0 unchanged" in summary
            assert "Model bundled:all-MiniLM-L6-v2 (torch, cpu): loaded in " in summary
            assert list(rows)[0] == "summary"  # first, before every figure
            assert rows["cache_hit"].split()[-1] == "false"
            assert {"texts_per_second", "tokens_per_second", "embedding_cache_hit_rate", "model_load_seconds",
                    "milvus_upserted", "details"} <= set(rows)
            assert not [k for k in rows if k.startswith("cache_l") or k.endswith("_pid")]  # in `details` now

            rows = open_event(hit.run_id)
            page.screenshot(path=str(ARTIFACTS / "ui-embeddings-cache-hit.png"), full_page=True)
            summary = rows["summary"]
            assert "Cache hit for notes: nothing recomputed" in summary
            assert f"Output of run {fresh.run_id[:8]} reused, made " in summary and ": 3 chunks in " in summary
            assert "That run: Encoded 3 texts at " in summary
            assert rows["cache_hit"].split()[-1] == "true"
            assert fresh.run_id in rows["reused_run_id"]  # a link to the run whose output is reused
            assert not {"texts_per_second", "tokens_per_second", "rows_per_second", "duration_seconds"} & set(rows)

            # the asset's overview: owners and kinds, the latest (the hit) summary in its metadata table
            page.goto(f"{base}/assets/embeddings", timeout=30_000)
            page.get_by_text("Owners", exact=True).wait_for(timeout=30_000)
            page.get_by_text("Cache hit for notes: nothing recomputed", exact=False).first.wait_for(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "ui-embeddings-overview.png"), full_page=True)
            overview = page.inner_text("body")
            assert "L1, in-process memory" in overview and "L3, segment files under the storage root" in overview
            for shown in ("quiver", "PyTorch", "Hugging Face", "Parquet"):
                assert shown in overview, shown
            browser.close()
    finally:
        os.killpg(server.pid, 9)
        server.wait(timeout=30)
