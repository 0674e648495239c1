"""A real `sdxs serve` process on 127.0.0.1 with the tiny model: a headless-Chromium page test, a load test, and
raw-socket clients (bodies that never come, clients that leave); plus the app under an in-thread uvicorn where a
test needs other settings than the command line offers.

The browser test needs the Debian packages `chromium` and `chromium-driver` (scripts/install-browser.sh) and
selenium from PyPI; it is skipped only when chromium itself is not installed.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import psutil
import pytest
from PIL import Image

MAX_QUEUE = 8
LOAD_REQUESTS = 50
# Bound on the server's RSS growth over the 50-request burst. At most MAX_QUEUE + 1 requests are held at once
# (the rest get 429 before their body is used), so growth is a few tiny-model activations plus allocator
# slack; measured ~10-40 MB on 2 CPU cores. A queue without a bound would hold all 50.
RSS_GROWTH_LIMIT_MB = 150

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,860",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(tiny_hub_dir, tmp_path_factory):
    """`python -m sdxs serve` on a free loopback port; yields (base_url, process, log file)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [
        sys.executable, "-m", "sdxs", "serve", "--model", str(tiny_hub_dir), "--port", str(port),
        "--steps", "2", "--max-steps", "8", "--max-queue", str(MAX_QUEUE), "--log-level", "info",
    ]  # fmt: skip
    # one torch thread: on a shared 2-core runner, two spinning OpenMP threads per process can be 10x slower;
    # unbuffered, so the access log (info) is in the file when a test reads it
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"sdxs serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"sdxs serve did not answer /health within 90 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield url, proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def listening_addresses(pid: int) -> list[tuple[str, int]]:
    """(ip, port) of every TCP socket the process `pid` listens on, read from the OS (not from our own URL)."""
    proc = psutil.Process(pid)
    conns = proc.net_connections(kind="tcp") if hasattr(proc, "net_connections") else proc.connections(kind="tcp")
    return sorted((c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN)


def test_serve_binds_loopback_and_reports_health(live_server):
    url, proc, _ = live_server
    health = httpx.get(url + "/health").json()
    assert health["model_loaded"] and health["device"] == "cpu" and health["dtype"] == "float32"
    assert all(health["components"][k] for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"))
    port = int(url.rsplit(":", 1)[1])
    # the socket the server really bound: loopback only, never 0.0.0.0 / :: (a default change would fail here)
    assert listening_addresses(proc.pid) == [("127.0.0.1", port)]


def test_listening_addresses_reports_the_real_bind():
    """The check above can fail: it reports the address a socket is bound to (here another loopback address, so
    nothing is exposed), not the one a test expects."""
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        s.listen()
        found = listening_addresses(os.getpid())
        assert ("127.0.0.2", s.getsockname()[1]) in found and ("127.0.0.1", s.getsockname()[1]) not in found


# ---- real browser ----------------------------------------------------------------------------------------------


@pytest.fixture()
def browser(tmp_path):
    if CHROMIUM is None:
        pytest.skip(
            "chromium is not installed: run scripts/install-browser.sh (apt-get install chromium chromium-driver)"
        )
    if CHROMEDRIVER is None:
        pytest.fail("chromium is installed but chromedriver is not: apt-get install chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    # explicit driver path: selenium then never tries to download a driver
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_browser_generates_an_image_of_the_requested_size(live_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, _, _ = live_server
    browser.get(url + "/")
    wait = WebDriverWait(browser, 60, poll_frequency=0.1)
    wait.until(lambda d: d.execute_script("return document.body.dataset.ready") == "true")

    # an empty prompt is refused on the page, with a message the user can read
    browser.find_element(By.ID, "generate").click()
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed() and "prompt" in error.text.lower()

    Select(browser.find_element(By.ID, "width")).select_by_value("48")
    Select(browser.find_element(By.ID, "height")).select_by_value("32")
    browser.find_element(By.ID, "prompt").send_keys("a red apple, 3d render")
    browser.find_element(By.ID, "generate").click()
    size_js = (
        "const im = document.querySelector('#gallery img.result');"
        "return im && im.complete && im.naturalWidth ? [im.naturalWidth, im.naturalHeight] : null;"
    )
    assert wait.until(lambda d: d.execute_script(size_js)) == [48, 32]
    assert not browser.find_element(By.ID, "error").is_displayed()
    link = browser.find_element(By.CSS_SELECTOR, "#gallery .card a[download]")
    assert link.get_attribute("href").startswith("data:image/png;base64,")
    assert browser.find_element(By.ID, "generate").is_enabled()  # busy state cleared

    # keyboard only: Ctrl+Enter in the prompt generates again
    browser.find_element(By.ID, "prompt").send_keys(Keys.CONTROL, Keys.ENTER)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img.result")) == 2)

    shot = os.environ.get("SDXS_SCREENSHOT")
    if shot:  # scripts and docs: `SDXS_SCREENSHOT=media/web-ui.png pytest -k browser`
        browser.save_screenshot(shot)


# ---- load ------------------------------------------------------------------------------------------------------


async def _burst(url: str, n: int) -> list[tuple[int, float]]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=180, limits=limits) as client:

        async def one(i: int) -> tuple[int, float]:
            body = {"prompt": f"load test {i}", "width": 32, "height": 32, "steps": 2, "seed": i}
            start = time.perf_counter()
            r = await client.post("/generate", json=body)
            return r.status_code, time.perf_counter() - start

        return await asyncio.gather(*(one(i) for i in range(n)))


def test_load_50_concurrent_requests(live_server):
    url, proc, _ = live_server
    server = psutil.Process(proc.pid)
    assert httpx.post(url + "/generate", json={"prompt": "warm up", "width": 32, "height": 32}).status_code == 200
    rss_before = server.memory_info().rss

    start = time.perf_counter()
    results = asyncio.run(_burst(url, LOAD_REQUESTS))
    wall = time.perf_counter() - start

    codes = [code for code, _ in results]
    ok = sorted(t for code, t in results if code == 200)
    busy = sorted(t for code, t in results if code == 429)
    health = httpx.get(url + "/health", timeout=10).json()
    growth_mb = (server.memory_info().rss - rss_before) / 2**20
    print(
        f"\nload: {LOAD_REQUESTS} concurrent /generate (32x32, 2 steps, max_queue={MAX_QUEUE}) in {wall:.1f} s: "
        f"{len(ok)} x 200 (median {statistics.median(ok):.2f} s, max {ok[-1]:.2f} s), "
        f"{len(busy)} x 429 (max {busy[-1] if busy else 0:.3f} s); RSS {rss_before / 2**20:.0f} MB "
        f"-> growth {growth_mb:+.1f} MB"
    )
    assert set(codes) <= {200, 429}, codes
    assert len(ok) >= MAX_QUEUE + 1  # the running request and a full queue are always served
    assert health["status"] == "ok" and not health["busy"] and health["waiting"] == 0
    assert growth_mb < RSS_GROWTH_LIMIT_MB
    # still serving normally afterwards
    assert httpx.post(url + "/generate", json={"prompt": "after", "width": 32, "height": 32}).status_code == 200


# ---- raw sockets: bodies that never come, clients that leave -----------------------------------------------------


def _request_head(path: str, length: int, content_type: str) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n"
    )
    return head.encode()


IDLE_PATHS = [
    ("/upscale", "multipart/form-data; boundary=x"),
    ("/encode-image", "multipart/form-data; boundary=x"),
    ("/generate", "application/json"),
    ("/refine", "application/json"),
]


def test_idle_uploads_do_not_lock_out_job_requests(live_server):
    """More connections than the queue has places send their headers (Content-Length: 1000) and then nothing.
    Before, each took a queue place from its headers and kept it while its socket stayed open: every job request
    got 429 for as long as they did. Now a body is read before its request joins the queue, so they hold none, and
    normal requests are served meanwhile."""
    url, _, _ = live_server
    n = MAX_QUEUE + 2
    idle = []
    try:
        for i in range(n):
            path, content_type = IDLE_PATHS[i % len(IDLE_PATHS)]
            s = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=5)
            s.sendall(_request_head(path, 1000, content_type))
            idle.append(s)
        deadline = time.monotonic() + 10
        while httpx.get(url + "/health", timeout=5).json().get("receiving", n) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # (a server without the count: let it see every header)
        start = time.perf_counter()
        body = {"prompt": "served while uploads idle", "width": 32, "height": 32, "seed": 1}
        r = httpx.post(url + "/generate", json=body, timeout=60)
        seconds = time.perf_counter() - start
        assert r.status_code == 200, r.text
        assert seconds < 60
        picture = io.BytesIO()
        Image.new("RGB", (24, 16), (200, 30, 30)).save(picture, format="PNG")
        files = {"image": ("in.png", picture.getvalue(), "image/png")}
        assert httpx.post(url + "/upscale", files=files, timeout=60).status_code == 200
        health = httpx.get(url + "/health", timeout=5).json()
        assert health["receiving"] == n and health["waiting"] == 0
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 10  # a client that leaves mid-body is forgotten at once
    while httpx.get(url + "/health", timeout=5).json()["receiving"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(url + "/health", timeout=5).json()["receiving"] == 0


def test_a_client_that_leaves_is_logged_as_499(live_server):
    """docs/server.md: a job whose client went away is logged with status 499. A request queued behind a running
    job, whose client sends it whole and then closes the socket, is cancelled before it starts: the server's log
    has its access line with 499 (uvicorn writes none for a response it cannot send)."""
    url, _, log = live_server
    port = int(url.rsplit(":", 1)[1])
    before = httpx.get(url + "/health", timeout=5).json()["jobs_cancelled"]
    picture = io.BytesIO()
    Image.new("RGB", (384, 384), (30, 200, 30)).save(picture, format="PNG")  # a few seconds of VAE on the tiny model
    running: list[httpx.Response] = []
    files = {"image": ("in.png", picture.getvalue(), "image/png")}
    first = threading.Thread(target=lambda: running.append(httpx.post(url + "/upscale", files=files, timeout=120)))
    first.start()
    deadline = time.monotonic() + 30
    while not httpx.get(url + "/health", timeout=5).json()["busy"] and time.monotonic() < deadline:
        time.sleep(0.01)
    body = b'{"prompt": "a cat who leaves", "width": 32, "height": 32, "seed": 3}'
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(_request_head("/generate", len(body), "application/json") + body)
        time.sleep(0.2)  # the server has read it and queued it
    first.join(timeout=120)
    assert running and running[0].status_code == 200
    deadline = time.monotonic() + 10
    while httpx.get(url + "/health", timeout=5).json()["jobs_cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(url + "/health", timeout=5).json()["jobs_cancelled"] == before + 1
    time.sleep(0.2)
    lines = [ln for ln in log.read_text().splitlines() if '"POST /generate HTTP/1.1" 499' in ln]
    assert len(lines) == 1, log.read_text()[-2000:]
    assert "127.0.0.1:" in lines[0]


@contextmanager
def uvicorn_in_thread(app):
    """`app` served by a real uvicorn on a free loopback port, in a thread of this process (no model to load)."""
    import uvicorn

    port = _free_port()
    # log_config=None: leave this process's logging as it is (the uvicorn loggers keep propagating)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def test_a_body_that_never_comes_gets_408_and_the_connection_closed(tiny_pipe):
    """Over real sockets: headers, then nothing. After `body_timeout_seconds` the client reads a 408 and the server
    closes the connection (an unread body must not be taken for a next request)."""
    from sdxs.server import ServerSettings, create_app

    app = create_app(tiny_pipe, ServerSettings(default_steps=1, max_queue=0, body_timeout_seconds=1.0))
    with uvicorn_in_thread(app) as port, socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        start = time.perf_counter()
        s.sendall(_request_head("/generate", 1000, "application/json"))
        answer = b""
        while chunk := s.recv(65536):  # until the server closes
            answer += chunk
        seconds = time.perf_counter() - start
    head = answer.split(b"\r\n", 1)[0]
    assert head == b"HTTP/1.1 408 Request Timeout", answer[:300]
    assert b"did not arrive within 1 s" in answer and b"connection: close" in answer.lower()
    assert 0.9 < seconds < 10
