"""The playground page in a real browser: Debian's chromium, headless, driven by Playwright for Python.

``make test`` installs chromium (as it installs Prometheus); without it these tests skip and say why.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from server.app import create_app
from server.config import ServerConfig

SCREENSHOTS = Path(__file__).resolve().parents[1] / ".pytest_cache" / "playground"
PROMPT = "Count from 1 to 12, separated by commas."


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("chromium is not installed (make test installs it with apt-get as root): browser tests skipped")
        pytest.skip("chromium is not installed (make test installs it with apt-get as root)")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield browser
        browser.close()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    page.errors = errors
    return page


def ask(page, prompt: str, compare: bool = False):
    """Send ``prompt`` and wait for the answer (and the plain-decoding comparison, if asked); the answer."""
    page.wait_for_function("document.getElementById('model-meta').textContent.includes('target')")
    page.set_checked("#compare", compare)
    page.fill("#prompt", prompt)
    page.click("#send")
    page.wait_for_selector(".answer[data-done=true]", timeout=120_000)
    return page.locator(".answer").last


def test_an_answer_streams_coloured_tokens_with_a_routed_domain(server, browser):
    page = open_page(browser, server.url)
    answer = ask(page, PROMPT, compare=True)
    spans = answer.locator(".tok")
    assert spans.count() == int(answer.get_attribute("data-completion-tokens")) > 0
    sources = {spans.nth(i).get_attribute("data-source") for i in range(spans.count())}
    assert sources <= {"prefill", "draft", "lookup", "verify", "plain"} and "draft" in sources
    assert "verify step" in spans.nth(1).get_attribute("title")
    domain = answer.locator("[data-field=domain]").inner_text()
    assert domain and domain != "—"
    assert answer.locator(".grid i").count() == 2 * 30  # the default model's 30 layers x {attention, MLP}
    badge = answer.locator(".compare .badge")
    assert "identical" in badge.inner_text() and "same" in badge.get_attribute("class")
    texts = answer.locator(".compare pre")
    assert texts.nth(0).inner_text() == texts.nth(1).inner_text()
    page.wait_for_function("document.getElementById('chart').dataset.samples > 1", timeout=10_000)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "playground.png"), full_page=True)
    print(f"screenshot: {SCREENSHOTS / 'playground.png'}")
    assert not page.errors


def test_a_seeded_sampling_comparison_shows_both_runs(server, browser):
    page = open_page(browser, server.url)
    page.wait_for_function("document.getElementById('model-meta').textContent.includes('target')")
    page.fill("#temperature", "0.8")
    page.fill("#seed", "7")
    page.fill("#max-tokens", "24")
    answer = ask(page, "Write a short line about the sea.", compare=True)
    badge = answer.locator(".compare .badge").inner_text()
    assert "identical texts" in badge and "tokens/s" in badge  # a seed draws the same tokens either way
    assert all(answer.locator(".compare pre").nth(i).inner_text() for i in range(2))
    assert answer.locator(".tok").count() == int(answer.get_attribute("data-completion-tokens"))


def test_plain_decoding_from_the_controls(server, browser):
    page = open_page(browser, f"{server.url}/playground")
    page.wait_for_function("document.getElementById('model-meta').textContent.includes('target')")
    page.uncheck("#speculate")
    page.fill("#max-tokens", "10")
    answer = ask(page, "Name a colour.")
    spans = answer.locator(".tok")
    sources = {spans.nth(i).get_attribute("data-source") for i in range(spans.count())}
    assert sources <= {"prefill", "plain"}
    assert answer.locator("[data-field=policy]").inner_text() == "plain"


def test_with_an_api_key_the_page_asks_for_it(browser):
    from live_server import LiveServer

    with LiveServer("--api-key", "sk-playground") as live:
        page = open_page(browser, live.url)
        page.wait_for_selector("#key-panel:not([hidden])")
        assert "API key" in page.inner_text("#key-message")
        page.fill("#api-key", "sk-wrong")
        page.click("#save-key")
        page.wait_for_function("document.getElementById('key-message').textContent.includes('Incorrect')")
        page.fill("#api-key", "sk-playground")
        page.click("#save-key")
        answer = ask(page, "Say hello.")
        assert answer.locator(".tok").count() == int(answer.get_attribute("data-completion-tokens"))
        assert httpx.get(f"{live.url}/v1/models").status_code == 401  # the page's key stayed in the page


@pytest.mark.parametrize("ui", [True, False])
def test_no_ui_serves_no_page(ui):
    paths = {route.path for route in create_app(ServerConfig(ui=ui), loaded=None).routes}
    assert {"/", "/playground"} <= paths if ui else not {"/", "/playground"} & paths
