"""The demo page in a real headless Chromium, offline: upload a photo, read back predict.py's top-1 label and
see the similar items' gallery."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("SKUVISION_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("SKUVISION_CHROMEDRIVER", "/usr/bin/chromedriver"))
# Without the networking flags Chromium keeps reaching for outside hosts.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,900",
)

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason=f"needs Chromium at {CHROMIUM} and chromedriver at {CHROMEDRIVER} "
    "(apt-get install -y chromium chromium-driver; .ci/run installs them)",
)


def chromium(user_data_dir: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


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


def test_demo_page_shows_predict_py_top1(demo_server, query_files, predicted_top1, tmp_path):
    image = query_files[0]
    driver = chromium(tmp_path / "profile")
    try:
        top, similar = classify_in_page(driver, demo_server.url + "/demo/", image, k=3)
        driver.save_screenshot(str(tmp_path / "demo.png"))
        if os.environ.get("SKUVISION_DEMO_SCREENSHOT"):  # a picture for the docs, on request
            shutil.copy(tmp_path / "demo.png", os.environ["SKUVISION_DEMO_SCREENSHOT"])
    finally:
        driver.quit()
    assert top == predicted_top1[str(image)]
    assert similar == 3
    assert (tmp_path / "demo.png").stat().st_size > 10_000
