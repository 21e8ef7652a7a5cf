"""The API page in a real browser with no network: headless Chromium (Debian's, installed by `make test`) opens
`/docs`, finds `POST /classify`, and uploads a sample through "Try it out" to get a 200.

The server, ChromeDriver and Chromium all run in a network namespace of the test's own whose only way out is a
link to this process (tests/support/shaped_links.py): no route anywhere else, so a page that needed a CDN would be
blank, as it was before the service served Swagger UI's assets itself (service/api_docs.py).
"""

from __future__ import annotations

import os
import subprocess
import time

import httpx
import pytest

from benchmarks.server_process import free_port
from conftest import REPO
from support.live_server import LiveServer
from support.shaped_links import shaped_host_or_skip

pytestmark = pytest.mark.integration  # every test here starts a server or another process

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SAMPLE = os.path.join(REPO, "samples", "fashion-mnist", "test-00000-ankle-boot.png")
OPERATION = "#operations-default-classify_classify_post"


@pytest.fixture(scope="module")
def offline_host():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Debian's chromium and chromium-driver are not installed (make test installs them as root)")
    with shaped_host_or_skip({"link": None}, "no network namespace for a browser without network") as h:
        yield h


@pytest.fixture(scope="module")
def browser(offline_host):
    """A WebDriver session with Chromium inside the namespace."""
    webdriver = pytest.importorskip("selenium.webdriver")
    port = free_port()
    address = offline_host.address["link"]
    driver_proc = subprocess.Popen(
        [*offline_host.exec_prefix, CHROMEDRIVER, f"--port={port}", "--allowed-ips=", "--allowed-origins=*"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://{address}:{port}/status", timeout=1).json()["value"]["ready"]:
                    break
            except (httpx.TransportError, ValueError, KeyError):
                pass
            assert time.monotonic() < deadline and driver_proc.poll() is None, "ChromeDriver did not start"
            time.sleep(0.2)
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (
            "--headless=new",
            "--no-sandbox",  # as root
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ):
            options.add_argument(flag)
        session = webdriver.Remote(command_executor=f"http://{address}:{port}", options=options)
        from selenium.webdriver.remote.file_detector import UselessFileDetector

        session.file_detector = UselessFileDetector()  # the browser shares this file system: no upload to a grid
        try:
            yield session
        finally:
            session.quit()
    finally:
        driver_proc.terminate()
        driver_proc.wait(10)


def test_the_api_page_works_in_a_browser_without_network(offline_host, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select, WebDriverWait

    server = LiveServer(command=offline_host.server_command(), address=offline_host.address["link"], host="0.0.0.0")
    try:
        wait = WebDriverWait(browser, 30)
        browser.get(f"http://127.0.0.1:{server.port}/docs")  # inside the namespace: its own loopback
        operation = wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, OPERATION)))
        assert "/classify" in operation.text
        operation.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
        wait.until(ready.element_to_be_clickable((By.CSS_SELECTOR, f"{OPERATION} .try-out__btn"))).click()
        content_type = wait.until(
            ready.presence_of_element_located((By.CSS_SELECTOR, f"{OPERATION} .opblock-section-request-body select"))
        )
        Select(content_type).select_by_visible_text("image/png")
        upload = wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, f"{OPERATION} input[type=file]")))
        upload.send_keys(SAMPLE)  # the browser reads it from this machine's disk
        browser.find_element(By.CSS_SELECTOR, f"{OPERATION} .execute").click()
        status = wait.until(
            ready.presence_of_element_located((By.CSS_SELECTOR, f"{OPERATION} .live-responses-table tr.response"))
        )
        assert status.find_element(By.CSS_SELECTOR, ".response-col_status").text == "200"
        assert '"label": "Ankle boot"' in status.text
        assert server.metric("puppet_requests_total", route="/classify", status="200") == 1
    finally:
        server.stop()
