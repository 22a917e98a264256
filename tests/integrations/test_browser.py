"""A visitor's browser (headless Chromium) on a Gradio app under `zerogpu run`.

The page shows what the GPU function returned, its progress bar while it
runs, and the text of a "GPU task aborted" error; Debian's chromium and
chromium-driver run it (.ci/run installs them).
"""

from __future__ import annotations

import os
import shutil

import pytest

from gradio_server import APPS, GradioServer

pytestmark = [pytest.mark.browser, pytest.mark.allow_leaks]

CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")
WAIT = 60  # a hang guard, not a measure


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = GradioServer(APPS / "gradio_behaviours.py", tmp_path_factory.mktemp("gradio"))
    app.start()
    try:
        yield app
    finally:
        app.stop()


@pytest.fixture
def browser(server, tmp_path):
    if not (CHROMIUM and DRIVER):
        # CI installs them (.ci/run), so there a missing browser is a failure, not a reason to skip.
        report = pytest.fail if os.environ.get("CI") else pytest.skip
        report("the browser tests need Debian's chromium and chromium-driver: apt-get install chromium "
               "chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        driver.get(server.url)
        yield driver
    finally:
        driver.quit()


def click(driver, label: str, value: str | None = None, field: str = "textarea") -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, WAIT)
    if value is not None:
        box = wait.until(ready.element_to_be_clickable((By.CSS_SELECTOR, field)))
        box.clear()
        box.send_keys(value)
    wait.until(ready.element_to_be_clickable((By.XPATH, f"//button[normalize-space()='{label}']"))).click()


def page_shows(driver, text: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT, poll_frequency=0.02).until(lambda d: text in d.find_element("tag name", "body").text)


def output(driver) -> str:
    return driver.find_elements("css selector", "textarea")[-1].get_attribute("value")


def test_the_page_shows_the_result_and_the_progress(browser):
    from selenium.webdriver.support.ui import WebDriverWait

    click(browser, "double", "21", field="input[type=number]")
    WebDriverWait(browser, WAIT).until(lambda d: output(d) == "42.0")
    click(browser, "steps", "40", field="input[type=number]")
    page_shows(browser, "stepping")  # the bar's description, while the call runs
    WebDriverWait(browser, WAIT).until(lambda d: output(d) == "40")


def test_the_page_shows_a_gpu_task_aborted(browser):
    click(browser, "crash", "x")
    page_shows(browser, "GPU task aborted")
