"""The web UI in a real browser: the offline demo fills a temporary instance and data root, `dagster dev`
serves them on loopback with nothing but DAGSTER_HOME and the settings file the demo wrote, and headless
Chromium (Debian's /usr/bin/chromium, driven by Playwright) checks the asset graph, the truth of the
partition statuses (the demo's bad items Failed, the rest Materialized, no Unsynced dataset), materializes
`dataset_jsonl` from its page, follows the run to success, and opens the demo's dataset report.

Screenshots land in test-artifacts/ (git-ignored): web-ui.png (the asset graph), web-ui-partitions.png,
web-ui-run.png (the run page), dataset-report-demo.png, web-ui-failure.png when something goes wrong.
Skipped only when /usr/bin/chromium is missing (`apt-get install chromium`; ./tasks.sh test installs it
when run as root).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from photoset_dagster.demo.catalog import demo_id, demo_photos

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DEMO_PHOTOS = 3  # three aspect buckets (+ the two duplicates planted of them); a few CPU seconds each
DEMO_TIMEOUT_S = 300
SERVER_TIMEOUT_S = 150  # /server_info; ~30 s on a 2-core box
UI_TIMEOUT_MS = 90_000  # first page load includes the code location's first load
RUN_TIMEOUT_S = 240  # run worker + step process each import torch: ~30-60 s on 2 cores
SHUTDOWN_GRACE_S = 20
PHOTOSET_ASSETS = (
    "photo_list",
    "approved_links",
    "image_facts",
    "captions",
    "dinov3_embeddings",
    "vae_latents",
    "t5_hidden",
    "dataset_jsonl",
    "webdataset_shards",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"({path}: {error})"


def _clean_env(**overrides: str) -> dict[str, str]:
    """The test process's environment without the developer's photoset/Dagster settings (a
    PHOTOSET_INSTANCE=postgres or PHOTOSET_AUTOMATION=on must not leak into the test)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PHOTOSET_", "DAGSTER_"))}
    env.update(overrides)
    return env


def _default_signals() -> None:
    # A test run started in the background by a non-interactive shell inherits SIGINT ignored; dagster
    # dev maps SIGTERM to the SIGINT handler, so it would then ignore both. Restore the defaults.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@dataclass
class DemoSite:
    home: Path  # DAGSTER_HOME (SQLite instance)
    data: Path  # the demo's data root
    env: dict[str, str]  # what the web UI runs with: DAGSTER_HOME and the settings file, nothing else


@dataclass
class WebUI:
    url: str
    log: Path
    process: subprocess.Popen


@pytest.fixture
def demo_site(tmp_path: Path) -> DemoSite:
    """`photoset demo --photos N` into a temporary data root, settings file and DAGSTER_HOME."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found (apt-get install chromium, or ./tasks.sh test as root)")
    home, data = tmp_path / "dagster_home", tmp_path / "data"
    home.mkdir()
    # Dagster's "join the community" dialog covers the page on a new loopback instance; mark it seen.
    (home / ".nux").mkdir()
    (home / ".nux" / "nux.yaml").write_text("seen: 1\n")
    env = _clean_env(DAGSTER_HOME=str(home), PHOTOSET_SETTINGS=str(tmp_path / "photoset.toml"))
    started = time.monotonic()
    demo = subprocess.run(
        [sys.executable, "-m", "photoset_dagster.cli", "--data-root", str(data), "demo", "--photos", str(DEMO_PHOTOS)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S,
    )
    output = (demo.stdout + demo.stderr)[-6000:]
    assert demo.returncode == 0, f"photoset demo failed (exit {demo.returncode}):\n{output}"
    print(f"demo: {time.monotonic() - started:.1f}s")
    assert 'profile = "demo"' in (tmp_path / "photoset.toml").read_text(), output
    return DemoSite(home, data, env)


def _stop(process: subprocess.Popen) -> None:
    """SIGINT (dagster dev then stops the webserver, the daemon and the code servers), then SIGKILL
    whatever is left of the process group (run workers, resource trackers)."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=SHUTDOWN_GRACE_S)
        except subprocess.TimeoutExpired:
            print(f"dagster dev did not stop within {SHUTDOWN_GRACE_S}s of SIGINT; killing its process group")
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


@pytest.fixture
def web_ui(demo_site: DemoSite, tmp_path: Path) -> Iterator[WebUI]:
    """`dagster dev` (webserver + daemon) on 127.0.0.1:<free port> over the demo's instance; always stopped."""
    port = _free_port()
    log = tmp_path / "dagster-dev.log"
    command = [
        sys.executable, "-m", "dagster", "dev", "-w", str(REPO_ROOT / "workspace.yaml"),
        "-h", "127.0.0.1", "-p", str(port),
    ]
    started = time.monotonic()
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=demo_site.env, stdout=log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_default_signals,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"dagster dev exited with {process.returncode} before serving:\n{_tail(log)}")
            try:
                with urllib.request.urlopen(f"{url}/server_info", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"dagster dev did not answer /server_info within {SERVER_TIMEOUT_S}s:\n{_tail(log)}")
            time.sleep(0.5)
        print(f"dagster dev: serving after {time.monotonic() - started:.1f}s")
        yield WebUI(url, log, process)
    finally:
        _stop(process)


@contextlib.contextmanager
def _instance(home: Path) -> Iterator[dg.DagsterInstance]:
    """The demo's instance, read from this process (its event log storage names DAGSTER_HOME)."""
    saved = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            yield instance
    finally:
        os.environ.pop("DAGSTER_HOME") if saved is None else os.environ.__setitem__("DAGSTER_HOME", saved)


def _wait_for_run(home: Path, run_id: str, timeout_s: float) -> dg.DagsterRun:
    with _instance(home) as instance:
        deadline = time.monotonic() + timeout_s
        while True:
            run = instance.get_run_by_id(run_id)
            if run is not None and run.is_finished:
                return run
            if time.monotonic() > deadline:
                status = run.status if run else "not found"
                pytest.fail(f"run {run_id} not finished after {timeout_s:.0f}s (status: {status})")
            time.sleep(1)


def _run_errors(home: Path, run_id: str) -> str:
    with _instance(home) as instance:
        lines = []
        for entry in instance.all_logs(run_id):
            event = entry.dagster_event
            if entry.error_info or (event and (event.is_step_failure or event.is_run_failure)):
                lines.append(f"{event.event_type_value if event else entry.level}: {entry.user_message}")
                if entry.error_info:
                    lines.append(entry.error_info.to_string())
        return "\n".join(lines)[-6000:]


STATUS_QUERY = """
query($assetKey: AssetKeyInput!) {
  assetNodeOrError(assetKey: $assetKey) { ... on AssetNode {
    assetPartitionStatuses { ... on DefaultPartitionStatuses { materializedPartitions failedPartitions } }
  } }
}"""
STALE_QUERY = """
query($assetKey: AssetKeyInput!) {
  assetNodeOrError(assetKey: $assetKey) { ... on AssetNode { staleStatus staleCauses { reason } } }
}"""
CHECK_QUERY = """
query($assetKey: AssetKeyInput!) {
  assetNodeOrError(assetKey: $assetKey) { ... on AssetNode { assetChecksOrError { ... on AssetChecks { checks {
    name partitionStatuses { ... on AssetCheckDefaultPartitionStatuses { succeededPartitions failedPartitions } }
  } } } } }
}"""
BAD_IDS = {demo_id("bad-html"), demo_id("bad-404"), demo_id("bad-ftp")}  # valid ids whose sync must fail


def _graphql(url: str, query: str, **variables: object) -> dict:
    """What the UI's pages ask the webserver, over the same HTTP endpoint."""
    body = json.dumps({"query": query, "variables": variables}).encode()
    request = urllib.request.Request(f"{url}/graphql", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.loads(response.read())
    assert "errors" not in answer, answer["errors"]
    return answer["data"]["assetNodeOrError"]


def _good_ids() -> set[str]:
    photos = demo_photos()
    kept = {photo.image_id for photo in photos[:DEMO_PHOTOS]}
    return kept | {photo.image_id for photo in photos if photo.duplicate_of in kept}


def test_web_ui_tells_the_truth_and_materializes_dataset_jsonl(web_ui: WebUI, demo_site: DemoSite):
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    for stale in ARTIFACTS.glob("web-ui*.png"):
        stale.unlink()
    started = time.monotonic()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1600, "height": 1000})
        # The community dialog again, browser side (the server side is marked seen in the fixture).
        context.add_init_script("window.localStorage.setItem('communityNux', JSON.stringify('1'));")
        page = context.new_page()
        page.set_default_timeout(30_000)
        run_id = None
        try:
            # The catalog lists every photoset asset of the code location.
            page.goto(f"{web_ui.url}/assets", wait_until="domcontentloaded")
            for name in PHOTOSET_ASSETS:
                link = page.get_by_role("link", name=re.compile(rf"(^|\s){name}$")).first  # "<icon> name"
                expect(link).to_be_visible(timeout=UI_TIMEOUT_MS)

            # The asset graph with every group expanded shows the pipeline end to end.
            page.goto(f"{web_ui.url}/asset-groups", wait_until="domcontentloaded")
            expect(page.get_by_role("button", name=re.compile(r"\bdataset dataset$"))).to_be_visible(timeout=UI_TIMEOUT_MS)
            page.get_by_role("button", name="settings", exact=True).last.click()  # the graph's options menu
            page.get_by_role("menuitem", name=re.compile(r"Expand all groups")).click()
            for name in ("photo_list", "approved_links", "image_facts", "vae_latents", "dataset_jsonl", "webdataset_shards"):
                expect(page.get_by_text(name, exact=True).first).to_be_visible()
            page.keyboard.press("Escape")
            # Let the live status (node colours) arrive before the screenshot; the UI polls, so
            # "network idle" may never come: it only bounds the wait.
            try:
                page.wait_for_load_state("networkidle", timeout=10_000)
            except PlaywrightTimeoutError:
                pass
            page.wait_for_timeout(1500)
            page.screenshot(path=str(ARTIFACTS / "web-ui.png"))

            # The truth, as the UI's pages get it: bad items Failed, good ones Materialized, no Unsynced dataset.
            good = _good_ids()
            for asset, failed in (("approved_links", BAD_IDS), ("image_facts", BAD_IDS), ("t5_hidden", BAD_IDS)):
                statuses = _graphql(web_ui.url, STATUS_QUERY, assetKey={"path": [asset]})["assetPartitionStatuses"]
                assert set(statuses["failedPartitions"]) == failed, (asset, statuses)
                assert set(statuses["materializedPartitions"]) == good, (asset, statuses)
            for asset in ("image_facts", "t5_hidden"):  # the per-image check tells the same in its own view
                (check,) = _graphql(web_ui.url, CHECK_QUERY, assetKey={"path": [asset]})["assetChecksOrError"]["checks"]
                assert set(check["partitionStatuses"]["failedPartitions"]) == BAD_IDS, (asset, check)
                assert set(check["partitionStatuses"]["succeededPartitions"]) == good, (asset, check)
            dataset = _graphql(web_ui.url, STALE_QUERY, assetKey={"path": ["dataset_jsonl"]})
            assert dataset["staleStatus"] == "FRESH", dataset["staleCauses"]
            page.goto(f"{web_ui.url}/assets/approved_links?view=partitions", wait_until="domcontentloaded")
            expect(page.get_by_text("Failed", exact=False).first).to_be_visible(timeout=UI_TIMEOUT_MS)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(ARTIFACTS / "web-ui-partitions.png"))

            # Materialize dataset_jsonl from its page: no models, a second or two of work.
            page.goto(f"{web_ui.url}/assets/dataset_jsonl", wait_until="domcontentloaded")
            expect(page.get_by_text("Latest materialization")).to_be_visible(timeout=UI_TIMEOUT_MS)
            page.get_by_role("button", name=re.compile(r"(^|\s)Materialize$")).click()
            toast = page.get_by_role("region", name=re.compile("Notifications")).get_by_text(re.compile(r"Launched run"))
            expect(toast).to_be_visible()
            view = page.get_by_role("region", name=re.compile("Notifications")).get_by_role("link", name="View")
            href = view.first.get_attribute("href") or ""
            match = re.search(r"/runs/([0-9a-f-]{36})", href)
            assert match, f"no run link in the launch notification: {href!r}"
            run_id = match.group(1)
            view.first.click()
            page.wait_for_url(re.compile(rf"/runs/{run_id}"))

            run = _wait_for_run(demo_site.home, run_id, RUN_TIMEOUT_S)
            assert run.status == dg.DagsterRunStatus.SUCCESS, (
                f"run {run_id} ended {run.status}:\n{_run_errors(demo_site.home, run_id)}"
            )
            assert run.asset_selection == {dg.AssetKey("dataset_jsonl")}
            # The run page shows it too (its header tag), with the materialization in the event log.
            expect(page.get_by_text("Success", exact=True).first).to_be_visible(timeout=60_000)
            expect(page.get_by_text("RUN_SUCCESS").first).to_be_visible(timeout=30_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(ARTIFACTS / "web-ui-run.png"))
        except BaseException:
            try:
                page.screenshot(path=str(ARTIFACTS / "web-ui-failure.png"))
            except Exception as error:  # the browser may be what failed
                print(f"no failure screenshot: {error}")
            print(f"--- page: {page.url}")
            if run_id:
                print(f"--- run {run_id} errors:\n{_run_errors(demo_site.home, run_id)}")
            print(f"--- dagster dev log tail ({web_ui.log}):\n{_tail(web_ui.log, 80)}")
            raise
        finally:
            browser.close()
        _check_the_report(browser_args=CHROMIUM_ARGS, playwright=playwright, data=demo_site.data)
    print(f"browser part: {time.monotonic() - started:.1f}s")

    # The materialization from the UI rebuilt the JSONL over the demo's images.
    with _instance(demo_site.home) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("dataset_jsonl"))
        assert event is not None and event.run_id == run_id
        metadata = event.asset_materialization.metadata
        assert metadata["records"].value == len(_good_ids())
        assert metadata["problems"].value == 0
    assert (demo_site.data / "derived" / "approved_image_dataset.jsonl").is_file()


def _check_the_report(*, browser_args: list[str], playwright, data: Path) -> None:
    """The demo's dataset report, opened from disk: thumbnails drawn, plots, the failed items with their
    reasons, the planted duplicates side by side."""
    report = data / "reports" / "dataset_report.html"
    assert report.is_file()
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=browser_args)
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.goto(report.as_uri(), wait_until="load")
        thumbnails = page.locator("#bucket-grids img")
        for index in range(thumbnails.count()):  # lazy images load once they scroll into view
            thumbnails.nth(index).scroll_into_view_if_needed()
        page.wait_for_function(
            "() => Array.from(document.querySelectorAll('#bucket-grids img')).every(i => i.complete)", timeout=30_000)
        widths = page.evaluate("() => Array.from(document.querySelectorAll('#bucket-grids img')).map(i => i.naturalWidth)")
        assert widths and all(width > 0 for width in widths), widths
        assert page.locator("#plots figure.plot svg").count() == 3
        failures = page.locator("#failure-list").inner_text()
        assert all(bad in failures for bad in BAD_IDS), failures
        assert "HTTP 404" in failures
        photos = demo_photos()
        clusters = page.locator("#cluster-list").inner_text()
        for photo in photos:
            if photo.duplicate_of is not None:
                assert photo.image_id in clusters and photo.duplicate_of in clusters, clusters
        assert "random-weight" in page.locator("#note").inner_text()
        page.screenshot(path=str(ARTIFACTS / "dataset-report-demo.png"), full_page=True)
    finally:
        browser.close()
