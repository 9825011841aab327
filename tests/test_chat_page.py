"""The web chat page at GET / (issue 17): served with a strict CSP, and its script runs in real headless
Chromium under that CSP (it calls /v1/models and shows the server's answer; without the key: the 401)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from test_server import ServerProc


@pytest.fixture(scope="module")
def server(tiny_dbrx, tmp_path_factory):
    srv = ServerProc(tiny_dbrx, tmp_path_factory.mktemp("serve") / "server.log", nodes=1)
    yield srv
    srv.stop()


def test_page_is_served_with_csp(server):
    r = httpx.get(server.url + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp and "connect-src 'self'" in csp
    assert "innerHTML" not in r.text and "http" not in r.text.replace("http-equiv", "")  # no external resources
    assert "/v1/chat/completions" in r.text and "textContent" in r.text


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_page_script_runs_in_chromium(server, tmp_path):
    out = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            server.url + "/",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert 'id="status">invalid or missing API key' in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


@pytest.mark.multirank
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_chat_in_chromium_streams_and_shows_the_cluster(tmp_path):
    """A person's path through the page in real headless Chromium (driven by playwright): enter the API key, type
    a message, watch the reply stream in (several updates before the end), see both ranks and the live numbers in
    the side panel; a screenshot is kept (tmp_path, and $MOECLUSTER_TEST_ARTIFACTS when set)."""
    import os

    from test_server import KEY

    from moecluster.builtin import DEMO_MODEL_DIR

    sync_api = pytest.importorskip("playwright.sync_api")
    srv = ServerProc(DEMO_MODEL_DIR, tmp_path / "server.log", nodes=2)  # the trained demo model: readable text
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.goto(srv.url + "/")

            def wait_text(selector: str, predicate, timeout_s: float = 60.0) -> str:
                """Poll an element's text through the DevTools protocol (the page's CSP forbids eval, which
                playwright's wait_for_function needs)."""
                deadline = time.monotonic() + timeout_s
                while True:
                    text = page.text_content(selector) or ""
                    if predicate(text):
                        return text
                    assert time.monotonic() < deadline, f"{selector}: {text!r}"
                    time.sleep(0.1)

            wait_text("#status", lambda t: "API key" in t)  # the 401 of /v1/models, shown before a key is given
            page.fill("#key", KEY)
            page.dispatch_event("#key", "change")
            wait_text("#model", lambda t: t.startswith("model: "))
            page.fill("#max_tokens", "64")
            page.fill("#temperature", "0")
            page.evaluate(  # count the reply's updates as the page makes them (DevTools evaluation: not under the CSP)
                "window.updates = 0; new MutationObserver(() => window.updates++)"
                ".observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true})"
            )
            page.fill("#input", "What does the function return?")
            page.press("#input", "Enter")
            wait_text("#status", lambda t: t.startswith("finished"), 90.0)
            assert page.evaluate("window.updates") > 3  # streamed in pieces, not set once at the end
            assert page.text_content(".msg.user") == "What does the function return?"
            assert page.text_content(".msg.assistant")
            ranks = wait_text("#ranks", lambda t: "rank 1: experts" in t)
            assert "2 rank(s)" in ranks
            wait_text("#live", lambda t: "decode step" in t and "tok/s" in t)
            shots = [tmp_path / "chat_page.png"]
            if os.environ.get("MOECLUSTER_TEST_ARTIFACTS"):
                shots.append(Path(os.environ["MOECLUSTER_TEST_ARTIFACTS"]) / "chat_page.png")
            for shot in shots:
                page.screenshot(path=str(shot))
                assert shot.stat().st_size > 10_000
            browser.close()
    finally:
        srv.stop()
