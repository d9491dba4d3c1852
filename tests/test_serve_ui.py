"""The page at `/` in a real headless Chromium (Debian's chromium + chromium-driver, through selenium): upload a
bundled example, read the predicted label and the probability bars from the page. The truth is the file name."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from noop_rt.demo import EXAMPLES_DIR

HAVE_SERVE = all(importlib.util.find_spec(m) is not None for m in ("ray", "fastapi", "httpx", "starlette")) and \
    importlib.util.find_spec("ray.serve") is not None
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
HAVE_SELENIUM = importlib.util.find_spec("selenium") is not None

pytestmark = [
    pytest.mark.skipif(not HAVE_SERVE, reason="Ray Serve is not installed (pip install 'noop-rt[serve]'); CI installs "
                                              "it"),
    pytest.mark.skipif(not HAVE_SELENIUM, reason="selenium is not installed (pip install selenium); CI installs it"),
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="no chromium/chromedriver on PATH (apt-get install chromium chromium-driver; .ci/run "
                              "installs them)"),
]


@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    from noop_rt.serve.launch import ServerProcess

    proc = ServerProcess(["--replicas", "1", "--top-k", "3"])
    proc.start()
    yield proc
    assert proc.stop() == 0, proc.tail()
    proc.kill()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1000,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def upload_and_read(browser: Any, path: str) -> tuple[str, list[tuple[str, str]], str]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element(By.ID, "file").send_keys(path)

    def answered(driver: Any) -> bool:
        label = driver.find_element(By.ID, "label").text.strip()
        return bool(label and label != "…") or bool(driver.find_element(By.ID, "error").text.strip())

    WebDriverWait(browser, 60, poll_frequency=0.1).until(answered)
    error = browser.find_element(By.ID, "error").text.strip()
    assert not error, f"the page shows an error: {error}"
    bars = [(row.find_element(By.CLASS_NAME, "name").text, row.find_element(By.CLASS_NAME, "prob").text)
            for row in browser.find_elements(By.CSS_SELECTOR, "#bars .bar")]
    return browser.find_element(By.ID, "label").text.strip(), bars, browser.find_element(By.ID, "latency").text


def test_page_classifies_an_uploaded_example(server: Any, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    WebDriverWait(browser, 60).until(lambda d: "classes" in d.find_element(By.ID, "model").text)
    assert "digits" in browser.find_element(By.ID, "model").text
    for name in ("seven.png", "two.png"):  # two in a row: the page replaces its answer
        label, bars, latency = upload_and_read(browser, str(EXAMPLES_DIR / name))
        assert label == name.removesuffix(".png")
        assert len(bars) == 3 and bars[0][0] == label  # --top-k 3: three bars, the first is the label
        probs = [float(p) for _, p in bars]
        assert probs == sorted(probs, reverse=True) and 0 < probs[0] <= 1
        assert "ms" in latency


def test_page_asks_a_keyed_server_for_its_key_once(browser: Any) -> None:
    """A server started with --api-key: the page's first call gets 401, it asks for the key (a prompt), keeps it for
    the tab and classifies with it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    from noop_rt.serve.launch import ServerProcess

    key = "ui-key-0123456789abcdef"
    with ServerProcess(["--api-key", key]) as keyed:
        browser.get(keyed.url + "/")
        prompt = WebDriverWait(browser, 60).until(expected_conditions.alert_is_present())
        assert "API key" in prompt.text
        prompt.send_keys(key)
        prompt.accept()
        WebDriverWait(browser, 60).until(lambda d: "classes" in d.find_element(By.ID, "model").text)
        label, _, _ = upload_and_read(browser, str(EXAMPLES_DIR / "four.png"))  # no second prompt: the key is kept
        assert label == "four"
        assert browser.execute_script("return sessionStorage.getItem('noop-rt-key')") == key


def test_docs_render_offline(server: Any, browser: Any) -> None:
    """/docs draws Swagger UI from scripts the server itself serves: it renders with no CDN reachable."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/docs")
    html = browser.page_source
    assert "docs-assets/swagger-ui-bundle.js" in html and "cdn.jsdelivr" not in html
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".swagger-ui .info .title"))
    assert "noop-rt" in browser.find_element(By.CSS_SELECTOR, ".swagger-ui .info .title").text
    assert browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")  # the routes are listed


def test_page_at_390_px_shows_label_bars_and_probabilities_without_scrolling(server: Any, browser: Any,
                                                                             tmp_path: Any) -> None:
    """A phone's width (390 CSS px): the label, every bar and every probability inside the viewport, nothing wider
    than the page; an image unlike the training data (an inverted digit) says so; a rejected file names itself
    and leaves no broken-image icon."""
    from PIL import Image, ImageOps
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    try:
        browser.get(server.url + "/")
        WebDriverWait(browser, 60).until(lambda d: "classes" in d.find_element(By.ID, "model").text)
        label, bars, _ = upload_and_read(browser, str(EXAMPLES_DIR / "seven.png"))
        assert label == "seven" and len(bars) == 3 and all(float(p) > 0 or p == "0.000" for _, p in bars)
        width = browser.execute_script("return window.innerWidth")
        assert width == 390
        assert browser.execute_script("return document.documentElement.scrollWidth") <= width  # no sideways scroll
        for selector in ("#label", "#bars .bar .name", "#bars .bar .track", "#bars .bar .prob"):
            for element in browser.find_elements(By.CSS_SELECTOR, selector):
                rect = browser.execute_script("return arguments[0].getBoundingClientRect().toJSON()", element)
                assert rect["width"] > 0 and rect["left"] >= 0 and rect["right"] <= width, (selector, rect)
        assert browser.find_element(By.ID, "warnings").text == ""

        inverted = tmp_path / "inverted-zero.png"
        ImageOps.invert(Image.open(EXAMPLES_DIR / "zero.png").convert("RGB")).save(inverted)
        upload_and_read(browser, str(inverted))
        assert "unlike the training data" in browser.find_element(By.ID, "warnings").text

        bogus = tmp_path / "notes.png"
        bogus.write_text("not an image at all")
        browser.find_element(By.ID, "file").send_keys(str(bogus))
        WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "error").text.strip())
        assert browser.find_element(By.ID, "error").text.startswith("notes.png: ")
        WebDriverWait(browser, 10).until(lambda d: not d.find_element(By.ID, "preview").is_displayed())
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
