"""Headless Debian Chromium for the page tests (the demo page, predict.py's gallery), offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

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
MISSING = (
    f"needs Chromium at {CHROMIUM} and chromedriver at {CHROMEDRIVER} "
    "(apt-get install -y chromium chromium-driver; .ci/run installs them)"
)


def have_chromium() -> bool:
    return CHROMIUM.is_file() and CHROMEDRIVER.is_file()


def chromium(user_data_dir: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def requested_urls(driver) -> list[str]:
    """The URLs the browser asked for since the last call (reading the log empties it)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls
