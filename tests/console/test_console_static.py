"""How the console is served (no browser): the files, their security headers, the setting that turns it off,
and that everything it needs is package data (so `pip install` carries it)."""

from __future__ import annotations

import re
import tomllib
from collections.abc import AsyncIterator
from fnmatch import fnmatch
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from app.console import STATIC_DIR
from app.main import create_app

ROOT = Path(__file__).resolve().parents[2]


async def _client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    # Static files need no runtime: the lifespan (model, database) is not run.
    transport = httpx.ASGITransport(app=create_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async for c in _client(Settings(data_dir=tmp_path)):
        yield c


async def test_index_and_modules_are_served_with_security_headers(client: httpx.AsyncClient) -> None:
    r = await client.get("/console")
    assert r.status_code == 307 and r.headers["location"].endswith("/console/")
    r = await client.get("/console/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["referrer-policy"] == "no-referrer" and r.headers["x-content-type-options"] == "nosniff"
    for src in re.findall(r'(?:src|href)="(/console/[^"]+)"', r.text):
        assert (await client.get(src)).status_code == 200, src
    for module in sorted((STATIC_DIR / "js").glob("*.js")):
        r = await client.get(f"/console/js/{module.name}")
        assert r.status_code == 200 and "javascript" in r.headers["content-type"], module.name


def test_module_imports_resolve() -> None:
    """Every relative import (static or dynamic) names a file that exists: there is no bundler to catch it."""
    js = STATIC_DIR / "js"
    for module in js.glob("*.js"):
        for target in re.findall(r"""(?:from|import\()\s*'(\./[^']+)'""", module.read_text()):
            assert (js / target).is_file(), f"{module.name} imports {target}"


def test_no_markup_from_strings() -> None:
    """The pages build elements with textContent only: nothing the API returns is parsed as HTML."""
    for module in (STATIC_DIR / "js").glob("*.js"):
        text = module.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in text, f"{module.name} uses {sink}"


async def test_console_can_be_switched_off(tmp_path: Path) -> None:
    async for c in _client(Settings(data_dir=tmp_path, console=False)):
        assert (await c.get("/console/")).status_code == 404
        assert (await c.get("/console/js/app.js")).status_code == 404


def test_static_files_are_package_data() -> None:
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    globs = patterns["app.console"]
    package = STATIC_DIR.parent
    files = [p.relative_to(package).as_posix() for p in STATIC_DIR.rglob("*") if p.is_file()]
    assert files
    for name in files:
        assert any(fnmatch(name, g) and name.count("/") == g.count("/") for g in globs), f"{name} not packaged"
