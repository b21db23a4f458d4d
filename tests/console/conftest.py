"""The web console's browser tests: one real `prefixserve serve` process (random:tiny-llama, SQLite, the
in-process training worker) and headless Debian Chromium driven by Playwright, shared by a module.

Chromium is the system's (/usr/bin/chromium, `apt-get install -y chromium`; `make test` and .ci/run install it
when missing). Playwright's own browser download is never used. A missing browser FAILS these tests: they are
deselected only on purpose (`-m "not browser"`). Screenshots of every page go to console-screenshots/ (or
$PREFIXSERVE_TEST_SCREENSHOTS) for review.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server_proc import ServerProcess

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ADMIN_KEY = "console-test-admin-key-0123456789"
WAIT_MS = 60_000  # the longest a page event is awaited (a busy 2-core machine); it normally comes in < 1 s
SCREENSHOTS = Path(os.environ.get("PREFIXSERVE_TEST_SCREENSHOTS", "console-screenshots"))


@dataclass
class Console:
    """The server under test and two tenants' keys (`other` proves isolation)."""

    server: ServerProcess
    key: str
    other_key: str

    @property
    def url(self) -> str:
        return self.server.url

    def api(self, method: str, path: str, *, key: str | None = None, **kw: Any) -> httpx.Response:
        return httpx.request(method, self.url + path, headers={"Authorization": f"Bearer {key or self.key}"},
                             timeout=30, **kw)


def _tenant_key(url: str, name: str) -> str:
    r = httpx.post(url + "/admin/tenants", json={"name": name}, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 201, r.text
    key: str = r.json()["api_key"]
    return key


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    tmp = tmp_path_factory.mktemp("console")
    server = ServerProcess(tmp / "server.log", {
        "PREFIXSERVE_DATA_DIR": str(tmp / "data"), "PREFIXSERVE_ADMIN_KEY": ADMIN_KEY,
        "PREFIXSERVE_JOB_QUEUE": "inprocess"})
    try:
        server.wait_ready()
        yield Console(server, _tenant_key(server.url, "acme"), _tenant_key(server.url, "globex"))
    finally:
        server.stop()
        print(f"--- server log (tail)\n{server.log_tail()}")  # shown by pytest on failure


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: the console's browser tests need it (`apt-get install -y chromium`; "
                    "`make test` installs it). Deselect them on purpose with -m 'not browser'.")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, console: Console) -> Iterator[Any]:
    """A fresh tab (its own sessionStorage) whose script errors and Content-Security-Policy violations fail the
    test (the API's refusals the tests provoke are logged by the browser too, and are not errors here)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    context.set_default_timeout(WAIT_MS)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.on("console", lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None)
    yield tab
    context.close()
    assert not errors, f"script errors in the console: {errors}"


def shot(page: Any, name: str) -> None:
    """A full-page screenshot for review (console-screenshots/<name>.png)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def sign_in(page: Any, console: Console, key: str, heading: str = "Prefixes") -> None:
    page.goto(console.url + "/console")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", name=heading, level=1).wait_for()


def drop_files(page: Any, selector: str, files: dict[str, bytes]) -> None:
    """Drop files on an element as a user dragging them from a file manager does (a `drop` DataTransfer)."""
    payload = [{"name": name, "b64": base64.b64encode(data).decode()} for name, data in files.items()]
    transfer = page.evaluate_handle("""files => {
        const dt = new DataTransfer();
        for (const f of files) {
            const bytes = Uint8Array.from(atob(f.b64), c => c.charCodeAt(0));
            dt.items.add(new File([bytes], f.name));
        }
        return dt;
    }""", payload)
    page.dispatch_event(selector, "dragover", {"dataTransfer": transfer})
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})
