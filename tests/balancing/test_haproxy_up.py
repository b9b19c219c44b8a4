"""`imgclass up --engine haproxy --servers 3`: the page classifies a photo, in a real Chromium, and SIGTERM leaves nothing behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import descendants, http, post_image
from .haproxy_support import require_haproxy

pytestmark = [pytest.mark.integration, pytest.mark.slow]
require_haproxy()

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def cluster(model_dir: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`imgclass up --engine haproxy --servers 3` with the real model, and the URL it prints."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgclass", "up", "--engine", "haproxy", "--servers", "3", "--port", "0",
         "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "IMGCLASS_MODEL_DIR": str(model_dir)},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "imgclass is up" in line, line
        yield proc, line.split(" behind ")[1].split("/  ")[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]


def test_up_serves_the_api_through_haproxy(cluster, images_dir: Path) -> None:
    _, url = cluster
    status, headers, doc = post_image(url + "/submit", (images_dir / "parrot.jpg").read_bytes(), "parrot.jpg")
    assert status == 200 and doc["predictions"][0]["label"] == "macaw", doc
    assert doc["server"] in ("server1", "server2", "server3") and headers["X-Backend"].startswith("http://127.0.0.1:")
    status, _, page = http("GET", url + "/")
    assert status == 200 and b"<html" in page.lower()
    assert len(http("GET", url + "/backends")[2]) > 2


def test_the_page_classifies_a_photo(cluster, images_dir: Path, artifacts: Path, tmp_path: Path) -> None:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("headless browser missing: install Debian packages chromium and chromium-driver "
                    "(./install_script.sh --dev)")  # fmt: skip
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium missing: ./install_script.sh --dev")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    _, url = cluster
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--window-size=1280,900", f"--user-data-dir={tmp_path / 'profile'}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.get(url + "/")
        wait = WebDriverWait(driver, 60)
        # the servers panel, from /backends as HAProxy reports them, names the model servers
        wait.until(lambda d: "server3" in d.execute_script("return document.getElementById('backends').innerText"))
        driver.find_element(By.ID, "file").send_keys(str(images_dir / "parrot.jpg"))
        wait.until(ec.element_to_be_clickable((By.ID, "submit"))).click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .pred") or d.find_element(By.ID, "error").text)
        preds = driver.find_elements(By.CSS_SELECTOR, "#results .pred")
        assert len(preds) == 5 and "macaw" in preds[0].text, driver.find_element(By.ID, "error").text
        assert "Answered by server" in driver.find_element(By.ID, "meta").text
        driver.save_screenshot(str(artifacts / "page-engine-haproxy.png"))
    finally:
        driver.quit()


def test_sigterm_leaves_no_process_behind(cluster) -> None:
    proc, _ = cluster
    family = descendants(proc.pid)
    assert len(family) == 6, family  # three servers, the control plane, HAProxy's master and worker
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    time.sleep(0.3)
    assert [p for p in family if Path(f"/proc/{p}").exists()] == []
