"""The report of the bundled sample, rendered in headless Chromium.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
JSON messages separated by NUL on fds 3 and 4), so the test needs no extra package. It
checks that the page loads with no console error or exception, requests nothing from
the network, draws its plots and thumbnail grids (images decoded from data: URIs), and
that a full-page screenshot is a real, non-blank PNG.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import io
import json
import os
import select
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from filtering.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--hide-scrollbars",
    "--mute-audio",
]

pytestmark = [
    pytest.mark.slow,  # runs the CLI (make test-fast leaves these out)
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs Debian's chromium)"),
]


class Browser:
    """A minimal DevTools-protocol client over Chromium's debugging pipe."""

    def __init__(self, user_data_dir: Path):
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()
        # Move the child's ends above fd 10 first, so the dup2 to 3 and 4 cannot clobber them.
        a = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD_CLOEXEC, 10)
        b = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD_CLOEXEC, 10)
        self.log_path = user_data_dir / "chrome.log"
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        args = [CHROMIUM, *FLAGS, f"--user-data-dir={user_data_dir}", "--remote-debugging-pipe", "about:blank"]
        self.pid = os.posix_spawn(
            CHROMIUM,
            args,
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, a, 3),
                (os.POSIX_SPAWN_DUP2, b, 4),
                (os.POSIX_SPAWN_DUP2, log, 1),
                (os.POSIX_SPAWN_DUP2, log, 2),
            ],
        )
        for fd in (to_chrome_r, from_chrome_w, a, b, log):
            os.close(fd)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError(f"no answer from chromium; its log: {self.log_path.read_text()[-2000:]}")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise ConnectionError(f"chromium closed the pipe; its log: {self.log_path.read_text()[-2000:]}")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        while True:
            msg = self._read(deadline)
            if msg.get("method") == method:
                return msg
            self.events.append(msg)

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError, TimeoutError, ConnectionError):
            self.send("Browser.close", timeout=5)
        for _ in range(50):
            if os.waitpid(self.pid, os.WNOHANG)[0]:
                break
            time.sleep(0.1)
        else:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        os.close(self._w)
        os.close(self._r)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


PAGE_FACTS = """JSON.stringify({
  sections: [...document.querySelectorAll('section')].map(s => s.id),
  plots: [...document.querySelectorAll('svg.plot')].map(s => s.getAttribute('class')),
  keptBars: document.querySelectorAll('svg.histogram rect.kept').length,
  droppedBars: document.querySelectorAll('svg.histogram rect.dropped').length,
  thresholds: document.querySelectorAll('svg.histogram .threshold').length,
  funnelRows: document.querySelectorAll('svg.funnel .funnel-row').length,
  grids: [...document.querySelectorAll('#scores .grid-cards')].map(g => g.querySelectorAll('img').length),
  images: document.images.length,
  dataImages: [...document.images].filter(i => i.src.startsWith('data:image/jpeg;base64,')).length,
  decoded: [...document.images].filter(i => i.complete && i.naturalWidth > 0).length,
  failureCards: document.querySelectorAll('#failures .card').length,
  clusterCards: document.querySelectorAll('#clusters .card img').length,
  duplicateCards: document.querySelectorAll('#duplicates .card img').length,
  height: document.documentElement.scrollHeight,
  sweepLabelOverlaps: [...document.querySelectorAll('svg.sweep text')].filter(t => t.textContent.startsWith('this run'))
    .flatMap(mark => [...document.querySelectorAll('svg.sweep text')].filter(t => t !== mark).filter(t => {
      const a = mark.getBoundingClientRect(), b = t.getBoundingClientRect();
      return a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;
    }).map(t => t.textContent)),
  sweepMarks: [...document.querySelectorAll('svg.sweep text')].filter(t => t.textContent.startsWith('this run')).length,
  clippedReasons: [...document.querySelectorAll('.card .reason, .card .why')]
    .filter(e => e.scrollWidth > e.clientWidth + 1 || e.scrollHeight > e.clientHeight + 1).map(e => e.textContent),
})"""


def render(browser: Browser, html: Path) -> tuple[dict, list[dict], list[str], bytes]:
    """Load ``html`` in a fresh tab: (page facts, console errors, network requests, screenshot PNG)."""
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    browser.events.clear()
    for domain in ("Page", "Runtime", "Log", "Network"):
        browser.send(f"{domain}.enable", session=session)
    browser.send(
        "Emulation.setDeviceMetricsOverride",
        {"width": 1280, "height": 4000, "deviceScaleFactor": 1, "mobile": False},
        session=session,
    )
    browser.send("Page.navigate", {"url": html.resolve().as_uri()}, session=session)
    browser.wait_event("Page.loadEventFired")
    facts = json.loads(
        browser.send("Runtime.evaluate", {"expression": PAGE_FACTS, "returnByValue": True}, session=session)["result"][
            "value"
        ]
    )
    shot = browser.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=session)
    errors = []
    requests = []
    for e in browser.events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.exceptionThrown":
            errors.append(p["exceptionDetails"].get("text", "exception"))
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            errors.append(json.dumps(p.get("args")))
        elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
            errors.append(p["entry"].get("text", ""))
        elif m == "Network.requestWillBeSent":
            requests.append(p["request"]["url"])
    browser.send("Target.closeTarget", {"targetId": target})
    return facts, errors, requests, base64.b64decode(shot["data"])


def check_screenshot(png: bytes) -> Image.Image:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    img = Image.open(io.BytesIO(png)).convert("RGB")
    assert img.width == 1280 and img.height >= 2000
    px = np.asarray(img.resize((320, img.height // 4)))
    assert px.std() > 20, "the screenshot is blank"
    assert len(np.unique(px.reshape(-1, 3), axis=0)) > 500, (
        "the screenshot has too few colours to hold plots and photos"
    )
    return img


def test_sample_report_renders_in_chromium(browser, scored_sample, tmp_path):
    html = Path(write_report(str(scored_sample), output=str(tmp_path / "report.html")))
    text = html.read_text()
    for external in ('src="http', "src='http", 'href="http', "<link", "<script src", "url(http", "@import"):
        assert external not in text  # self-contained: nothing to fetch at view time

    facts, errors, requests, png = render(browser, html)

    assert errors == []
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []
    manifest = json.loads((scored_sample / "manifest.json").read_text())
    assert facts["sections"][:3] == ["funnel", "scores", "failures"] and facts["sections"][-1] == "provenance"
    assert {"plot funnel", "plot histogram"} <= set(facts["plots"])
    assert facts["funnelRows"] == 3 + len(manifest["counts"]["filters"])  # input, failed, filters..., kept
    assert facts["keptBars"] >= 1 and facts["droppedBars"] >= 1 and facts["thresholds"] == 1
    # three grids (best kept, weakest kept, best dropped), each of real thumbnails
    kept = manifest["counts"]["kept"]
    assert facts["grids"][:2] == [min(12, kept)] * 2 and len(facts["grids"]) == 3 and facts["grids"][2] > 0
    assert facts["dataImages"] == facts["images"] == facts["decoded"] >= sum(facts["grids"])
    assert facts["failureCards"] == min(12, manifest["counts"]["failed"]) > 0
    assert facts["clippedReasons"] == []  # reasons wrap whole, none cut mid-word
    check_screenshot(png)


def test_cluster_and_duplicate_sections_render(browser, clustered_run):
    facts, errors, _, png = render(browser, clustered_run / "report.html")

    assert errors == []
    assert {"clusters", "duplicates"} <= set(facts["sections"])
    assert "plot bars" in facts["plots"]
    assert facts["clusterCards"] > 0 and facts["duplicateCards"] > 0
    assert facts["clippedReasons"] == []  # "duplicate", not "duplic…"
    assert facts["dataImages"] == facts["images"] == facts["decoded"] >= facts["clusterCards"] + facts["duplicateCards"]
    check_screenshot(png)


def test_the_sweeps_this_run_label_overlaps_no_other_label(browser, rerun_dir, tmp_path):
    """The "this run" label sat on the highest point's value label."""
    from tests.conftest import run_cli, write_config

    cfg = write_config(
        tmp_path / "c.yaml", filters=[{"clip_score": {"min": 0.5}}], output={"dir": str(rerun_dir), "report": True}
    )
    assert run_cli("run", cfg, "--quiet")[0] == 0
    code, _, stderr = run_cli("sweep", cfg, "--param", "filters[0].clip_score.min=0.5,0.55,0.6", "--quiet")
    assert code == 0, stderr
    facts, errors, _, _ = render(browser, rerun_dir / "report.html")
    assert errors == []
    assert facts["sweepMarks"] == 1 and facts["sweepLabelOverlaps"] == []
