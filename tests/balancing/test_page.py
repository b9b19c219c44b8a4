"""The web page in a real headless Chromium: upload a photo, read the answer, save a screenshot."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

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
                 "--disable-sync", "--window-size=1200,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
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


def test_upload_parrot_shows_macaw(browser, site: str, images_dir: Path, artifacts: Path) -> None:
    browser.get(site + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: "127.0.0.1" in _panel(d))
    browser.find_element(By.ID, "file").send_keys(str(images_dir / "parrot.jpg"))
    wait.until(ec.element_to_be_clickable((By.ID, "submit"))).click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .pred"))
    preds = browser.find_elements(By.CSS_SELECTOR, "#results .pred")
    assert len(preds) == 5
    assert "macaw" in preds[0].text
    meta = browser.find_element(By.ID, "meta").text
    assert "answered by server" in meta and "round trip" in meta
    assert browser.find_element(By.ID, "preview").is_displayed()
    # the served counts, read in one script call: the panel rebuilds its rows every 2 s
    served = "return [...document.querySelectorAll('#backends tr')].map(r => r.cells[2] && r.cells[2].innerText)"
    wait.until(lambda d: "1" in d.execute_script(served))
    browser.save_screenshot(str(artifacts / "page-parrot.png"))
    assert (artifacts / "page-parrot.png").stat().st_size > 10_000


def test_non_image_shows_a_clear_error(browser, site: str, tmp_path: Path, artifacts: Path) -> None:
    browser.get(site + "/")
    text_file = tmp_path / "notes.txt"
    text_file.write_text("this is not a picture\n" * 20)
    browser.find_element(By.ID, "file").send_keys(str(text_file))
    browser.find_element(By.ID, "submit").click()
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
    assert "not an image" in browser.find_element(By.ID, "error").text
    assert browser.find_elements(By.CSS_SELECTOR, "#results .pred") == []
    browser.save_screenshot(str(artifacts / "page-error.png"))
