"""The search page in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by
selenium): type two turns, see the passages for the conversation, reset; save a screenshot.

The screenshot goes to $CHATRETRIEVER_SCREENSHOT when set (`make screenshot`), else to the test's
tmp dir. Skips, saying why, when chromium or its driver is not installed (`make browser`).
"""

from __future__ import annotations

import os
import shutil
from importlib import resources
from pathlib import Path

import pytest
from fakes import HashEncoder
from server_helpers import KEY, make_app, running_server

from chatretriever.retrieval.corpus_index import build_corpus_index

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="chromium and chromedriver are not installed (`make browser`: apt-get install "
    "chromium chromium-driver)",
)
WAIT = 20  # seconds for the page to answer


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    """A real server with an API key over the shipped demo corpus, indexed by the fake encoder."""
    corpus = Path(str(resources.files("chatretriever") / "assets" / "demo" / "corpus.jsonl"))
    encoder = HashEncoder(dim=256)
    out = tmp_path_factory.mktemp("page") / "idx"
    build_corpus_index(encoder, "fake:", corpus, out)
    with running_server(make_app(out, encoder, api_keys=(KEY,))) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(arg)
    options.add_argument("--disable-dev-shm-usage")
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _screenshot_path(tmp_path: Path) -> Path:
    target = os.environ.get("CHATRETRIEVER_SCREENSHOT")
    path = Path(target) if target else tmp_path / "page.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _ask(browser, text: str, turns: int) -> list:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    box = browser.find_element(By.ID, "turn-input")
    box.send_keys(text)
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, WAIT).until(
        ec.text_to_be_present_in_element((By.ID, "status"), f"for {turns} turn(s)")
    )
    return browser.find_elements(By.CSS_SELECTOR, "#results li.hit")


def test_two_turns_show_the_passages_for_the_conversation(base_url, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(base_url + "/")
    key_row = browser.find_element(By.ID, "key-row")
    WebDriverWait(browser, WAIT).until(lambda d: key_row.is_displayed())  # the server wants a key
    assert "266 passages" in browser.find_element(By.ID, "server-info").text
    browser.find_element(By.ID, "api-key").send_keys(KEY)

    first = _ask(browser, "How can I tell a jaguar from a leopard?", 1)
    assert len(first) == 5 and all(h.find_element(By.CLASS_NAME, "hit-text").text for h in first)
    first_ids = [h.get_attribute("data-id") for h in first]
    hits = _ask(browser, "What do they eat?", 2)
    turns = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "#turns li")]
    assert turns == ["How can I tell a jaguar from a leopard?", "What do they eat?"]
    assert len(hits) == 5 and browser.find_element(By.ID, "turn-input").get_attribute("value") == ""
    # the second results are for the whole conversation: a big-cat passage is still on top
    top_title = hits[0].find_element(By.CLASS_NAME, "hit-title").text
    assert [h.get_attribute("data-id") for h in hits] != first_ids
    assert any(word in (top_title + hits[0].text).lower() for word in ("jaguar", "leopard", "cat"))
    browser.save_screenshot(str(_screenshot_path(tmp_path)))
    assert _screenshot_path(tmp_path).stat().st_size > 10_000

    browser.find_element(By.ID, "reset").click()
    WebDriverWait(browser, WAIT).until(ec.text_to_be_present_in_element((By.ID, "status"), "new"))
    assert not browser.find_elements(By.CSS_SELECTOR, "#turns li, #results li")


def test_a_wrong_key_is_shown_not_thrown(base_url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(base_url + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.get(base_url + "/")
    key = browser.find_element(By.ID, "api-key")
    WebDriverWait(browser, WAIT).until(lambda d: key.is_displayed())
    key.clear()
    key.send_keys("wrong-key-0123456789abcdef")
    browser.find_element(By.ID, "turn-input").send_keys("jaguars")
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, WAIT).until(ec.text_to_be_present_in_element((By.ID, "status"), "401"))
    assert "invalid or missing API key" in browser.find_element(By.ID, "status").text
    assert not browser.find_elements(By.CSS_SELECTOR, "#turns li")  # the turn was not kept
