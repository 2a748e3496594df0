"""docs/img/chat-page.png: the chat page with a real answered conversation, taken from `python
server.py` on the bundled model in Debian's chromium (Playwright; apt-get install chromium).

    .venv/bin/python scripts/screenshot_chat_page.py
"""

import os
import shutil
import socket
import subprocess
import sys
import time

import httpx
from playwright.sync_api import expect, sync_playwright

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(ROOT, "docs", "img", "chat-page.png")
QUESTION = "Write a Python function that checks whether a word is a palindrome."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(url: str, server: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit("the server did not start")


def main() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "server.py", "--port", str(port)], cwd=ROOT)
    try:
        wait_for_health(url, server)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"))
            page = browser.new_page(viewport={"width": 1200, "height": 760})
            page.goto(url)
            page.fill("#temperature", "0")
            page.fill("#prompt", QUESTION)
            page.press("#prompt", "Enter")
            expect(page.locator("article.assistant .meta")).to_contain_text("answer tokens", timeout=300_000)
            page.screenshot(path=OUTPUT)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
