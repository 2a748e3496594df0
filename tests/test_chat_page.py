"""The chat page at / (jaxinfer/api/static/): what the server serves, checked over HTTP on a
fake engine; and the page itself, in Debian's chromium driven by Playwright, against conftest.py's
`served` (the bundled model): streaming, stop, the settings it sends, the API-key prompt, the
markdown renderer, and that it requests nothing but its own server."""

import json
import re
import shutil
import time
from urllib.parse import urlsplit

import pytest
from fake_engine import FakeEngine
from helpers import CHAT, MAX_TOKENS, NAME, idle, live_server
from starlette.testclient import TestClient

from jaxinfer.api import create_app
from jaxinfer.api.routes.frontend import STATIC_DIR
from jaxinfer.async_engine import AsyncLLMEngine

# -- served files (no browser) ------------------------------------------------------------------


def client(**kwargs) -> TestClient:
    return TestClient(create_app(AsyncLLMEngine(FakeEngine()), **kwargs))


def test_root_serves_the_page_with_a_strict_content_security_policy():
    response = client().get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.text == (STATIC_DIR / "index.html").read_text()
    policy = [rule.strip() for rule in response.headers["content-security-policy"].split(";")]
    assert "default-src 'self'" in policy
    assert not [rule for rule in policy if "unsafe" in rule or "*" in rule or "http" in rule]


@pytest.mark.parametrize("name, content_type", [
    ("chat.js", "text/javascript"), ("markdown.js", "text/javascript"), ("chat.css", "text/css"),
    ("favicon.svg", "image/svg+xml")])
def test_static_files_have_their_content_types(name, content_type):
    response = client().get(f"/static/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"].split(";")[0] == content_type
    assert response.content == (STATIC_DIR / name).read_bytes()


def test_every_file_the_page_links_to_is_served_from_static():
    links = re.findall(r'(?:src|href)="([^"]+)"', (STATIC_DIR / "index.html").read_text())
    assert len(links) == 3 and all(link.startswith("static/") for link in links)
    for link in links:
        assert client().get(f"/{link}").status_code == 200, link


def test_the_page_needs_no_api_key_but_the_api_still_does():
    app = client(api_key="sesame")
    assert app.get("/").status_code == 200
    assert app.get("/static/chat.js").status_code == 200
    assert app.get("/v1/models").status_code == 401
    assert app.get("/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200


def test_disable_frontend_serves_no_page():
    app = client(disable_frontend=True)
    for path in ("/", "/static/chat.js"):
        response = app.get(path)
        assert response.status_code == 404 and response.json()["error"]["message"]
    assert app.get("/v1/models").status_code == 200


# -- the page in a browser ----------------------------------------------------------------------

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="the browser tests need Debian's chromium: apt-get install chromium")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # The system's chromium: Playwright's own browser builds are never downloaded.
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


class ChatPage:
    """The page at `url` in a fresh browser context (empty localStorage), recording every request it
    makes and every error it logs (a Content-Security-Policy violation is one)."""

    def __init__(self, browser, url: str):
        self.context = browser.new_context()
        self.context.grant_permissions(["clipboard-read", "clipboard-write"])
        self.requests, self.errors = [], []
        self.context.on("request", lambda request: self.requests.append(request))
        self.page = self.context.new_page()
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.goto(url)

    def set(self, field: str, value) -> None:
        self.page.fill(f"#{field}", str(value))

    def send(self, text: str) -> None:
        self.page.fill("#prompt", text)
        self.page.press("#prompt", "Enter")

    def answer(self):
        return self.page.locator("article.assistant").last

    def wait_until_answered(self) -> str:
        """The answer's statistics line, once the whole answer is in."""
        from playwright.sync_api import expect

        expect(self.answer().locator(".meta")).to_contain_text("answer tokens", timeout=60_000)
        return self.answer().locator(".meta").text_content()

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def chat(served, browser):
    page = ChatPage(browser, served.url)
    yield page
    page.close()


@needs_chromium
def test_the_page_shows_the_model_and_its_context_size(chat):
    from playwright.sync_api import expect

    expect(chat.page.locator("#model")).to_have_text(f"{NAME} · context 512 tokens")


@needs_chromium
def test_an_answer_streams_in_and_its_copy_is_the_models_greedy_answer(served, chat):
    chat.page.evaluate("""() => {
        window.snapshots = [];
        new MutationObserver(() => window.snapshots.push(document.querySelector('article.assistant .body')?.textContent))
            .observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")
    chat.set("temperature", 0)
    chat.set("max-tokens", MAX_TOKENS)
    chat.send(CHAT[0]["content"])
    statistics = chat.wait_until_answered()
    snapshots = [text for text in chat.page.evaluate("window.snapshots") if text]
    assert len(set(snapshots)) >= 3, snapshots  # the answer grew in the page, token by token
    reference = served.reference.chat
    assert re.fullmatch(rf"\d+ prompt \+ {len(reference.outputs[0].token_ids)} answer tokens · first token after "
                        r"[\d.]+ s · [\d.]+ tokens/s", statistics), statistics
    chat.answer().locator(".footer .copy").click()
    assert chat.page.evaluate("navigator.clipboard.readText()") == reference.outputs[0].text


@needs_chromium
def test_the_request_carries_the_settings_of_the_page(chat):
    chat.set("system", "Answer in French.")
    chat.set("temperature", 1.3)
    chat.set("top-p", 0.5)
    chat.set("max-tokens", 3)
    chat.send("Hello")
    chat.wait_until_answered()
    [request] = [r for r in chat.requests if r.url.endswith("/v1/chat/completions")]
    assert request.post_data_json == {
        "model": NAME, "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}],
        "temperature": 1.3, "top_p": 0.5, "max_tokens": 3}


@needs_chromium
def test_stop_ends_the_answer_and_the_server_aborts_the_request(served, chat):
    from playwright.sync_api import expect

    # ignore_eos, added on the way out: the answer cannot end by itself before Stop is pressed.
    chat.page.route("**/v1/chat/completions", lambda route: route.continue_(
        post_data=json.dumps({**route.request.post_data_json, "ignore_eos": True})))
    assert idle(served)
    chat.set("max-tokens", 400)
    chat.send("Tell me a long story.")
    body = chat.answer().locator(".body")
    expect(body).to_have_text(re.compile(r"\S+\s+\S+\s+\S+"), timeout=30_000)  # a few tokens in
    chat.page.click("#stop")
    stopped = time.monotonic()
    assert idle(served) and time.monotonic() - stopped < 5  # 400 tokens would take far longer
    expect(chat.answer().locator(".meta")).to_have_text("stopped")
    text = body.text_content()
    time.sleep(0.5)
    assert body.text_content() == text
    expect(chat.page.locator("#send")).to_be_visible()


@needs_chromium
def test_the_page_requests_nothing_outside_its_server(served, chat):
    chat.set("max-tokens", 4)
    chat.send("Hello")
    chat.wait_until_answered()
    assert {urlsplit(r.url).netloc for r in chat.requests} == {urlsplit(served.url).netloc}
    paths = {urlsplit(r.url).path for r in chat.requests}
    assert {"/", "/static/chat.js", "/static/markdown.js", "/static/chat.css", "/v1/models",
            "/v1/chat/completions"} <= paths
    assert chat.errors == []  # no script error, no Content-Security-Policy violation


@needs_chromium
def test_with_an_api_key_the_page_asks_for_it_keeps_it_and_answers(served, browser):
    from playwright.sync_api import expect

    with live_server(create_app(served.async_engine, served_model_name=NAME, api_key="sesame")) as url:
        chat = ChatPage(browser, url)
        reason = chat.page.locator("#key-reason")
        expect(reason).to_have_text("This server needs an API key.")
        chat.page.fill("#api-key", "wrong")
        chat.page.press("#api-key", "Enter")
        expect(reason).to_have_text("The server refused this API key.")
        chat.page.fill("#api-key", "sesame")
        chat.page.press("#api-key", "Enter")
        expect(chat.page.locator("#model")).to_contain_text(NAME)
        chat.set("max-tokens", 4)
        chat.send("Hello")
        chat.wait_until_answered()
        chat.page.reload()
        expect(chat.page.locator("#model")).to_contain_text(NAME)
        expect(chat.page.locator("#key-dialog")).to_be_hidden()
        chat.close()


MARKDOWN = """# Title
Some **bold**, *italics* and `<b>code</b>`
<img src=x onerror="window.injected = true">

```html
<script>window.injected = true</script>
```
- one
- two
1. first
> quoted"""

RENDERED = ('<h1>Title</h1><p>Some <strong>bold</strong>, <em>italics</em> and <code>&lt;b&gt;code&lt;/b&gt;</code>'
            '<br>&lt;img src=x onerror="window.injected = true"&gt;</p>'
            '<pre data-language="html"><code>&lt;script&gt;window.injected = true&lt;/script&gt;</code></pre>'
            '<ul><li>one</li><li>two</li></ul><ol><li>first</li></ol><blockquote><p>quoted</p></blockquote>')


@needs_chromium
def test_markdown_renders_blocks_and_shows_html_as_text(chat):
    html = chat.page.evaluate("""async (text) => {
        const { renderMarkdown } = await import('/static/markdown.js');
        const div = document.createElement('div');
        div.append(renderMarkdown(text));
        document.body.append(div);
        return div.innerHTML;
    }""", MARKDOWN)
    assert html == RENDERED
    assert chat.page.evaluate("window.injected") is None
