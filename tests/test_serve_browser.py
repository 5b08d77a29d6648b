"""`crasmra serve` in a real browser: headless chromium uploads an image through the page.

Needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install chromium
chromium-driver``) and selenium (the dev extra). Without them the test is skipped with a reason
that says so; with ``CRASMRA_REQUIRE_BROWSER=1`` (set by CI) it fails instead, so CI cannot pass
without having run it.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib import request as urlrequest

import pytest

pytestmark = pytest.mark.slow

CHROMIUM_NAMES = ("chromium", "chromium-browser")
URL_LINE = re.compile(r"on (http://127\.0\.0\.1:\d+)")


def _missing(reason: str) -> None:
    if os.environ.get("CRASMRA_REQUIRE_BROWSER"):
        pytest.fail(f"CRASMRA_REQUIRE_BROWSER is set but {reason}")
    pytest.skip(reason)


def browser_paths() -> tuple[str, str]:
    """Paths of chromium and chromedriver, or skip (fail in CI) saying which is missing."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        _missing('selenium is not installed (pip install -e ".[dev]"): browser test not run')
    chromium = os.environ.get("CRASMRA_CHROMIUM") or next(
        (p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)
    driver = os.environ.get("CRASMRA_CHROMEDRIVER") or shutil.which("chromedriver")
    if not chromium or not driver:
        _missing("chromium and chromedriver are not installed (Debian: apt-get install chromium "
                 "chromium-driver): the headless-browser test cannot run")
    return chromium, driver  # type: ignore[return-value]


@pytest.fixture
def chromium() -> tuple[str, str]:
    """Chromium's and chromedriver's paths; skips (fails in CI) without them."""
    return browser_paths()


@pytest.fixture
def server(chromium: tuple[str, str], tiny_checkpoint: Path) -> Iterator[str]:
    """`crasmra serve` as a user starts it, in a subprocess on a free loopback port.

    ``chromium`` comes first so that a machine without a browser skips before training the
    tiny checkpoint.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "crasmra.cli", "serve", str(tiny_checkpoint), "--port", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    log: list[str] = []

    def drain() -> None:  # keeps the pipe from filling up while the server runs
        for line in proc.stderr:  # type: ignore[union-attr]
            log.append(line)
            lines.put(line)

    threading.Thread(target=drain, daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        url = None
        while url is None:
            try:
                match = URL_LINE.search(lines.get(timeout=1))
                url = match.group(1) if match else None
            except queue.Empty:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("crasmra serve did not start:\n" + "".join(log))
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def browser(chromium: tuple[str, str], tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium
    options = Options()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 "--window-size=1280,1100", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def api_predict(url: str, data: bytes) -> dict[str, Any]:
    boundary = "crasmra-browser-test"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"x.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + data + \
        f"\r\n--{boundary}--\r\n".encode()
    req = urlrequest.Request(f"{url}/api/predict", data=body, method="POST", headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urlrequest.urlopen(req, timeout=60) as response:
        return json.loads(response.read())


def test_upload_shows_top_class_and_overlays(server: str, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 120)

    def state() -> str:
        return browser.execute_script("return document.body.dataset.state || ''")

    def act_and_wait(action: Any, until: str) -> None:
        browser.execute_script("document.body.dataset.state = 'waiting'")
        action()
        wait.until(lambda _: state() in ("done", "error"))
        assert state() == until, browser.find_element(By.ID, "error").text

    browser.get(server)
    wait.until(lambda _: state() == "ready")
    assert "resnet10t" in browser.find_element(By.ID, "model-info").text
    # The checkpoint's synthetic dataset gives one example per class.
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#examples button")) == 4)

    with urlrequest.urlopen(f"{server}/api/examples/1", timeout=30) as response:
        image = response.read()
    photo = tmp_path / "bird.png"
    photo.write_bytes(image)
    expected = api_predict(server, image)
    file_input = browser.find_element(By.ID, "file")
    act_and_wait(lambda: file_input.send_keys(str(photo)), "done")

    rows = browser.find_elements(By.CSS_SELECTOR, "#top5 li")
    assert len(rows) == 4  # K = 4 classes: all of them
    top = rows[0].find_element(By.CLASS_NAME, "label").text
    assert top == expected["top_k"][0]["label"]
    shown = rows[0].find_element(By.CLASS_NAME, "prob").text
    assert shown.endswith("%") and abs(float(shown[:-1]) / 100
                                       - expected["top_k"][0]["probability"]) < 0.001
    assert "bird.png" in browser.find_element(By.ID, "status").text
    stage_titles = [h.text for h in browser.find_elements(By.CSS_SELECTOR, ".stage h3")]
    assert stage_titles == [s["name"] for s in expected["stages"]]
    for kind in ("gradcam", "activation"):
        loaded = browser.execute_script(
            "return [...document.querySelectorAll(`img.${arguments[0]}`)]"
            ".map(i => i.complete && i.naturalWidth > 0)", kind)
        assert loaded == [True] * 3, kind
    assert browser.execute_script(
        "const i = document.getElementById('input-image'); return i.naturalWidth") == 64

    # A file that is not an image: a message on the page, no stack trace.
    junk = tmp_path / "notes.png"
    junk.write_text("these are notes, not pixels")
    act_and_wait(lambda: file_input.send_keys(str(junk)), "error")
    message = browser.find_element(By.ID, "error").text
    assert "not an image" in message and "Traceback" not in message

    # An example is one click away.
    button = browser.find_elements(By.CSS_SELECTOR, "#examples button")[2]
    act_and_wait(button.click, "done")
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert "example 3" in browser.find_element(By.ID, "status").text
