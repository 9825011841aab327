"""The web chat page at GET / (issue 17): served with a strict CSP, and its script runs in real headless
Chromium under that CSP (it calls /v1/models and shows the server's answer; without the key: the 401)."""

from __future__ import annotations

import shutil
import subprocess

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
