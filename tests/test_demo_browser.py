"""The demo page in a real headless Chromium, offline: upload a photo, read back predict.py's top-1 label,
see the similar items' gallery, and find that the page asked nothing of any other host."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.browser import MISSING, have_chromium, requested_urls

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not have_chromium(), reason=MISSING),
]


def classify_in_page(driver, url: str, image: Path, k: int, timeout: float = 90) -> tuple[str, int]:
    """Open the page, upload `image`, and return the top label it shows and how many similar items."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout)
    driver.get(url)
    upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#query input[type=file]")))
    upload.send_keys(str(image))
    top = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#labels h2").text.strip() or False)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#similar img")) >= k)
    return top, len(driver.find_elements(By.CSS_SELECTOR, "#similar img"))


def test_demo_page_shows_predict_py_top1(browser, demo_server, query_files, predicted_top1, tmp_path):
    image = query_files[0]
    driver = browser
    requested_urls(driver)  # what earlier pages asked for
    top, similar = classify_in_page(driver, demo_server.url + "/demo/", image, k=3)
    driver.save_screenshot(str(tmp_path / "demo.png"))
    urls = requested_urls(driver)
    if os.environ.get("SKUVISION_DEMO_SCREENSHOT"):  # a picture for the docs, on request
        shutil.copy(tmp_path / "demo.png", os.environ["SKUVISION_DEMO_SCREENSHOT"])
    assert top == predicted_top1[str(image)]
    assert similar == 3
    # Offline by construction: fonts, scripts, analytics, everything on the web comes from this server.
    web = [urlsplit(u) for u in urls if urlsplit(u).scheme in ("http", "https", "ws", "wss")]
    outside = [u.geturl() for u in web if u.hostname != "127.0.0.1"]
    assert len(web) > 5 and not outside, outside
    assert (tmp_path / "demo.png").stat().st_size > 10_000
