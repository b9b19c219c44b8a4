"""The web page in a real headless Chromium: upload a photo, read the answer, save a screenshot."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from ..conftest import http

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WINDOW = (1280, 900)

if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    pytest.skip(
        "headless browser missing: install Debian packages chromium and chromium-driver (./install_script.sh --dev)",
        allow_module_level=True,
    )
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium missing: ./install_script.sh --dev")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console messages, failed loads
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.set_window_size(*WINDOW)
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def site(spawn) -> str:
    servers = [spawn("serve", "--port", "0", "--threads", "1", "--name", f"server{i}", wait=False) for i in (1, 2)]
    urls = [s.wait_url() for s in servers]
    return spawn("balance", "--port", "0", "--backends", ",".join(urls)).url


def _panel(driver) -> str:
    """The backends panel's text, read atomically (its rows are replaced every 2 s)."""
    return driver.execute_script("return document.getElementById('backends').innerText")


def _rows(driver) -> list[dict]:
    """The panel's rows as {url, name, answered, served}, read in one script call."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#backends tr[data-url]')].map(r => ({url: r.dataset.url,"
        " name: r.dataset.name, answered: r.classList.contains('answered'),"
        " served: r.querySelector('td.served').innerText}))"
    )


def _open(driver, site: str) -> WebDriverWait:
    """Load the page and wait until the panel names both servers (after their first health check)."""
    driver.get(site + "/")
    wait = WebDriverWait(driver, 30)
    wait.until(lambda d: "server1" in _panel(d) and "server2" in _panel(d))
    return wait


def _classify(driver, wait: WebDriverWait, photo: Path) -> None:
    driver.find_element(By.ID, "file").send_keys(str(photo))
    wait.until(ec.element_to_be_clickable((By.ID, "submit"))).click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .pred") or d.find_element(By.ID, "error").text)


def _severe(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_upload_parrot_shows_macaw(browser, site: str, images_dir: Path, artifacts: Path) -> None:
    wait = _open(browser, site)
    browser.get_log("browser")  # start from an empty console
    _classify(browser, wait, images_dir / "parrot.jpg")
    preds = browser.find_elements(By.CSS_SELECTOR, "#results .pred")
    assert len(preds) == 5
    assert "macaw" in preds[0].text
    # scores: percentages with one decimal
    for pred in preds:
        assert re.search(r"\d+\.\d%$", pred.find_element(By.CSS_SELECTOR, ".score").text), pred.text
    meta = browser.find_element(By.ID, "meta").text
    assert re.fullmatch(r"Answered by server[12] in \d+\.\d ms round trip", meta), meta
    # every millisecond figure on the page has exactly one decimal
    timing = browser.find_element(By.ID, "timing").text
    assert "inference" in timing and "ms" in timing
    for number in re.findall(r"([\d.]+) ms", timing + " " + meta):
        assert re.fullmatch(r"\d+\.\d", number), (number, timing)
    assert browser.find_element(By.ID, "preview").is_displayed()
    # the served counts, read in one script call: the panel rebuilds its rows every 2 s
    wait.until(lambda d: "1" in [r["served"] for r in _rows(d)])
    browser.save_screenshot(str(artifacts / "page-parrot.png"))
    assert (artifacts / "page-parrot.png").stat().st_size > 10_000
    assert _severe(browser) == []


def test_answering_server_row_is_highlighted(browser, site: str, images_dir: Path, artifacts: Path) -> None:
    wait = _open(browser, site)
    _classify(browser, wait, images_dir / "cat.bmp")
    meta = browser.find_element(By.ID, "meta")
    server, backend = meta.get_attribute("data-server"), meta.get_attribute("data-backend")
    assert server in ("server1", "server2") and f"Answered by {server} " in meta.text

    def highlighted(driver) -> list[dict]:
        return [r for r in _rows(driver) if r["answered"]]

    wait.until(lambda d: highlighted(d))
    rows = highlighted(browser)
    assert len(rows) == 1 and rows[0]["name"] == server and rows[0]["url"] == backend
    # still highlighted after the next periodic refresh rebuilds the rows
    seen = int(browser.find_element(By.ID, "backends").get_attribute("data-refreshes"))
    wait.until(lambda d: int(d.find_element(By.ID, "backends").get_attribute("data-refreshes")) > seen)
    rows = highlighted(browser)
    assert len(rows) == 1 and rows[0]["name"] == server
    # and it looks different: its cells have a background the other row's cells lack (read in one call)
    text, mine, other = browser.execute_script(
        "const a = document.querySelector('#backends tr.answered'), b = document.querySelector('#backends tr:not(.answered)');"
        " const bg = (r) => getComputedStyle(r.cells[0]).backgroundColor; return [a.innerText, bg(a), bg(b)]"
    )
    assert server in text and mine != other, (text, mine, other)
    browser.save_screenshot(str(artifacts / "page-highlight.png"))


def test_summary_is_above_the_fold(browser, site: str, images_dir: Path, artifacts: Path) -> None:
    wait = _open(browser, site)
    _classify(browser, wait, images_dir / "grace_hopper.bmp")
    browser.execute_script("window.scrollTo(0, 0)")
    box = browser.execute_script(
        "const r = document.getElementById('meta').getBoundingClientRect();"
        " return {top: r.top + scrollY, bottom: r.bottom + scrollY, fold: innerHeight, width: innerWidth}"
    )
    assert box["width"] <= WINDOW[0]
    assert 0 < box["top"] < box["bottom"] <= min(WINDOW[1], box["fold"]), box
    browser.save_screenshot(str(artifacts / "page-fold.png"))


def test_favicon_is_inline_and_console_is_clean(browser, site: str) -> None:
    browser.get_log("browser")
    _open(browser, site)
    href = browser.execute_script("return document.querySelector('link[rel=icon]').href")
    assert href.startswith("data:image/png;base64,")
    size = browser.execute_async_script(
        "const done = arguments[arguments.length - 1], img = new Image();"
        " img.onload = () => done([img.naturalWidth, img.naturalHeight]); img.onerror = () => done(null);"
        " img.src = document.querySelector('link[rel=icon]').href;"
    )
    assert size == [32, 32]
    # nothing failed to load (a missing /favicon.ico would show here as a 404) and nothing was logged as an error
    assert _severe(browser) == []
    # every resource the page fetched came from the balancer itself
    names = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert names and all(n.startswith(site + "/") or n.startswith("data:") for n in names), names


def test_page_loads_nothing_from_outside(site: str) -> None:
    status, _, body = http("GET", site + "/")
    assert status == 200
    page = body.decode()
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""(src|href)=["']?//""", page)


def test_labels_link_lists_1000_classes(browser, site: str, artifacts: Path) -> None:
    _open(browser, site)
    hint = browser.find_element(By.ID, "classes-hint").text
    assert "1000 ImageNet classes" in hint and "llama" in hint
    href = browser.find_element(By.ID, "labels-link").get_attribute("href")
    assert href == site + "/labels"
    status, _, body = http("GET", href)
    assert status == 200
    assert len(json.loads(body)["labels"]) == 1000
    # the page's own view of the list, built from /labels
    browser.find_element(By.CSS_SELECTOR, "#classes summary").click()
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: d.execute_script("return document.querySelectorAll('#classes-list li').length") == 1000)
    browser.find_element(By.ID, "classes-filter").send_keys("llama")
    visible = browser.execute_script(
        "return [...document.querySelectorAll('#classes-list li')].filter(li => !li.hidden).map(li => [li.value, li.innerText])"
    )
    assert visible == [[355, "llama"]]  # numbered as in the answers' "index", also when filtered
    browser.save_screenshot(str(artifacts / "page-classes.png"))


def test_non_image_shows_a_clear_error(browser, site: str, tmp_path: Path, artifacts: Path) -> None:
    browser.get(site + "/")
    text_file = tmp_path / "notes.txt"
    text_file.write_text("this is not a picture\n" * 20)
    browser.find_element(By.ID, "file").send_keys(str(text_file))
    browser.find_element(By.ID, "submit").click()
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
    error = browser.find_element(By.ID, "error").text
    assert "not an image" in error
    # one sentence, the server's, said once
    assert error.count(".") == 1 and error.endswith(".") and "(" not in error, error
    assert browser.find_elements(By.CSS_SELECTOR, "#results .pred") == []
    assert browser.find_element(By.ID, "meta").text == ""
    browser.save_screenshot(str(artifacts / "page-error.png"))
