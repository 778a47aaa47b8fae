"""The dashboard in a real browser: Debian's chromium driven by Playwright (no browser download)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import tiny_preset

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]



@pytest.fixture
def chromium() -> str:
    """Debian's chromium; a skip on a developer's machine without it, a failure under CI (CI=true),
    where `make test` must have installed it."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{CHROMIUM} is missing under CI: `make test` could not install Debian's chromium")
        pytest.skip("Debian's chromium is not installed (make test installs it)")
    return CHROMIUM


def test_dashboard_loads_a_model_and_streams_a_chat(start_router, tiny_model: Path, chromium: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    router = start_router(tiny_preset(tiny_model, ["tiny"], extra="n-predict = 24\n"), "--api-key", "d4sh")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(router.url + "/")
            # With --api-key the page asks for the key first.
            expect(page.locator("#keybox")).to_be_visible(timeout=15_000)
            page.fill("#key", "d4sh")
            page.click("#savekey")
            row = page.locator('tr[data-model="tiny"]')
            expect(row.locator('[data-role="status"]')).to_have_text("unloaded", timeout=15_000)
            # The status feed is subscribed: no event of the load below can be missed.
            expect(page.locator("#conn")).to_have_text("live", timeout=15_000)
            row.locator('[data-role="load"]').click()
            expect(row.locator('[data-role="status"]')).to_have_text("loaded", timeout=60_000)
            events = page.locator("#events")
            expect(events).to_contain_text("tiny: loading")
            text = events.inner_text()
            # Newest first: "loaded" stands above "loading".
            assert text.index("tiny: loaded") < text.index("tiny: loading")

            page.select_option("#chatmodel", "tiny")
            page.fill("#prompt", "hello world")
            page.click("#send")
            expect(page.locator("#chatstate")).to_have_text("done", timeout=60_000)
            assert page.locator("#answer pre").inner_text().strip() != ""
            expect(page.locator("#logs")).to_contain_text("serving tiny on http://", timeout=15_000)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        finally:
            browser.close()


def test_dashboard_shows_hostile_model_names_as_text(start_router, tiny_model: Path, tmp_path: Path,
                                                    chromium: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    hostile = "<img src=x onerror=window.__xss=1>"
    models = tmp_path / "models"
    models.mkdir()
    (models / f"{hostile}.gguf").write_bytes(tiny_model.read_bytes())
    preset = tmp_path / "aliases.ini"
    preset.write_text(f"[plain]\nmodel = {tiny_model}\nalias = <b onmouseover=window.__xss=2>bold</b>\n")
    router = start_router(None, "--models-dir", str(models), "--models-preset", str(preset), "--api-key", "d4sh")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(router.url + "/")
            expect(page.locator("#keybox")).to_be_visible(timeout=15_000)
            page.fill("#key", "d4sh")
            page.click("#savekey")
            row = page.locator("#models tr").filter(has_text=hostile)
            expect(row).to_have_count(1, timeout=15_000)  # the name is text, shown as it is
            expect(page.locator("#models").get_by_text("<b onmouseover=window.__xss=2>bold</b>")).to_have_count(1)
            page.locator("#models tr").first.hover()
            # Nothing of it became markup, so nothing ran; the selects hold it as text too.
            assert page.locator("#models img, #models b, #chatmodel img").count() == 0
            assert page.evaluate("window.__xss") is None
            assert hostile in page.locator("#chatmodel").inner_text()
        finally:
            browser.close()


def test_dashboard_shows_a_peers_models_with_their_source_and_a_peer_going(start_router, tiny_model: Path,
                                                                         chromium: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    node = start_router(tiny_preset(tiny_model, ["tiny"]))
    front = start_router(tiny_preset(tiny_model, ["local"]), "--peers", f"nodeA={node.url}")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(front.url + "/")
            peer_row = page.locator('tr[data-model="tiny@nodeA"]')
            expect(peer_row).to_contain_text("peer nodeA", timeout=15_000)
            expect(page.locator('tr[data-model="local"]')).to_contain_text("preset")
            expect(page.locator("#conn")).to_have_text("live", timeout=15_000)
            node.client.post("/models/load", json={"model": "tiny"})
            expect(peer_row.locator('[data-role="status"]')).to_have_text("loaded", timeout=30_000)
            node.stop()  # the peer goes: its model turns unloaded, with the reason, live
            expect(peer_row.locator('[data-role="status"]')).to_have_text("unloaded", timeout=15_000)
            expect(peer_row).to_contain_text("peer nodeA unreachable", timeout=15_000)
        finally:
            browser.close()
