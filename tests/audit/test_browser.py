"""Open the HTML audit report in a real headless Chromium and check it renders cleanly.

Chromium is driven over ``--remote-debugging-pipe`` with the DevTools protocol (CDP), so
the test sees what a browser sees: console errors, failed or network loads, CSP
violations, script dialogs, the DOM after load, whether the embedded plots decode, and
a screenshot. No extra Python package is needed; only the ``chromium`` Debian package.

Skipped when chromium is not installed, except under CI (``CI`` set), where it fails.
Set ``MEDFED_AUDIT_SCREENSHOT=PATH`` to keep the screenshot of the test's sample report
(``docs/audit-report.png`` shows a real run's report instead; see docs/audit.md).
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
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from medfed.audit.render import SECTIONS, render_html
from tests.audit.report_fixture import sample_report

WIDTH, HEIGHT = 1280, 2400
CALL_TIMEOUT_S = 30.0
SCREENSHOT_ENV = "MEDFED_AUDIT_SCREENSHOT"
SCREENSHOT_MAX_BYTES = 400_000
HOSTILE_ID = '<script>alert("site")</script><img src=x onerror=alert(1)>'

DOM_PROBE = """JSON.stringify({
  headings: [...document.querySelectorAll('h2[id]')].map(h => h.textContent),
  scripts: document.scripts.length,
  frames: document.querySelectorAll('iframe, object, embed').length,
  handlers: [...document.querySelectorAll('*')]
    .filter(e => [...e.attributes].some(a => a.name.startsWith('on'))).length,
  images: [...document.images].map(i => i.complete && i.naturalWidth > 0),
  text: document.body.innerText,
})"""


class Chromium:
    """Headless Chromium driven over a CDP pipe: NUL-terminated JSON on fds 3 (in) and 4 (out)."""

    def __init__(self, executable: str, workdir: Path) -> None:
        self.events: list[dict[str, Any]] = []
        self._next_id = 0
        self._buffer = b""
        to_child, self._to_browser = os.pipe()
        self._from_browser, from_child = os.pipe()
        # Move the child's ends above fd 4 so that dup2 onto 3 and 4 cannot clobber them.
        child_in = fcntl.fcntl(to_child, fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(from_child, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_child)
        os.close(from_child)
        self.log_path = workdir / "chromium.log"
        try:
            self.process = self._launch(executable, workdir, child_in, child_out)
        finally:
            os.close(child_in)
            os.close(child_out)

    def _launch(self, executable: str, workdir: Path, fd_in: int, fd_out: int) -> subprocess.Popen:
        def wire_pipe() -> None:  # runs in the child before exec
            os.dup2(fd_in, 3)
            os.dup2(fd_out, 4)

        args = [executable, "--headless=new", "--no-sandbox", "--disable-gpu",
                "--remote-debugging-pipe", f"--user-data-dir={workdir / 'profile'}",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-dev-shm-usage",
                "--disable-component-update", "--hide-scrollbars", "--mute-audio",
                f"--window-size={WIDTH},{HEIGHT}", "about:blank"]  # fmt: skip
        with self.log_path.open("wb") as log:
            return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, close_fds=False,
                                    preexec_fn=wire_pipe, start_new_session=True)  # fmt: skip

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send one CDP command and return its result; events seen meanwhile are kept."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while True:
            reply = self._read(deadline, method)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"CDP {method} failed: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, methods: tuple[str, ...], session: str) -> dict:
        """The first event from ``session`` named in ``methods``, reading until one arrives."""
        deadline = time.monotonic() + CALL_TIMEOUT_S
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event.get("method") in methods and event.get("sessionId") == session:
                    return event
            seen = len(self.events)
            self.events.append(self._read(deadline, " or ".join(methods)))

    def _read(self, deadline: float, waiting_for: str) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._from_browser], [], [], max(left, 0.0))
            if not ready:
                raise TimeoutError(f"chromium did not answer {waiting_for} in {CALL_TIMEOUT_S}s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium closed the pipe; log: {self.log_tail()}")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def close(self) -> None:
        """Ask the browser to quit, then kill its whole process group whatever happened."""
        try:
            if self.process.poll() is None:
                self.call("Browser.close")
                self.process.wait(timeout=10)
        except (OSError, RuntimeError, TimeoutError, subprocess.TimeoutExpired):
            pass
        finally:
            # Chromium's helpers (renderer, GPU, zygote) share the group started for it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
            os.close(self._to_browser)
            os.close(self._from_browser)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def chromium_executable() -> str:
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium is not installed")
    return executable


@pytest.fixture(scope="module")
def browser(
    chromium_executable: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Chromium]:
    chromium = Chromium(chromium_executable, tmp_path_factory.mktemp("chromium"))
    try:
        yield chromium
    finally:
        chromium.close()


def open_page(browser: Chromium, path: Path) -> tuple[str, list[dict[str, Any]]]:
    """Load ``path`` in a fresh tab; return its CDP session and the events of the load."""
    target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
        "sessionId"
    ]
    for domain in ("Page", "Runtime", "Log", "Network"):
        browser.call(f"{domain}.enable", session=session)
    metrics = {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False}
    browser.call("Emulation.setDeviceMetricsOverride", metrics, session=session)
    first_event = len(browser.events)
    navigation = browser.call("Page.navigate", {"url": path.as_uri()}, session=session)
    assert "errorText" not in navigation, navigation
    # A script dialog would block the load event: stop on either (a dialog means script ran).
    loaded = browser.wait_for(("Page.loadEventFired", "Page.javascriptDialogOpening"), session)
    assert loaded["method"] == "Page.loadEventFired", f"the page opened a dialog: {loaded}"
    events = [e for e in browser.events[first_event:] if e.get("sessionId") == session]
    return session, events


def probe_dom(browser: Chromium, session: str) -> dict[str, Any]:
    params = {"expression": DOM_PROBE, "returnByValue": True}
    result = browser.call("Runtime.evaluate", params, session=session)
    return json.loads(result["result"]["value"])


def page_problems(events: list[dict[str, Any]]) -> list[str]:
    """Console errors, exceptions, failed loads, CSP reports, dialogs and non-local requests."""
    problems = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Log.entryAdded" and params["entry"].get("level") == "error":
            problems.append(f"log error: {params['entry'].get('text')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            problems.append(f"console.{params['type']}: {params.get('args')}")
        elif method in ("Runtime.exceptionThrown", "Page.javascriptDialogOpening"):
            problems.append(f"{method}: {params}")
        elif method == "Network.loadingFailed":
            problems.append(f"failed load: {params.get('errorText')}")
        elif method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            if not url.startswith(("file:", "data:")):
                problems.append(f"network request: {url}")
    return problems


# -------------------------------------------------------------------------------- tests


def test_report_renders_in_chromium(browser: Chromium, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(render_html(sample_report()), encoding="utf-8")
    session, events = open_page(browser, page)
    dom = probe_dom(browser, session)

    assert page_problems(events) == [], browser.log_tail()
    assert dom["headings"] == [title for _, title in SECTIONS]
    assert dom["images"] == [True, True, True]  # one decoded epsilon plot per site
    assert dom["scripts"] == 0
    assert "PASS" in dom["text"]
    assert "FLAGGED" in dom["text"]

    png = base64.b64decode(
        browser.call("Page.captureScreenshot", {"format": "png"}, session)["data"]
    )
    assert png.startswith(b"\x89PNG") and len(png) > 20_000  # not a blank page
    if target := os.environ.get(SCREENSHOT_ENV):
        save_screenshot(png, Path(target))


def test_hostile_ledger_text_stays_inert(browser: Chromium, tmp_path: Path) -> None:
    report = sample_report()
    report["sites"][0]["site_id"] = HOSTILE_ID
    report["sites"][1]["rounds"][3]["reason"] = '<iframe src="https://evil.example/"></iframe>'
    report["verification"]["problems"] = [{"where": HOSTILE_ID, "what": "<b>bad</b>"}]
    page = tmp_path / "hostile.html"
    page.write_text(render_html(report), encoding="utf-8")
    session, events = open_page(browser, page)
    dom = probe_dom(browser, session)

    assert page_problems(events) == [], browser.log_tail()
    assert (dom["scripts"], dom["frames"], dom["handlers"]) == (0, 0, 0)
    assert HOSTILE_ID in dom["text"]  # shown as text, not run
    assert '<iframe src="https://evil.example/"></iframe>' in dom["text"]


def save_screenshot(png: bytes, target: Path) -> None:
    """Write a palette PNG (text screenshots survive 256 colours) to keep the docs small."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    buffer = io.BytesIO()
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(buffer, "PNG", optimize=True)
    assert buffer.tell() < SCREENSHOT_MAX_BYTES, f"screenshot is {buffer.tell()} bytes"
    target.write_bytes(buffer.getvalue())


def test_fairness_section_renders_in_chromium(browser: Chromium, tmp_path: Path) -> None:
    from tests.audit.fairness_fixture import fairness_part

    report = sample_report()
    report["fairness"] = fairness_part()
    report["fairness"]["suppressed"][HOSTILE_ID] = [HOSTILE_ID]
    page = tmp_path / "fairness.html"
    page.write_text(render_html(report), encoding="utf-8")
    session, events = open_page(browser, page)
    dom = probe_dom(browser, session)

    assert page_problems(events) == [], browser.log_tail()
    assert dom["headings"][-1] == "Fairness"
    assert (dom["scripts"], dom["frames"], dom["handlers"]) == (0, 0, 0)
    fairness = dom["text"][dom["text"].rindex("Fairness") :]
    assert "UNSIGNED" in fairness and "not signed" in fairness
    assert "age=<50" in fairness and "age=65+" in fairness
    assert f"{HOSTILE_ID}: {HOSTILE_ID}" in fairness  # shown as text, not run
