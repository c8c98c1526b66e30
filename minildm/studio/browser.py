"""A headless Chromium that uses the studio's page as a person would: for the browser tests and the
screenshots in the README and the lessons (`python -m minildm.studio.screenshots`).

It drives Debian's `chromium` (or whatever `MINILDM_CHROMIUM` names) through Playwright's Python
package; nothing is downloaded. The flags keep Chromium from reaching for Google's servers, which a
closed network refuses, at every start.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def free_port() -> int:
    """A port nothing on this machine listens on now (for a studio started by a test or a script)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium_path() -> str | None:
    """The Chromium to drive: $MINILDM_CHROMIUM, else chromium or chromium-browser on the PATH."""
    return os.environ.get("MINILDM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.contextmanager
def studio_server(*args: str, port: int, cwd=None, timeout: float = 120.0, log=None):
    """`python -m minildm.studio ARGS --port PORT` in a subprocess, until its page answers; yields its URL
    and the process (whose output goes to `log`, default studio-server.log in cwd)."""
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    log = open(log or os.path.join(cwd or ".", "studio-server.log"), "w")
    process = subprocess.Popen([sys.executable, "-m", "minildm.studio", *args, "--port", str(port)], cwd=cwd, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + timeout
        while True:
            if process.poll() is not None:
                log.flush()
                raise RuntimeError(f"the studio exited ({process.returncode}): "
                                   + open(log.name).read()[-2000:])
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                if time.time() > deadline:
                    raise TimeoutError(f"the studio did not answer at {url} in {timeout:.0f} s") from None
                time.sleep(0.5)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@contextlib.contextmanager
def browser_page(width: int = 1400, height: int = 1100):
    """A Playwright page in a fresh headless Chromium profile."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        raise RuntimeError("no Chromium found: apt-get install chromium, or set MINILDM_CHROMIUM to its path")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            yield page
        finally:
            browser.close()


def set_number(page, elem_id: str, value) -> None:
    """Type a value into a gr.Number / gr.Textbox by its elem_id."""
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(str(value))
    box.press("Tab")


def generate(page, prompt: str, timeout: float = 120.0, **numbers) -> str:
    """Type the prompt (and any numbers, by elem_id: seed=3, steps=20), press Generate and wait until the
    status says it is done or stopped; returns the status text."""
    page.locator("#prompt textarea").fill(prompt)
    for elem_id, value in numbers.items():
        set_number(page, elem_id, value)
    before = int(page.locator("#status-text").get_attribute("data-run"))
    page.click("#generate")
    page.wait_for_function(
        "([before]) => { const s = document.querySelector('#status-text');"
        " return s && Number(s.dataset.run) > before && /^(Done|Stopped)/.test(s.innerText); }",
        arg=[before], timeout=timeout * 1000)
    return page.locator("#status-text").inner_text()


def image_bytes(page, selector: str) -> bytes:
    """The bytes of the image an <img> inside `selector` shows, fetched by the page itself."""
    page.wait_for_selector(f"{selector} img", timeout=60000)
    src = page.locator(f"{selector} img").first.get_attribute("src")
    data = page.evaluate("async (src) => { const r = await fetch(src); const b = new Uint8Array(await r.arrayBuffer());"
                         " return Array.from(b); }", src)
    return bytes(data)


def error_message(page, timeout: float = 20.0) -> str:
    """The text of the error message the page shows (Gradio's toast)."""
    toast = page.locator(".toast-body").first
    toast.wait_for(timeout=timeout * 1000)
    return toast.inner_text()
